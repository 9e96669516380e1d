"""Fault injection for ``fira-dist pretrain`` (issue 8): every fault ends in the same final state as a clean run.

Two processes (DDP, gloo, fp32) train ``llama_tiny`` for 8 optimizer steps with a checkpoint every 2 steps. One
clean reference run is shared by all cases; each case injects a fault, lets the job stop (or continue), resumes
where that applies, and compares the final checkpoint's model parameters *and* optimizer state (Fira's moments
and projectors) with the reference, bitwise, plus the per-step losses in ``metrics.jsonl``:

- crash: rank 1 is SIGKILLed in the middle of step 5 of a job started without an agent (plain ``RANK`` /
  ``WORLD_SIZE`` processes, as ``srun`` or ``mpirun`` start them): rank 0 exits 5 by itself within the
  ``--dist-timeout``; the rerun with ``--resume auto`` continues from step 4.
- crash while checkpointing, under ``torchrun --max-restarts 1`` (one command): rank 1 is SIGKILLed after
  writing its part of the step-6 checkpoint; torchrun restarts both ranks, which resume from step 4 (the
  half-written ``.tmp-step_00000006`` is never picked and is swept).
- SIGTERM to every process of the job (what Slurm does on preemption or ``scancel``) in the middle of a step:
  all ranks finish that step, write one checkpoint and exit 3; the same command run again continues.
- the newest checkpoints damaged: step 8 truncated (a data file shorter than its manifest says), step 6 with a
  garbage manifest, and a ``.tmp-`` folder with a complete-looking manifest (a crash between manifest and
  rename): ``--resume auto`` takes step 4 and ends equal.
- non-finite numbers: a NaN loss on rank 0 and, in another run, a NaN *gradient* (finite loss) on rank 1 only,
  at steps 3 and 6: both runs skip exactly those steps on both ranks and end bitwise equal to each other; the
  state checkpointed after a skipped step equals the state before it; two bad steps in a row with
  ``--max-bad-steps 2`` stop both ranks with exit 4 and a checkpoint equal to the last good state.

The faults the trainer has no flag for (SIGKILL at a chosen point, NaN gradients on one rank, a slow step) are
injected by this file itself: run as a script (``torchrun ... tests/test_faults.py <pretrain flags>``) it patches
two trainer internals according to ``FIRA_FAULT`` (JSON) and calls ``fira_dist.pretrain.main.main``.
Every subprocess has a timeout and is killed (its whole process group) on failure: nothing here can hang CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distributed_utils import REPO_ROOT, free_port, torchrun_command, worker_env  # noqa: E402

DIST_TIMEOUT = 60  # --dist-timeout: how long a collective may wait for a dead or stuck peer
STEPS = 8
ARGS = ["--model", "llama_tiny", "--seq-len", "32", "--max-documents", "100", "--strategy", "ddp",
        "--micro-batch-size", "1", "--grad-accum", "2", "--max-steps", str(STEPS), "--rank", "8",
        "--update-proj-gap", "3", "--eval-every", "0", "--save-every", "2", "--keep-last", "3", "--log-every", "1",
        "--no-tensorboard", "--dist-timeout", str(DIST_TIMEOUT)]
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FIRA_DIST_NO_TQDM": "1",
       "TOKENIZERS_PARALLELISM": "false", "PET_SHUTDOWN_TIMEOUT": "120"}
JOB_TIMEOUT = 420  # s for one launch on a loaded 2-core machine (a clean run takes ~15 s unloaded)


# ----------------------------------------------------------------------------------------------- running jobs
class Job:
    """A subprocess in its own session (so that its whole process tree can be signalled or killed), output to a
    log file."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
        self.cmd, self.log = cmd, log
        self._f = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self._f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.t0 = time.monotonic()

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.cmd)} did not end within {timeout:.0f} s (hang); log tail:\n"
                                 f"{self.output()[-6000:]}") from None
        finally:
            self._f.close()
        return rc

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _env(fault: dict | None) -> dict[str, str]:
    env = worker_env(ENV)
    env.pop("FIRA_FAULT", None)
    if fault:
        env["FIRA_FAULT"] = json.dumps(fault)
    return env


