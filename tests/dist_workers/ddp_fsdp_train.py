"""Worker: train the tiny LLaMA under a distributed layout and write losses, final parameters and the
layout's measurements (comm bytes per step against the docstring formula, state bytes, SVD counts).

    torchrun --nproc-per-node W tests/dist_workers/ddp_fsdp_train.py --layout replicated --grads ddp OUT.pt

--grads exact: no DDP wrapper, every rank computes the whole global batch (identical gradients on every
rank, so the replicated layout must match one process bitwise). --grads ddp: DDP on micro-batches.
--layout row_sharded: FSDP2 fully_shard on each decoder layer and the root, micro-batches.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from fira_dist.layouts.replicated import svd_flops

from dist_workers.ddp_fsdp_common import RunConfig, batches, init_dist, loss_of, make_optimizer, micro_batch, tiny_llama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layout", choices=["replicated", "row_sharded"], required=True)
    ap.add_argument("--grads", choices=["exact", "ddp", "fsdp"], default="ddp")
    ap.add_argument("--steps", type=int, default=RunConfig.steps)
    ap.add_argument("--auto", action="store_true", help="construct with layout='auto' and check the pick")
    args = ap.parse_args()
    rank, world = init_dist()
    cfg = RunConfig(steps=args.steps)
    model = tiny_llama(cfg.seed)
    fwd = model
    if args.layout == "row_sharded":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif args.grads == "ddp":
        fwd = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = make_optimizer(model, cfg, layout="auto" if args.auto else args.layout)
    assert type(opt.layout).__name__ == {"replicated": "Replicated", "row_sharded": "RowSharded"}[args.layout]
    losses, measured, expected = [], [], []
    for tokens in batches(cfg):
        x = tokens if args.grads == "exact" else micro_batch(tokens, rank, world)
        loss = loss_of(fwd, x)
        loss.backward()
        expected.append(opt.layout.expected_comm_bytes())
        opt.step()
        opt.zero_grad(set_to_none=True)
        measured.append(opt.comm_stats()["bytes_per_step"])
        lt = loss.detach().clone()
        if args.grads != "exact":
            dist.all_reduce(lt)
            lt /= world
        losses.append(lt.item())
    params = {}
    for name, p in model.named_parameters():
        params[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
    mine = {"rank": rank, "state_bytes": opt.layout.state_bytes(), "svd_count": opt.layout.svd_count,
            "svd_flops": getattr(opt.layout, "svd_flops", None), "measured": measured, "expected": expected,
            "state_keys": sorted((n, tuple(sorted(st))) for n, st in _named_state(model, opt))}
    info = [None] * world
    dist.all_gather_object(info, mine)
    if rank == 0:
        torch.save({"losses": losses, "params": params, "ranks": info,
                    "state_total": opt.layout.state_bytes_total(), "state_max_single": opt.layout.state_bytes_max(),
                    "svd_flops_max_single": max(svd_flops(e.shape) for e in opt.layout.entries if e.low_rank)},
                   args.out)
    dist.barrier()
    dist.destroy_process_group()


def _named_state(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], st) for p, st in opt.state.items()]


if __name__ == "__main__":
    main()
