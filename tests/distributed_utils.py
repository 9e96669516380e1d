"""Launch multi-rank test workers as separate processes (torchrun, gloo on CPU) on a free port.

Shared by the DDP / FSDP2 / DCP tests and the DeepSpeed tests. Never creates a process group in the pytest
process itself (see /work/shared/design/TESTING.md: one process group per process).

    from distributed_utils import run_torchrun
    out = run_torchrun("tests/dist_workers/ddp_worker.py", nproc=2, args=["--steps", "30"])

The worker gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` from torchrun,
``OMP_NUM_THREADS=1`` and a ``PYTHONPATH`` with the repository root and ``tests/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"

# Messages that mean "the port was taken between free_port() and the bind": the launch is retried.
_PORT_CLASH = ("EADDRINUSE", "Address already in use", "address already in use")


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker: this one, plus OMP_NUM_THREADS=1 and PYTHONPATH with repo and tests."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    paths = [str(REPO_ROOT), str(TESTS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def torchrun_command(script: str | os.PathLike, nproc: int, args: Sequence[str] = (), port: int | None = None,
                     module: bool = False) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node N --master-port P [-m] script args`` (standalone node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port or free_port())]
    if module:
        cmd.append("-m")
    return cmd + [str(script), *map(str, args)]


def run_torchrun(script: str | os.PathLike, nproc: int, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 timeout: float = 300, module: bool = False, retries: int = 2,
                 cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` ranks; return the CompletedProcess (stdout and stderr merged into stdout).

    Raises AssertionError with the tail of the output when the run fails or times out, so a failing
    worker's traceback shows in the pytest report. A port clash is retried on a new port.
    """
    for attempt in range(retries + 1):
        cmd = torchrun_command(script, nproc, args, module=module)
        try:
            proc = subprocess.run(cmd, env=worker_env(env), cwd=cwd or REPO_ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s; output tail:\n{out[-6000:]}") from None
        if proc.returncode == 0:
            return proc
        if attempt < retries and any(s in proc.stdout for s in _PORT_CLASH):
            continue
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}; output tail:\n{proc.stdout[-8000:]}")
    raise AssertionError("unreachable")