def torchrun_job(out_dir: Path, extra=(), fault: dict | None = None, restarts: int = 0, tag: str = "run") -> Job:
    cmd = torchrun_command(Path(__file__), 2, [*ARGS, *extra, "--output-dir", str(out_dir)])
    env = _env(fault)
    if restarts:
        # torch 2.13 reuses the rendezvous TCPStore across restarts, so the restarted ranks can read the dead
        # ranks' addresses from it ("Gloo connectFullMesh failed ... Connection refused", intermittently; cf.
        # pytorch/pytorch#135712). A fresh store per attempt needs the c10d rendezvous (--standalone here) and
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; the static one (--master-addr/--master-port) always shares it.
        i, j = cmd.index("--master-addr"), cmd.index("--master-port")
        assert j == i + 2
        cmd[i:j + 2] = ["--standalone", "--max-restarts", str(restarts), "--monitor-interval", "0.2"]
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return Job(cmd, out_dir.parent / f"{out_dir.name}.{tag}.log", env)


def run(out_dir: Path, extra=(), fault: dict | None = None, restarts: int = 0, tag: str = "run",
        timeout: float = JOB_TIMEOUT) -> tuple[int, str]:
    """Run a 2-rank torchrun job to its end; retried once when the rendezvous port was taken meanwhile."""
    for attempt in range(2):
        job = torchrun_job(out_dir, extra, fault, restarts, f"{tag}{attempt or ''}")
        rc = job.wait(timeout)
        out = job.output()
        if rc == 0 or not any(s in out for s in ("EADDRINUSE", "Address already in use")):
            return rc, out
    return rc, out


def ok(result: tuple[int, str]) -> str:
    rc, out = result
    assert rc == 0, f"exit {rc}; log tail:\n{out[-8000:]}"
    return out


