"""Launch DeepSpeed test workers with the ``deepspeed`` launcher or ``mpirun`` (torchrun: distributed_utils.py).

Each launch is a separate set of processes on a free port; the pytest process never joins a process group.
On CPU the ``deepspeed`` launcher starts ONE process unless given ``--num_gpus N``, and passes ``--local_rank=K``;
under ``mpirun`` DeepSpeed finds its ranks with mpi4py and takes the port from ``distributed_port`` (the workers
read it from ``FIRA_DS_PORT``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from distributed_utils import REPO_ROOT, free_port, run_torchrun, worker_env  # noqa: F401  (run_torchrun re-exported)

BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """An executable next to this Python (the venv's ``deepspeed``, pip mpich's ``mpirun``), else on PATH."""
    p = BIN / name
    return str(p) if p.exists() else shutil.which(name)


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s; output tail:\n{out[-6000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}; output tail:\n{proc.stdout[-8000:]}")
    return proc


def ds_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return worker_env({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra or {})})


def run_deepspeed_launcher(script: str | os.PathLike, nproc: int, args: Sequence[str] = (), *,
                           timeout: float = 400) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --master_port P script args`` (single node, CPU)."""
    exe = tool("deepspeed")
    assert exe, "the deepspeed launcher is not installed"
    cmd = [exe, "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script), *map(str, args)]
    return _run(cmd, ds_env(), timeout)


def run_mpirun(script: str | os.PathLike, nproc: int, args: Sequence[str] = (), *,
               timeout: float = 400) -> subprocess.CompletedProcess:
    """``mpirun -np N python script args`` (pip mpich's mpirun)."""
    exe = tool("mpirun")
    assert exe, "mpirun is not installed (pip install mpich)"
    cmd = [exe, "-np", str(nproc), sys.executable, str(script), *map(str, args)]
    return _run(cmd, ds_env({"FIRA_DS_PORT": str(free_port())}), timeout)
