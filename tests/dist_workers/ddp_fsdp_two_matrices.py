"""Worker (W=3): two matrices on three ranks, so one rank owns nothing; under DDP (identical full-batch
gradients on every rank, explicit process group) and FSDP2 (micro-batches, explicit device mesh)."""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dist_workers.ddp_fsdp_common import TwoMatrices, init_dist, two_matrices_optimizer, two_matrices_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    args = ap.parse_args()
    rank, world = init_dist()
    result = {}
    # replicated: an explicit process group (all ranks), every rank the whole batch
    group = dist.new_group(list(range(world)))
    model = TwoMatrices()
    opt = two_matrices_optimizer(model, layout="auto", process_group=group)
    losses = two_matrices_run(model, opt)
    result["replicated"] = _collect(model, opt, losses)
    # FSDP2 on an explicit mesh, micro-batches
    mesh = init_device_mesh("cpu", (world,))
    from torch.distributed.fsdp import fully_shard

    model = TwoMatrices()
    fully_shard(model, mesh=mesh)
    opt = two_matrices_optimizer(model, layout="auto", process_group=mesh)
    losses = two_matrices_run(model, opt, rank=rank, world=world, split=True)
    lt = torch.tensor(losses)
    dist.all_reduce(lt)
    result["row_sharded"] = _collect(model, opt, (lt / world).tolist())
    if rank == 0:
        torch.save(result, args.out)
    dist.barrier()
    dist.destroy_process_group()


def _collect(model, opt, losses):
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()) for n, p in model.named_parameters()}
    mine = {"layout": type(opt.layout).__name__, "state_bytes": opt.layout.state_bytes(),
            "svd_count": opt.layout.svd_count, "measured": opt.comm_stats()["bytes_per_step"],
            "local_rows": {n: (p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0])
                           for n, p in model.named_parameters()}}
    info = [None] * dist.get_world_size()
    dist.all_gather_object(info, mine)
    return {"losses": losses, "params": params, "ranks": info}


if __name__ == "__main__":
    main()
