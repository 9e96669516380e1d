"""Worker for tests/test_sketch.py: the distributed randomized projector (layouts/sketch.py) against one process's
randomized projector (projector.compute_projector via single.new_projector) on the same gradients.

    torchrun --nproc-per-node W tests/dist_workers/sketch_worker.py OUT.json

For each case (shape, rank, layout's ranges: "fsdp2" whole-row shards or "zero3" flat slices) every rank holds its
slice of a fixed gradient with a decaying spectrum; rank 0 writes, per case, the largest relative difference
between the assembled distributed projector and the single-process one, and the bytes the sketch moved.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist

from fira_dist.comm import Comm
from fira_dist.config import GroupOptions
from fira_dist.algorithm import LowRankState
from fira_dist.layouts import plan as P
from fira_dist.layouts.single import new_projector
from fira_dist.layouts.sketch import refresh_randomized
from fira_dist.layouts.sliced import SlicedMatrix, Work, projector_piece
from fira_dist.processes import exit_without_finalization
from fira_dist.projector import side_for

CASES = [((50, 37), 8), ((31, 50), 8), ((96, 64), 16), ((64, 96), 16), ((7, 40), 3), ((40, 7), 3)]
STEP = 20


class Opt:
    def warn_once(self, key, message):
        warnings.warn(message)


def gradient(shape, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    q = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, q, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, q, generator=g))
    s = 0.85 ** torch.arange(q, dtype=torch.float32)
    return (U * s) @ V.T


def main() -> None:
    dist.init_process_group("gloo")
    comm = Comm(None)
    W, me = comm.world_size, comm.rank
    out = []
    for layout in ("fsdp2", "zero3"):
        for i, (shape, rank) in enumerate(CASES):
            name = f"case{i}.weight"
            o = GroupOptions.from_group({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0,
                                         "rank": rank, "projector": "randomized"})
            side = side_for(shape, "std")
            k = min(rank, *shape)
            ranges = P.fsdp2_ranges(shape, W) if layout == "fsdp2" else P.zero3_ranges(shape[0] * shape[1], W)
            mat = SlicedMatrix(name, o, P.SliceShape(shape, k, side, True, tuple(ranges)), 0, me)
            G = gradient(shape, i)
            local = mat.local_shapes()
            st = LowRankState(torch.zeros(local["projector"]), torch.zeros(local["exp_avg"]),
                              torch.zeros(local["exp_avg"]), torch.zeros(()))
            flat = G.reshape(-1)[mat.lo:mat.hi].clone()
            before = comm.total_bytes
            (go,) = refresh_randomized(Opt(), comm, [Work(mat, st, flat, flat.clone(), STEP)])
            moved = comm.total_bytes - before
            task = type("T", (), {"name": name, "opts": o, "side": side})()
            ref = new_projector(Opt(), task, STEP, G)
            want = projector_piece(mat, ref, me)
            err = float((st.projector - want).abs().max() / ref.abs().max()) if want.numel() else 0.0
            errs = [None] * W
            dist.all_gather_object(errs, err)
            expected = P.sketch_comm_bytes([mat.plan], 8, 1)
            out.append({"layout": layout, "shape": shape, "rank": rank, "side": side, "go": go, "max_rel_err": max(errs),
                        "bytes": moved, "expected_bytes": expected, "exact_bytes": 4 * shape[0] * shape[1]})
    if me == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    exit_without_finalization(0)


if __name__ == "__main__":
    main()
