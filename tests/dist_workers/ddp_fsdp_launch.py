"""Run the DDP / FSDP2 / DCP worker once per world size per pytest session and cache what it wrote.

Every multi-rank test of test_ddp.py, test_fsdp2.py and test_dcp.py reads one of two launches:
W=3 (DDP, identical-gradient replicated, FSDP2, two matrices, DCP saves) and W=2 (DDP, FSDP2, DCP loads of
the W=3 checkpoints, so it runs the W=3 launch first).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from typing import Any

import torch

from distributed_utils import run_torchrun

LAYOUTS = ("replicated", "row_sharded")
_RUNS: dict[int, Any] = {}
_CKPT: list[str] = []


def ckpt_dir(layout: str) -> str:
    if not _CKPT:
        _CKPT.append(tempfile.mkdtemp(prefix="fira_dcp_"))
        atexit.register(shutil.rmtree, _CKPT[0], True)
    return os.path.join(_CKPT[0], layout)


def parts(world: int) -> list[str]:
    out = ["train:replicated:ddp", "train:row_sharded:fsdp"]
    if world == 3:
        out += ["train:replicated:exact", "train:replicated:exact:256", "train:row_sharded:fsdp:4096", "two"] + [f"dcp_save:{lay}:{ckpt_dir(lay)}" for lay in LAYOUTS]
    if world == 2:
        out += [f"dcp_load:{ckpt_dir(src)}:{dst}" for src in LAYOUTS for dst in LAYOUTS]
    return out


def suite(world: int) -> dict[str, Any]:
    """{part: result} of tests/dist_workers/ddp_fsdp_suite.py on `world` ranks (2 or 3), launched once."""
    if world not in _RUNS:
        if world == 2:
            suite(3)  # writes the checkpoints the W=2 launch loads
        with tempfile.TemporaryDirectory(prefix="fira_ddp_fsdp_") as tmp:
            out = os.path.join(tmp, "out.pt")
            args = [out] + [f"--part={p}" for p in parts(world)]
            run_torchrun("tests/dist_workers/ddp_fsdp_suite.py", world, args, timeout=420)
            _RUNS[world] = torch.load(out, weights_only=False)
    return _RUNS[world]


def dcp_save(layout: str) -> dict[str, Any]:
    return suite(3)[f"dcp_save:{layout}:{ckpt_dir(layout)}"]


def dcp_load(src: str, dst: str) -> dict[str, Any]:
    return suite(2)[f"dcp_load:{ckpt_dir(src)}:{dst}"]


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
def two_matrices_reference(variant: str = "fira") -> dict[str, Any]:
    from dist_workers.ddp_fsdp_common import TwoMatrices, two_matrices_optimizer, two_matrices_run

    def run():
        model = TwoMatrices()
        opt = two_matrices_optimizer(model, variant, layout="single")
        losses = two_matrices_run(model, opt, inject_nan=variant == "nan")
        return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "steps": {n: float(opt.state[p]["step"]) for n, p in model.named_parameters()}}

    return one_thread(run)()
