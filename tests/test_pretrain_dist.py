"""End-to-end runs of ``fira-dist pretrain`` at toy size on CPU, each a real launch in subprocesses:
one process, and 2 processes (torchrun, gloo) under ddp, fsdp2 and deepspeed ZeRO-2.

- ddp: a NaN injected on rank 0 at step 2 is skipped on both ranks (eval after it equals eval before it);
  SIGUSR1 to rank 0 at step 3 makes both ranks checkpoint at step 3 and exit 3; running the same command
  again resumes (--resume auto) and the losses of every step equal an uninterrupted run's, exactly.
- fsdp2: losses equal a one-process run of the same global batch (the learning-rate schedule reaches the
  FSDP2 layout), and a run resumed from --resume CHECKPOINT continues with exactly the same losses.
- deepspeed (ZeRO-2, "type": "fira"): the same resume check, a NaN step skipped by DeepSpeed's overflow
  check, gradient accumulation.
- one process: K consecutive bad steps end the run with exit 4 and a checkpoint.
- a rank that hangs makes the others fail after --dist-timeout with exit 5, instead of waiting forever.
- fira-dist demo at a few steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_utils import REPO_ROOT, torchrun_command, worker_env

pytestmark = pytest.mark.slow

TOY = ["--model", "llama_tiny", "--seq-len", "32", "--max-documents", "100", "--eval-batches", "1",
       "--log-every", "1", "--dist-timeout", "120", "--rank", "8", "--update-proj-gap", "3"]
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FIRA_DIST_NO_TQDM": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def pretrain(args, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the pretrain command (torchrun for nproc > 1); stdout and stderr merged. Retries a port clash."""
    for _ in range(3):
        if nproc == 1:
            cmd = [sys.executable, "-m", "fira_dist.pretrain", *args]
        else:
            cmd = torchrun_command("fira_dist.pretrain", nproc, args, module=True)
        try:
            proc = subprocess.run(cmd, env=worker_env(ENV), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-6000:]}") from None
        if "EADDRINUSE" not in proc.stdout and "Address already in use" not in proc.stdout:
            return proc
    return proc


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-8000:]}"
    return proc.stdout


def records(out_dir: Path, kind: str = "train") -> dict[int, dict]:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r.get("kind", "train") == kind}


def losses(out_dir: Path) -> dict[int, float | None]:
    return {s: r["loss"] for s, r in records(out_dir).items()}


def evals(out_dir: Path) -> dict[int, float]:
    return {s: r["eval_loss"] for s, r in records(out_dir, "eval").items()}


def status(out_dir: Path) -> dict:
    return json.loads((out_dir / "exit_status.json").read_text())


