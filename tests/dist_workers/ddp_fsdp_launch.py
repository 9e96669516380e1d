"""Run a DDP / FSDP2 worker once per pytest session and cache what it wrote (several tests read one run)."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import torch

from distributed_utils import run_torchrun

_RUNS: dict[tuple, Any] = {}


def launch(script: str, nproc: int, *args: str, timeout: float = 240) -> dict[str, Any]:
    """torchrun tests/dist_workers/SCRIPT OUT ARGS... on nproc ranks; returns torch.load(OUT) (cached)."""
    key = (script, nproc, args)
    if key not in _RUNS:
        with tempfile.TemporaryDirectory(prefix="fira_ddp_fsdp_") as tmp:
            out = os.path.join(tmp, "out.pt")
            run_torchrun(f"tests/dist_workers/{script}", nproc, [out, *args], timeout=timeout)
            _RUNS[key] = torch.load(out, weights_only=False)
    return _RUNS[key]


def one_thread(fn):
    """Run fn with torch on one thread, as the workers (torchrun sets OMP_NUM_THREADS=1): the same matmul
    blocking, so a layout that runs the same arithmetic gives the same bits."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*a, **kw)
        finally:
            torch.set_num_threads(n)

    return wrapper


@functools.lru_cache(maxsize=None)
def single_reference(steps: int = 32) -> dict[str, Any]:
    from dist_workers.ddp_fsdp_common import RunConfig, run_single

    return one_thread(run_single)(RunConfig(steps=steps))


@functools.lru_cache(maxsize=None)
def two_matrices_reference() -> dict[str, Any]:
    from dist_workers.ddp_fsdp_common import TwoMatrices, two_matrices_optimizer, two_matrices_run

    def run():
        model = TwoMatrices()
        opt = two_matrices_optimizer(model, layout="single")
        losses = two_matrices_run(model, opt)
        return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}

    return one_thread(run)()