# ----------------------------------------------------------------------------------------------- reading results
def ckpt(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


def state(folder: Path, tmp: Path) -> dict:
    """Model parameters and optimizer state of a DCP checkpoint, flattened to {key: value}, read in this process
    (no process group): dcp_to_torch_save + torch.load."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp / f"{folder.parent.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(str(folder / "dcp"), str(dst))
    sd = torch.load(dst, weights_only=False)
    dst.unlink()
    out: dict = {}

    def flat(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                flat(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    flat(sd, "")
    assert any(k.startswith("model.") for k in out) and any(k.startswith("optim.state.") for k in out), list(out)[:5]
    return out


def differences(a: dict, b: dict, ignore_lr: bool = False) -> list[str]:
    """Keys whose values differ (tensors bitwise); [] when equal. ``ignore_lr``: the param groups' current
    learning rate (it moves with the step counter, also over a skipped step) is left out."""
    import torch

    keys = set(a) | set(b)
    if ignore_lr:
        keys = {k for k in keys if not (k.startswith("optim.param_groups.") and k.endswith(".lr"))}
    bad = []
    for k in sorted(keys):
        if k not in a or k not in b:
            bad.append(f"{k} (missing on one side)")
            continue
        x, y = a[k], b[k]
        same = (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)) if isinstance(x, torch.Tensor) \
            else x == y
        if not same:
            bad.append(k)
    return bad


def assert_same(a: dict, b: dict, what: str, ignore_lr: bool = False) -> None:
    import torch

    bad = differences(a, b, ignore_lr)
    assert not bad, f"{what}: {len(bad)} of {len(a)} entries differ, e.g. {bad[:5]}"
    n = sum(v.numel() for k, v in a.items() if isinstance(v, torch.Tensor) and k.startswith("model."))
    assert n > 1_000_000  # llama_tiny's parameters were all there


def train_records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in recs if r.get("kind", "train") == "train"]


def losses(out_dir: Path) -> dict[int, float | None]:
    recs = train_records(out_dir)
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def exit_status(out_dir: Path) -> dict:
    return json.loads((out_dir / "exit_status.json").read_text())


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ----------------------------------------------------------------------------------------------- the reference
@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One uninterrupted run: its final state (step 8) and per-step losses, shared by every case."""
    tmp = tmp_path_factory.mktemp("faults")
    out_dir = tmp / "clean"
    ok(run(out_dir))
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == \
        ["step_00000004", "step_00000006", "step_00000008"]  # --keep-last 3 rotated step 2 away
    ls = losses(out_dir)
    assert sorted(ls) == list(range(1, STEPS + 1)) and all(v is not None for v in ls.values())
    return {"dir": out_dir, "tmp": tmp, "losses": ls, "final": state(ckpt(out_dir, STEPS), tmp)}


def assert_ends_like_clean(out_dir: Path, clean: dict, what: str) -> None:
    st = exit_status(out_dir)
    assert st["exit_code"] == 0 and st["step"] == STEPS, st
    assert_same(state(ckpt(out_dir, STEPS), clean["tmp"]), clean["final"], what)
    assert losses(out_dir) == clean["losses"], what  # every step once, each loss bitwise, data order included
    assert not [p.name for p in (out_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------------- crashes
@pytest.mark.slow
def test_killed_rank_without_agent_stops_job_then_resume_matches(clean, tmp_path):
    """kill -9 of rank 1 mid-step under a launcher that does not watch the ranks: rank 0 stops by itself (exit
    5, no hang) and a rerun resumes from the last complete checkpoint to the clean run's final state."""
    out_dir = tmp_path / "crash"
    marker = tmp_path / "killed"
    port = free_port()
    env = _env({"kill": {"rank": 1, "step": 5, "where": "step", "once": str(marker)}})
    jobs = []
    try:
        for rank in (0, 1):
            e = dict(env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            jobs.append(Job([sys.executable, str(Path(__file__)), *ARGS, "--output-dir", str(out_dir)],
                            tmp_path / f"rank{rank}.log", e))
        rc1 = jobs[1].wait()
        rc0 = jobs[0].wait(timeout=DIST_TIMEOUT + 120)  # a hang here fails the test (and kills the job)
        t_end = time.time()
    finally:
        for j in jobs:
            j.kill()
    out0 = jobs[0].output()
    assert rc1 == -signal.SIGKILL and marker.exists(), jobs[1].output()[-4000:]
    assert rc0 == 5, f"rank 0 exit {rc0}:\n{out0[-6000:]}"
    assert "a rank died or hangs" in out0
    waited = t_end - float(marker.read_text())
    assert waited < DIST_TIMEOUT + 30, f"rank 0 took {waited:.0f} s to stop after rank 1 died"
    st = exit_status(out_dir)
    assert st["exit_code"] == 5 and st["reason"] == "dist_failure" and st["step"] == 4, st
    assert sorted(losses(out_dir)) == [1, 2, 3, 4]
    # the restart: the same command under torchrun; --resume auto finds step 4
    out = ok(run(out_dir, tag="resume"))
    assert "resumed from" in out and "step_00000004" in out
    assert_ends_like_clean(out_dir, clean, "killed at step 5, resumed from step 4")


@pytest.mark.slow
def test_rank_killed_while_checkpointing_torchrun_restarts_and_matches(clean, tmp_path):
    """kill -9 of rank 1 in the middle of writing the step-6 checkpoint, one command with torchrun
    --max-restarts 1: the job restarts by itself and resumes from step 4 (step 6 was never completed)."""
    out_dir = tmp_path / "crash_ckpt"
    marker = tmp_path / "killed"
    t = time.monotonic()
    out = ok(run(out_dir, restarts=1, fault={"kill": {"rank": 1, "step": 6, "where": "save", "once": str(marker)}}))
    assert marker.exists()
    assert "resumed from" in out and "step_00000004" in out, out[-6000:]
    assert "step_00000006 written" in out  # written by the restarted attempt
    assert_ends_like_clean(out_dir, clean, "killed while saving step 6, torchrun restart")
    assert time.monotonic() - t < JOB_TIMEOUT


# ----------------------------------------------------------------------------------------------- preemption
@pytest.mark.slow
def test_sigterm_to_every_process_checkpoints_exits_3_and_resumes(clean, tmp_path):
    """SIGTERM to torchrun and both trainers at once, during a step (each step sleeps 0.5 s between backward
    and the step's all-reduce, so the signal lands mid-step): one checkpoint at the step every rank finished,
    exit 3; the requeued command continues to the clean run's final state."""
    out_dir = tmp_path / "preempted"
    job = torchrun_job(out_dir, fault={"sleep": 0.5}, tag="first")
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not any(r["step"] >= 3 for r in train_records(out_dir)):
            assert job.proc.poll() is None, f"ended before the signal:\n{job.output()[-6000:]}"
            assert time.monotonic() < deadline, "no step 3 in time"
            time.sleep(0.05)
        job.signal_group(signal.SIGTERM)  # like Slurm: every process of the job step
        job.wait(timeout=240)
    finally:
        job.kill()
    out = job.output()
    st = exit_status(out_dir)
    assert st["exit_code"] == 3 and st["reason"] == "preempted", (st, out[-6000:])
    stop = st["step"]
    assert 3 <= stop < STEPS, st
    assert out.count("received SIGTERM") >= 2, out[-6000:]  # both ranks had the signal
    m = manifest(ckpt(out_dir, stop))
    # "periodic" when the signal came during a step that saves anyway: one checkpoint per step, not two
    assert m["reason"] in ("preempted", "periodic") and m["step"] == stop and m["world_size"] == 2
    assert m["reason"] == "preempted" or stop % 2 == 0
    assert sorted(losses(out_dir)) == list(range(1, stop + 1))
    out = ok(run(out_dir, tag="requeued"))
    assert "resumed from" in out and f"step_{stop:08d}" in out
    assert_ends_like_clean(out_dir, clean, f"SIGTERM during step {stop + 1}, resumed")


# ----------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.slow
def test_damaged_newest_checkpoints_are_skipped_and_resume_matches(clean, tmp_path):
    out_dir = tmp_path / "damaged"
    shutil.copytree(clean["dir"], out_dir)
    root = out_dir / "checkpoints"
    shard = max((ckpt(out_dir, 8) / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:  # truncated: a copy or write cut short
        f.truncate(shard.stat().st_size // 2)
    (ckpt(out_dir, 6) / "manifest.json").write_text('{"format": 1, "complete": tr')  # garbage manifest
    fake = root / ".tmp-step_00000010"  # a crash between writing the manifest and the rename
    shutil.copytree(ckpt(out_dir, 4), fake)
    (fake / "manifest.json").write_text(json.dumps({**manifest(ckpt(out_dir, 4)), "step": 10}))
    out = ok(run(out_dir, tag="resume"))
    assert "ignoring checkpoint" in out and "step_00000008" in out and "bytes, the manifest says" in out
    assert "step_00000006 has no readable manifest.json" in out
    assert "resumed from" in out and "step_00000004 at step 4" in out, out[-6000:]
    assert_ends_like_clean(out_dir, clean, "newest checkpoints damaged, resumed from step 4")
    for step in (6, 8):  # the damaged ones were replaced by complete ones
        assert manifest(ckpt(out_dir, step))["complete"] is True


# ----------------------------------------------------------------------------------------------- bad numbers
@pytest.fixture(scope="module")
def nan_loss_run(clean):
    """NaN loss on rank 0 at steps 3 and 6 (the trainer's own --inject-nan-at), a checkpoint after every step."""
    out_dir = clean["tmp"] / "nan_loss_rank0"
    ok(run(out_dir, ["--inject-nan-at", "3,6", "--save-every", "1", "--keep-last", "0"]))
    return out_dir


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_on_every_rank_together(clean, nan_loss_run, tmp_path):
    """NaN loss on rank 0 vs NaN in one gradient on rank 1 only (finite loss), at steps 3 and 6: the same steps
    skipped on both ranks, the same final state; a skipped step leaves the state as it was."""
    a, b = nan_loss_run, tmp_path / "nan_grad_rank1"
    out = ok(run(b, fault={"nan_grad": {"rank": 1, "steps": [3, 6]}}))
    assert "non-finite loss or gradients on 1 rank(s)" in out
    for d in (a, b):
        recs = {r["step"]: r for r in train_records(d)}
        assert sorted(recs) == list(range(1, STEPS + 1))
        assert [s for s, r in recs.items() if r["skipped"]] == [3, 6]
        assert json.loads((d / "summary.json").read_text())["skipped_steps"] == 2
    la, lb = losses(a), losses(b)
    assert la == lb and la[1] == clean["losses"][1] and la[2] == clean["losses"][2]
    final_a = state(ckpt(a, STEPS), tmp_path)
    assert_same(state(ckpt(b, STEPS), tmp_path), final_a, "NaN gradient on rank 1 vs NaN loss on rank 0")
    assert differences(final_a, clean["final"])  # the skipped updates are really missing
    for s in (3, 6):  # the update of a skipped step left model and optimizer state untouched
        assert_same(state(ckpt(a, s), tmp_path), state(ckpt(a, s - 1), tmp_path), f"skipped step {s}",
                    ignore_lr=True)
    assert manifest(ckpt(a, 6))["counters"]["skipped_steps"] == 2


@pytest.mark.slow
def test_consecutive_bad_steps_stop_every_rank_with_last_good_state(nan_loss_run, tmp_path):
    """NaN gradients on rank 1 at steps 3 and 4 with --max-bad-steps 2: both ranks stop after step 4 with exit 4
    and a checkpoint holding the state after step 2 (the last good one)."""
    out_dir = tmp_path / "bad_steps"
    rc, out = run(out_dir, ["--max-bad-steps", "2"], fault={"nan_grad": {"rank": 1, "steps": [3, 4]}})
    assert rc != 0  # torchrun reports 1; the trainers' own code is in exit_status.json
    assert "2 consecutive steps had non-finite loss or gradients (--max-bad-steps 2): stopping" in out, out[-6000:]
    st = exit_status(out_dir)
    assert st["exit_code"] == 4 and st["reason"] == "bad_steps" and st["step"] == 4, st
    assert out.count("exitcode  : 4") + out.count("(exitcode: 4)") + out.count("exitcode: 4") >= 1, out[-4000:]
    m = manifest(ckpt(out_dir, 4))
    assert m["reason"] == "bad_steps" and m["counters"]["skipped_steps"] == 2
    # nan_loss_run is the same run up to step 2 (then skips step 3 only): its step-2 checkpoint is the last good state
    assert_same(state(ckpt(out_dir, 4), tmp_path), state(ckpt(nan_loss_run, 2), tmp_path), "last good state",
                ignore_lr=True)


# ----------------------------------------------------------------------------------------------- fault entry
def _fault_entry() -> int:
    """``python tests/test_faults.py <pretrain flags>``: the trainer with the faults of ``FIRA_FAULT`` (JSON):

    - ``{"kill": {"rank": R, "step": N, "where": "step" | "save", "once": MARKER}}``: rank R SIGKILLs itself
      in step N between backward and the step's all-reduce ("step"), or after writing its part of the step-N
      checkpoint ("save"); with ``once``, only if the file MARKER does not exist yet (it is created, holding
      the time, just before the kill), so a restarted attempt runs through.
    - ``{"nan_grad": {"rank": R, "steps": [N, ...]}}``: after backward of step N, one gradient element on rank
      R becomes NaN (the loss stays finite; under DDP the gradients were already averaged, so only rank R
      sees it).
    - ``{"sleep": S}``: every rank sleeps S seconds in every step, between backward and the all-reduce.
    """
    import fira_dist.pretrain.main as PM
    from fira_dist.pretrain import checkpoint as C

    spec = json.loads(os.environ.get("FIRA_FAULT") or "{}")
    kill, nan_grad = spec.get("kill"), spec.get("nan_grad")
    env_rank = int(os.environ.get("RANK", "0"))

    def fire(k: dict) -> None:
        marker = k.get("once")
        if marker:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, repr(time.time()).encode())
            os.close(fd)
        sys.stderr.write(f"[fault] rank {env_rank}: SIGKILL ({k['where']}, step {k['step']})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    assert hasattr(PM.Trainer, "_local_grad_sq") and hasattr(C, "dcp_save"), "trainer internals moved"
    local_grad_sq = PM.Trainer._local_grad_sq

    def patched_grad_sq(self):  # called once per step, after the micro-batches' backward, before the all-reduce
        n = self.step + 1
        if spec.get("sleep"):
            time.sleep(float(spec["sleep"]))
        if kill and kill["where"] == "step" and kill["rank"] == self.rank and kill["step"] == n:
            fire(kill)
        if nan_grad and nan_grad["rank"] == self.rank and n in nan_grad["steps"]:
            p = next(p for p in self.model.parameters() if p.grad is not None)
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            g.view(-1)[0] = float("nan")
            sys.stderr.write(f"[fault] rank {self.rank}: NaN in the gradient of step {n}\n")
        return local_grad_sq(self)

    dcp_save = C.dcp_save

    def patched_dcp_save(folder, model, optimizer):
        dcp_save(folder, model, optimizer)
        if kill and kill["where"] == "save" and kill["rank"] == env_rank and \
                Path(folder).parent.name == f"{C.TMP_PREFIX}{C.step_dir_name(kill['step'])}":
            fire(kill)

    PM.Trainer._local_grad_sq = patched_grad_sq
    C.dcp_save = patched_dcp_save
    return PM.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_fault_entry())