def test_ddp_nan_skip_preemption_and_exact_resume(tmp_path):
    args = [*TOY, "--strategy", "ddp", "--micro-batch-size", "2", "--grad-accum", "2", "--max-steps", "6",
            "--eval-every", "1", "--save-every", "2", "--keep-last", "2", "--inject-nan-at", "2"]
    a, b = tmp_path / "uninterrupted", tmp_path / "preempted"
    ok(pretrain([*args, "--output-dir", str(a)], nproc=2))
    la = losses(a)
    assert sorted(la) == [1, 2, 3, 4, 5, 6]
    assert la[2] is None and records(a)[2]["skipped"]  # NaN on rank 0 only: both ranks skipped it
    ea = evals(a)
    assert ea[2] == ea[1]  # the skipped step left the model untouched
    assert all(la[s] is not None for s in (1, 3, 4, 5, 6)) and la[6] < la[1]
    summary = json.loads((a / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["exit_code"] == 0 and len(summary["memory_per_rank"]) == 2
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert any((a / "tensorboard").iterdir())

    # SIGUSR1 reaches rank 0 only, during step 3: every rank finishes step 3, checkpoints and exits 3
    cmd = [*args, "--output-dir", str(b), "--inject-signal-at", "3"]
    first = pretrain(cmd, nproc=2)
    assert first.returncode != 0  # torchrun reports 1 for workers that exit 3
    assert first.stdout.count("exitcode  : 3") + first.stdout.count("(exitcode: 3)") >= 2, first.stdout[-4000:]
    assert status(b)["exit_code"] == 3 and status(b)["step"] == 3
    m = C_manifest(b / "checkpoints" / "step_00000003")
    assert m["reason"] == "preempted" and m["world_size"] == 2 and m["strategy"] == "ddp"
    assert len(m["data"]) == 2 and m["rng"] == ["rank_00000.pt", "rank_00001.pt"]
    assert sorted(losses(b)) == [1, 2, 3]
    # the requeued job runs the same command: --resume auto picks up step 3
    out = ok(pretrain(cmd, nproc=2))
    assert "resumed from" in out and "step_00000003" in out
    assert losses(b) == la  # every step, bitwise
    assert evals(b) == ea
    assert status(b)["exit_code"] == 0


def C_manifest(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    assert m["complete"] is True
    for rel, size in m["files"].items():
        assert (path / rel).stat().st_size == size
    return m


def test_fsdp2_matches_one_process_and_resumes_exactly(tmp_path):
    common = [*TOY, "--max-steps", "4", "--eval-every", "0", "--no-tensorboard"]
    single = tmp_path / "single"
    ok(pretrain([*common, "--micro-batch-size", "4", "--save-every", "0", "--output-dir", str(single)]))
    a, b = tmp_path / "fsdp2", tmp_path / "resumed"
    fsdp = [*common, "--strategy", "fsdp2", "--micro-batch-size", "1", "--grad-accum", "2"]
    ok(pretrain([*fsdp, "--save-every", "2", "--keep-last", "0", "--output-dir", str(a)], nproc=2))
    ls, la = losses(single), losses(a)
    assert sorted(la) == [1, 2, 3, 4]
    for s in la:  # same global batch and schedule: the one-process numbers up to summation order
        assert la[s] == pytest.approx(ls[s], rel=1e-5, abs=1e-5), (s, la, ls)
    ok(pretrain([*fsdp, "--save-every", "0", "--output-dir", str(b), "--resume",
                 str(a / "checkpoints" / "step_00000002")], nproc=2))
    lb = losses(b)
    assert sorted(lb) == [3, 4] and lb == {3: la[3], 4: la[4]}


def test_deepspeed_zero2_fira_nan_skip_and_exact_resume(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
                               "optimizer": {"type": "fira", "params": {"alpha": 0.25}}}))
    args = [*TOY, "--strategy", "deepspeed", "--deepspeed", str(cfg), "--micro-batch-size", "1", "--max-steps", "4",
            "--eval-every", "1", "--no-tensorboard", "--inject-nan-at", "2"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    out = ok(pretrain([*args, "--grad-accum", "2", "--save-every", "2", "--keep-last", "0", "--output-dir", str(a)],
                      nproc=2))
    assert "deepspeed ZeRO-2 x 2" in out and "fira (rank 8)" in out
    la, ea = losses(a), evals(a)
    assert la[2] is None and ea[2] == ea[1]  # DeepSpeed skipped the non-finite step on both ranks
    assert json.loads((a / "summary.json").read_text())["skipped_steps"] == 1
    assert (a / "checkpoints" / "step_00000002" / "deepspeed").is_dir()
    ok(pretrain([*args, "--grad-accum", "2", "--save-every", "0", "--output-dir", str(b), "--resume",
                 str(a / "checkpoints" / "step_00000002")], nproc=2))
    assert losses(b) == {3: la[3], 4: la[4]}
    assert evals(b) == {3: ea[3], 4: ea[4]}
    # the same run requeued on one process (same global batch: gradient accumulation 4): --resume auto finds step 2,
    # written by 2 ranks, and reshards it through a universal checkpoint
    shutil.copytree(a, c)
    shutil.rmtree(c / "checkpoints" / "step_00000004")
    out = ok(pretrain([*args, "--grad-accum", "4", "--save-every", "0", "--output-dir", str(c)], nproc=1))
    assert "written by 2 ranks under ZeRO-2, this job has 1 under ZeRO-2" in out, out[-3000:]
    assert "resharded through the universal checkpoint" in out, out[-3000:]
    assert (c / "checkpoints" / "step_00000002" / "deepspeed_universal" / "fira_state.pt").is_file()
    lc = losses(c)
    for step in (3, 4):  # 3: the loaded weights; 4: the update made with the loaded Fira state
        assert abs(lc[step] - la[step]) <= 1e-4 * abs(la[step]), (step, lc[step], la[step])


def test_consecutive_bad_steps_stop_with_exit_4(tmp_path):
    out_dir = tmp_path / "bad"
    proc = pretrain([*TOY, "--micro-batch-size", "2", "--max-steps", "8", "--eval-every", "1", "--save-every", "0",
                     "--no-tensorboard", "--inject-nan-at", "2,4,5", "--max-bad-steps", "2",
                     "--output-dir", str(out_dir)])
    assert proc.returncode == 4, proc.stdout[-4000:]
    assert "2 consecutive steps had non-finite loss" in proc.stdout
    st = status(out_dir)
    assert st["exit_code"] == 4 and st["reason"] == "bad_steps" and st["step"] == 5
    m = C_manifest(Path(st["checkpoint"]))
    assert m["reason"] == "bad_steps" and m["counters"]["skipped_steps"] == 3
    e = evals(out_dir)
    assert e[2] == e[1] and e[4] == e[3]


def test_hung_rank_ends_the_job_after_dist_timeout(tmp_path):
    out_dir = tmp_path / "hang"
    t = time.perf_counter()
    proc = pretrain([*TOY, "--strategy", "ddp", "--micro-batch-size", "2", "--max-steps", "4", "--eval-every", "0",
                     "--save-every", "0", "--no-tensorboard", "--inject-hang-at", "2", "--dist-timeout", "8",
                     "--output-dir", str(out_dir)], nproc=2, timeout=240)
    assert proc.returncode != 0
    assert "waited longer than --dist-timeout=8" in proc.stdout, proc.stdout[-4000:]
    assert status(out_dir)["exit_code"] == 5
    assert time.perf_counter() - t < 200


def test_demo_runs(tmp_path):
    out_dir = tmp_path / "demo"
    env = worker_env(ENV)
    proc = subprocess.run([sys.executable, "-m", "fira_dist.cli", "demo", "--steps", "2", "--model", "llama_tiny",
                           "--seq-len", "32",
                           "--micro-batch-size", "2", "--output-dir", str(out_dir), "--", "--max-documents", "100"],
                          env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for piece in ("fira-dist pretrain summary", "deepspeed ZeRO-2 x 2", "eval         perplexity", "tokens/s",
                  "peak RSS per rank: rank 0", "fira-dist demo: done in"):
        assert piece in proc.stdout, piece
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["end_step"] == 2 and s["optimizer"] == "fira" and s["zero_stage"] == 2
