"""The launch scripts (launch/) and the per-size ds_configs (ds_configs/llama_*_zero*.json).

Fast checks: the ds_configs are what launch/make_ds_configs.py writes from the paper table, every script is
strict bash and rejects bad variables with a message naming them. Slow ones run every script for real, unchanged,
at toy size (llama_tiny on CPU, gloo): torchrun on one node, the deepspeed launcher, mpirun, and on a real
two-node Slurm cluster (tests/slurm_cluster.py, started and stopped here) both sbatch scripts, the deepspeed
launcher's slurm backend, and a preempted job that checkpoints, requeues itself and resumes. Plus `--dry-run` of
the 7B configs at 8 nodes x 8 GPUs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    from slurm_cluster import slurm_cluster_or_skip
except ImportError:  # tests/ made a package
    from tests.slurm_cluster import slurm_cluster_or_skip

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["torchrun_single_node.sh", "deepspeed_multinode.sh", "mpirun.sh", "slurm_torchrun.sbatch",
           "slurm_mpi.sbatch"]
SIZES = ["llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"]
# Toy runs: llama_tiny with the embedded tokenizer. The per-size ds_configs keep their batch (512 sequences a
# step); --seq-len 16 keeps such a step cheap (8192 tokens).
TOY = "--seq-len 16 --log-every 1 --eval-every 0"
# sbatch flags that fit the 7B scripts' 8-node GPU request onto the two 2-CPU test nodes
SBATCH_TOY = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def _env(**kw) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    bindir = os.path.dirname(sys.executable)  # the venv's python / torchrun / mpirun / deepspeed first
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", FIRA_DIST_NO_TQDM="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _run(script: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script)], cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in _metrics(out) if r.get("kind", "train") == "train" and "loss" in r]


def _checkpoints(out: Path) -> dict[int, dict]:
    """step -> manifest of every complete checkpoint in OUT/checkpoints."""
    found = {}
    for d in sorted((out / "checkpoints").glob("step_*")):
        m = json.loads((d / "manifest.json").read_text())
        found[m["step"]] = m
    return found


def _check_finished(out: Path, steps: int, log: str, world: int, strategy: str) -> None:
    assert _train_steps(out) == list(range(1, steps + 1)), log[-6000:]
    status = json.loads((out / "exit_status.json").read_text())
    assert status["exit_code"] == 0 and status["step"] == steps, status
    final = _checkpoints(out)[steps]
    assert final["world_size"] == world and final["strategy"] == strategy, final


# ----------------------------------------------------------------------------------------------- ds_configs
def test_ds_configs_match_the_generator():
    p = subprocess.run([sys.executable, str(LAUNCH / "make_ds_configs.py"), "--check"], cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("size", SIZES)
def test_ds_configs_carry_the_paper_hyperparameters(size):
    from fira_dist.deepspeed import parse_fira_block
    from fira_dist.models import get_spec

    hp = get_spec(size).fira
    paper = {  # the Fira paper / pre_training_c4/scripts: lr, rank, update_proj_gap, alpha, grad clip
        "llama_60m": (0.01, 128, 200, 0.25, 0.0), "llama_130m": (0.01, 256, 200, 0.25, 0.0),
        "llama_350m": (0.01, 256, 200, 0.25, 0.0), "llama_1b": (0.01, 512, 200, 0.0625, 0.0),
        "llama_7b": (0.005, 64, 500, 0.0625, 1.0)}[size]
    assert (hp.lr, hp.rank, hp.update_proj_gap, hp.alpha, hp.grad_clipping) == paper
    for stage in (1, 2, 3):
        cfg = json.loads((REPO / "ds_configs" / f"{size}_zero{stage}.json").read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["bf16"] == {"enabled": True}
        assert cfg["train_batch_size"] == 512 and 512 % cfg["train_micro_batch_size_per_gpu"] == 0
        assert "gradient_accumulation_steps" not in cfg  # derived: 512 / (micro x world size)
        assert cfg["gradient_clipping"] == paper[4]
        block = parse_fira_block(cfg["optimizer"]["params"])
        assert cfg["optimizer"]["type"] == "fira"
        assert block.defaults["lr"] == paper[0] and block.defaults["weight_decay"] == 0.0
        assert (block.lowrank["rank"], block.lowrank["update_proj_gap"], block.lowrank["alpha"]) == paper[1:4]
        assert block.target_modules == ("attn", "mlp")


# ----------------------------------------------------------------------------------------------- scripts, fast
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_bash(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!"), script
    assert "\nset -euo pipefail\n" in text
    assert re.search(r"^MODEL=\$\{MODEL:-", text, re.M) and re.search(r"^EXTRA_ARGS=\$\{EXTRA_ARGS:-", text, re.M)
    assert "--resume" in text and "RESUME=${RESUME:-auto}" in text
    p = subprocess.run(["bash", "-n", str(LAUNCH / script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout
    if script.endswith(".sbatch"):
        for directive in ("--requeue", "--signal=B:USR1@", "--open-mode=append", "--nodes=8", "--gpus-per-node=8"):
            assert re.search(rf"^#SBATCH {re.escape(directive)}", text, re.M), directive
        assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap 'forward USR1' USR1" in text
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text


BAD_VARIABLES = [
    ("torchrun_single_node.sh", {"GPUS_PER_NODE": "two"}, "GPUS_PER_NODE=two is not accepted"),
    ("torchrun_single_node.sh", {"STRATEGY": "zero"}, "STRATEGY=zero is not accepted"),
    ("torchrun_single_node.sh", {"MODEL": "llama_tiny"}, "no per-size DeepSpeed config ds_configs/llama_tiny_zero2.json"),
    ("torchrun_single_node.sh", {"DS_CONFIG": "nope.json"}, "DS_CONFIG=nope.json: no such file"),
    ("torchrun_single_node.sh", {"ZERO_STAGE": "4"}, "ZERO_STAGE=4 is not accepted"),
    ("torchrun_single_node.sh", {"STRATEGY": "single", "GPUS_PER_NODE": "2"}, "STRATEGY=single runs one process"),
    ("deepspeed_multinode.sh", {"HOSTFILE": "/nonexistent"}, "HOSTFILE=/nonexistent: no such file"),
    ("deepspeed_multinode.sh", {"HOSTFILE": "launch/hostfile.example", "NODES": "9"}, "NODES=9 but HOSTFILE"),
    ("deepspeed_multinode.sh", {"HOSTFILE": "launch/hostfile.example", "GPUS_PER_NODE": "16"}, "has slots=8"),
    ("deepspeed_multinode.sh", {"HOSTFILE": "launch/hostfile.example", "LAUNCHER": "ssh"}, "LAUNCHER=ssh is not accepted"),
    ("deepspeed_multinode.sh", {"HOSTFILE": "launch/hostfile.example", "NO_SSH": "1"}, "NO_SSH=1 needs NODE_RANK"),
    ("mpirun.sh", {"NODES": "2"}, "NODES=2 needs HOSTFILE"),
    ("mpirun.sh", {"MPIRUN": "no-such-mpirun"}, "MPIRUN=no-such-mpirun not found"),
    ("mpirun.sh", {"MODEL": "cfg/missing.json"}, "MODEL=cfg/missing.json: no such config file"),
    ("slurm_torchrun.sbatch", {}, "not inside a Slurm job"),
    ("slurm_mpi.sbatch", {}, "not inside a Slurm job"),
    ("slurm_torchrun.sbatch", {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "NODES": "4"},
     "NODES=4 but the job has only 2 nodes"),
    ("slurm_torchrun.sbatch", {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"}, "GPUS_PER_NODE=<unset> is not accepted"),
    ("slurm_mpi.sbatch", {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "1", "STRATEGY": "fsdp"},
     "STRATEGY=fsdp is not accepted"),
]


@pytest.mark.parametrize("script,env,message", BAD_VARIABLES, ids=[f"{s}-{m[:24]}" for s, _, m in BAD_VARIABLES])
def test_script_rejects_bad_variables(script, env, message):
    p = _run(script, timeout=60, **env)
    assert p.returncode == 2 and message in p.stdout, p.stdout


# ----------------------------------------------------------------------------------------------- dry run, 7B
DRY_RUNS = """
import sys
from fira_dist.pretrain.main import main
out = sys.argv[1]
for stage in (1, 2, 3):
    print(f"=== zero{stage}", flush=True)
    rc = main(["--model", "llama_7b", "--strategy", "deepspeed", "--deepspeed", f"ds_configs/llama_7b_zero{stage}.json",
               "--dry-run", "--dry-run-world-size", "64", "--output-dir", f"{out}/z{stage}"])
    print(f"=== rc {rc}", flush=True)
"""


@pytest.mark.slow
def test_dry_run_7b_configs_at_64_gpus(tmp_path):
    """`--dry-run` of every 7B ds_config for 8 nodes x 8 GPUs: the paper's settings, the batch of 512 x 256."""
    p = subprocess.run([sys.executable, "-c", DRY_RUNS, str(tmp_path)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-6000:]
    parts = p.stdout.split("=== zero")[1:]
    assert len(parts) == 3, p.stdout[-6000:]
    for stage, out in zip((1, 2, 3), parts):
        assert out.startswith(str(stage)) and "=== rc 0" in out, out
        assert f"deepspeed ZeRO-{stage} (ds_configs/llama_7b_zero{stage}.json)" in out, out
        assert "optimizer    fira rank 64, update_proj_gap 500, alpha 0.0625, lr 0.005" in out, out
        assert "grad clip 1" in out and "bf16 compute" in out, out
        assert "micro 8 x seq 256 x grad-accum 1 x 64 rank(s) = 512 sequences" in out, out
        assert "hidden 4096, intermediate 11008, heads 32, layers 32" in out, out
        assert "checks       OK" in out, out


# ----------------------------------------------------------------------------------------------- one node
def _preempt_then_resume(tmp_path, script: str, steps: int, env: dict[str, str]) -> tuple[str, str, int]:
    """Run `script`; at "step 2/" send it SIGUSR1: it must exit 3 leaving one checkpoint (reason preempted). Run it
    again with the same environment: it must resume from that checkpoint and finish. Returns both logs and the
    checkpoint's step."""
    out = Path(env["OUTPUT_DIR"])
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(LAUNCH / script)], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while f"step 2/{steps}" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = log.read_text()
    assert rc == 3, first[-6000:]
    assert "got SIGUSR1: asking the trainers to checkpoint and stop" in first, first[-6000:]
    ckpts = _checkpoints(out)
    assert len(ckpts) == 1, (ckpts, first[-6000:])
    (k, manifest), = ckpts.items()
    assert manifest["reason"] == "preempted" and 2 <= k < steps, manifest
    second = subprocess.run(["bash", str(LAUNCH / script)], cwd=REPO, env=env, timeout=300,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert second.returncode == 0, second.stdout[-6000:]
    assert f"resumed from {out}/checkpoints/step_{k:08d} at step {k}" in second.stdout, second.stdout[-6000:]
    return first, second.stdout, k


@pytest.mark.slow
def test_torchrun_single_node_preempted_then_resumed(tmp_path):
    """2 processes under torchrun (DDP); SIGUSR1 to the script -> torchrun -> trainers: a checkpoint and exit 3 (the
    script reads the trainers' code: torchrun itself reports 1); the rerun resumes and finishes."""
    out = tmp_path / "out"
    env = _env(GPUS_PER_NODE=2, STRATEGY="ddp", MODEL="llama_tiny", OUTPUT_DIR=out,
               EXTRA_ARGS="--max-steps 40 --keep-last 0 --log-every 1 --eval-every 0")
    first, second, _ = _preempt_then_resume(tmp_path, "torchrun_single_node.sh", 40, env)
    assert "--nproc-per-node=2" in first and "the trainers exited 3" in first, first[-6000:]
    assert "ddp x 2 rank(s)" in second, second[-6000:]
    _check_finished(out, 40, second, world=2, strategy="ddp")


@pytest.mark.slow
def test_deepspeed_launcher_hostfile_one_node_preempted_then_resumed(tmp_path):
    """The deepspeed launcher with hostfile `localhost slots=2` (ZeRO-1): SIGUSR1 to the script reaches both trainers
    (it walks the launcher's process tree), exit 3; the rerun resumes and finishes."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    out = tmp_path / "out"
    env = _env(HOSTFILE=hosts, MODEL="llama_tiny", DS_CONFIG="ds_configs/llama_60m_zero1.json",
               MASTER_PORT=_free_port(), OUTPUT_DIR=out, EXTRA_ARGS=f"--max-steps 8 --keep-last 0 {TOY}")
    first, second, _ = _preempt_then_resume(tmp_path, "deepspeed_multinode.sh", 8, env)
    assert first.count("[launch] SIGUSR1 -> pid") == 2, first[-6000:]
    assert "--local_rank=1" in second and "ZeRO-1 x 2 rank(s)" in second, second[-6000:]
    _check_finished(out, 8, second, world=2, strategy="deepspeed")


@pytest.mark.slow
def test_mpirun_two_ranks(tmp_path):
    out = tmp_path / "out"
    p = _run("mpirun.sh", GPUS_PER_NODE=2, STRATEGY="fsdp2", MODEL="llama_tiny", OUTPUT_DIR=out,
             EXTRA_ARGS=f"--max-steps 2 {TOY}")
    assert p.returncode == 0, p.stdout[-6000:]
    assert "launcher mpi" in p.stdout and "fsdp2 x 2 rank(s)" in p.stdout, p.stdout[-6000:]
    _check_finished(out, 2, p.stdout, world=2, strategy="fsdp2")


# ----------------------------------------------------------------------------------------------- two Slurm nodes
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster_or_skip(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _job_env(out: Path, **kw) -> dict[str, str]:
    return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "FIRA_DIST_NO_TQDM": "1", "PYTHONUNBUFFERED": "1",
            "GPUS_PER_NODE": "1", "MODEL": "llama_tiny", "OUTPUT_DIR": str(out), **{k: str(v) for k, v in kw.items()}}


def _assert_two_hosts(res) -> None:
    assert "world size 2" in res.output or "x 2 rank(s)" in res.output, res.describe(8000)


@pytest.mark.slow
def test_slurm_torchrun_sbatch_two_nodes(slurm, tmp_path):
    out = tmp_path / "out"
    res = slurm.submit_and_wait(LAUNCH / "slurm_torchrun.sbatch", timeout=300, sbatch_args=SBATCH_TOY,
                                env=_job_env(out, DS_CONFIG="ds_configs/llama_60m_zero3.json",
                                             EXTRA_ARGS=f"--max-steps 2 {TOY}"))
    assert res.ok, res.describe(8000)
    assert "head n1:29400" in res.output and "--rdzv-backend=c10d --rdzv-endpoint=n1:29400" in res.output
    assert "ZeRO-3 x 2 rank(s)" in res.output, res.describe(8000)
    _check_finished(out, 2, res.output, world=2, strategy="deepspeed")


@pytest.mark.slow
def test_slurm_mpi_sbatch_two_nodes(slurm, tmp_path):
    out = tmp_path / "out"
    res = slurm.submit_and_wait(LAUNCH / "slurm_mpi.sbatch", timeout=300, sbatch_args=SBATCH_TOY,
                                env=_job_env(out, STRATEGY="fsdp2", EXTRA_ARGS=f"--max-steps 2 {TOY}"))
    assert res.ok, res.describe(8000)
    assert "srun --mpi=pmi2 --nodes=2 --ntasks-per-node=1" in res.output and "MASTER_ADDR=n1" in res.output
    assert "fsdp2 x 2 rank(s)" in res.output, res.describe(8000)
    _check_finished(out, 2, res.output, world=2, strategy="fsdp2")


def quick_start_cpu_sbatch_lines() -> list[str]:
    """The commands of launch/README.md's quick start that submit an sbatch script to CPU nodes (continuation
    lines joined), in order."""
    text = (LAUNCH / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            cmd = cmd.split(" # ")[0].strip()
            if " sbatch " in f" {cmd} " and "--gpus-per-node=0" in cmd and not cmd.startswith("#"):
                commands.append(cmd)
    return commands


@pytest.mark.slow
def test_quick_start_cpu_sbatch_lines_run_as_written(slurm, tmp_path, monkeypatch):
    """launch/README.md's two CPU sbatch lines, word for word, submitted from a folder holding launch/ and
    ds_configs/ (the repository root's layout) on the two 2-CPU, GPU-less test nodes: both jobs are accepted,
    start (no gres error, not pending for ever) and finish their 3 steps on 2 ranks."""
    lines = quick_start_cpu_sbatch_lines()
    scripts = [re.search(r"launch/(\S+)", c).group(1) for c in lines]
    assert scripts == ["slurm_torchrun.sbatch", "slurm_mpi.sbatch"], lines
    for name in ("launch", "ds_configs"):
        (tmp_path / name).symlink_to(REPO / name)
    for key in ("DS_ACCELERATOR", "GPUS_PER_NODE", "MODEL", "STRATEGY", "DS_CONFIG", "ZERO_STAGE", "OUTPUT_DIR",
                "EXTRA_ARGS", "DATA_ARGS", "NODES"):  # only what the line itself sets
        monkeypatch.delenv(key, raising=False)
    jobs = []
    for cmd in lines:
        p = slurm.run(["bash", "-c", f"set -euo pipefail; {cmd}"], cwd=tmp_path, check=False)
        m = re.search(r"Submitted batch job (\d+)", p.stdout)
        assert p.returncode == 0 and m, (cmd, p.stdout, p.stderr)
        jobs.append(int(m.group(1)))
    for cmd, job in zip(lines, jobs):  # a request the nodes cannot meet pends for ever: fail at once instead
        deadline = time.monotonic() + 120
        while (info := slurm.job_info(job))["JobState"] == "PENDING":
            assert info.get("Reason") in ("None", "Priority", "Resources"), (cmd, info)
            assert time.monotonic() < deadline, (cmd, info)
            time.sleep(0.5)
    for cmd, job in zip(lines, jobs):
        res = slurm.wait(job, timeout=400)
        assert res.ok, (cmd, res.describe(8000))
        assert res.output_path == tmp_path / f"slurm-fira-pretrain-{job}.out", res.output_path
        strategy = "fsdp2" if "STRATEGY=fsdp2" in cmd else "deepspeed"
        assert ("ZeRO-2 x 2 rank(s)" if strategy == "deepspeed" else "fsdp2 x 2 rank(s)") in res.output, \
            res.describe(8000)
        _check_finished(tmp_path / "runs" / f"llama_tiny-{job}", 3, res.output, world=2, strategy=strategy)


DS_ON_SLURM = """\
#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --time=10
# the deepspeed launcher across the allocated nodes: a hostfile of them, then either its slurm backend (srun
# starts the ranks) or the script started on every node with NO_SSH=1 and the node's rank
set -euo pipefail
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed 's/$/ slots=1/' > "$HOSTFILE"
if [[ $MODE == slurm ]]; then
  LAUNCHER=slurm launch/deepspeed_multinode.sh
else
  srun --ntasks-per-node=1 bash -c 'NO_SSH=1 NODE_RANK=$SLURM_NODEID exec launch/deepspeed_multinode.sh'
fi
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slurm", "no_ssh"])
def test_deepspeed_launcher_two_nodes(slurm, tmp_path, mode):
    out = tmp_path / "out"
    job = tmp_path / "ds_two_nodes.sbatch"
    job.write_text(DS_ON_SLURM)
    res = slurm.submit_and_wait(job, timeout=300, env=_job_env(
        out, HOSTFILE=tmp_path / "hostfile", MODE=mode, DS_CONFIG="ds_configs/llama_60m_zero2.json",
        EXTRA_ARGS=f"--max-steps 2 {TOY}"))
    assert res.ok, res.describe(8000)
    expect = ["LAUNCHER=slurm"] if mode == "slurm" else ["LAUNCHER=no_ssh NODE_RANK=0", "LAUNCHER=no_ssh NODE_RANK=1"]
    for e in expect:
        assert f"NODES=2 GPUS_PER_NODE=1 MASTER=n1:29500 {e}" in res.output, res.describe(8000)
    assert "ZeRO-2 x 2 rank(s)" in res.output, res.describe(8000)
    _check_finished(out, 2, res.output, world=2, strategy="deepspeed")


@pytest.mark.slow
def test_slurm_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """`scancel --signal=USR1 --batch` (what `#SBATCH --signal=B:USR1@300` does before the time limit): the script
    forwards it through srun and torchrun, the trainers checkpoint and exit 3, the script runs `scontrol requeue`,
    and the requeued job (same id, same OUTPUT_DIR) resumes from the checkpoint and finishes."""
    out, steps = tmp_path / "out", 8
    job = slurm.submit(LAUNCH / "slurm_torchrun.sbatch", sbatch_args=SBATCH_TOY, env=_job_env(
        out, DS_CONFIG="ds_configs/llama_60m_zero2.json",
        EXTRA_ARGS=f"--max-steps {steps} --keep-last 0 {TOY}"))
    log = slurm.output_path(job)
    deadline = time.monotonic() + 300
    while not (log.exists() and f"step 2/{steps}" in log.read_text()):
        info = slurm.job_info(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (info, log.read_text() if log.exists() else "")
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no output"
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    released, requeued_at = False, None
    while True:  # RUNNING -> (requeue) PENDING, held until BeginTime: release it -> RUNNING -> COMPLETED
        info = slurm.job_info(job)
        state, restarts = info["JobState"], int(info.get("Restarts", "0") or 0)
        if state == "PENDING" and restarts >= 1 and not released:
            # Slurm holds a requeued job ~2 min; start it sooner, but only once the old run is cleaned up: a
            # restart within the second of the requeue fails with "Job credential revoked"
            requeued_at = requeued_at or time.monotonic()
            idle = slurm.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
            if time.monotonic() - requeued_at > 5 and idle and all(s.rstrip("*") == "idle" for s in idle):
                slurm.scontrol("update", f"JobId={job}", "StartTime=now")
                released = True
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                         "REQUEUE_FED"):
            break
        assert time.monotonic() < deadline + 300, (info, log.read_text()[-6000:])
        time.sleep(0.3)
    text = log.read_text()
    assert state == "COMPLETED" and info.get("ExitCode") == "0:0", (info, text[-8000:], slurm.logs(6000))
    assert restarts == 1, info
    # first run: signal forwarded, checkpoint "preempted", requeue; second run: resumes and finishes
    assert "got SIGUSR1: forwarding SIGUSR1 to the job step" in text, text[-8000:]
    assert "the trainers exited 3" in text and f"requeueing job {job}" in text, text[-8000:]
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text, text[-8000:]
    ckpts = _checkpoints(out)
    preempted = [s for s, m in ckpts.items() if m["reason"] == "preempted"]
    assert len(preempted) == 1 and 2 <= preempted[0] < steps, ckpts
    k = preempted[0]
    assert f"resumed from {out}/checkpoints/step_{k:08d} at step {k}" in text, text[-8000:]
    _check_finished(out, steps, text, world=2, strategy="deepspeed")
