"""Worker: torch.distributed.checkpoint save / load of the model and the Fira state under DDP or FSDP2.

    save: train steps [0, K), dcp.save, train [K, N) (the uninterrupted run); then build a FRESH model and
          optimizer in this process, dcp.load the step-K checkpoint and train [K, N) again (the resumed run).
          Writes both runs' losses and final parameters.
    load: (any world size) for each --from CKPT:LAYOUT, a fresh model and optimizer under LAYOUT, dcp.load the
          checkpoint (saved under either layout), train [K, N). Results keyed by "CKPT:LAYOUT".

Model and optimizer state go through get_/set_model_state_dict and get_/set_optimizer_state_dict with
flatten_optimizer_state_dict=True (keyed by parameter name, so the checkpoint survives a change of world size).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dist_workers.ddp_fsdp_common import RunConfig, batches, init_dist, loss_of, make_optimizer, micro_batch, tiny_llama

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def build(layout: str, cfg: RunConfig):
    model = tiny_llama(cfg.seed)
    fwd = model
    if layout == "row_sharded":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        fwd = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return model, fwd, make_optimizer(model, cfg, layout=layout)


def train(model, fwd, opt, data, rank: int, world: int) -> list[float]:
    losses = []
    for tokens in data:
        loss = loss_of(fwd, micro_batch(tokens, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        losses.append(lt.item() / world)
    return losses


def save(model, opt, path: str) -> None:
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=OPTIONS)},
             checkpoint_id=path)


def load(model, opt, path: str) -> None:
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=OPTIONS)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=OPTIONS)


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()) for n, p in model.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("out")
    ap.add_argument("--ckpt", help="save: where to write the checkpoint")
    ap.add_argument("--layout", choices=["replicated", "row_sharded"], help="save: the layout")
    ap.add_argument("--from", dest="sources", action="append", default=[], help="load: CKPT:LAYOUT (repeatable)")
    ap.add_argument("--at", type=int, default=12)
    ap.add_argument("--steps", type=int, default=22)
    args = ap.parse_args()
    rank, world = init_dist()
    cfg = RunConfig(steps=args.steps)
    data = batches(cfg)
    result = {}
    if args.mode == "save":
        model, fwd, opt = build(args.layout, cfg)
        train(model, fwd, opt, data[:args.at], rank, world)
        save(model, opt, args.ckpt)
        result["losses"] = train(model, fwd, opt, data[args.at:], rank, world)
        result["params"] = full_params(model)
        del model, fwd, opt
        sources = [(args.ckpt, args.layout, "resumed")]
    else:
        sources = [(*src.rsplit(":", 1), src) for src in args.sources]
    for ckpt, layout, key in sources:
        model, fwd, opt = build(layout, cfg)
        load(model, opt, ckpt)
        keys = sorted((k, tuple(sorted(v))) for k, v in get_optimizer_state_dict(model, opt)["state"].items())
        all_keys = [None] * world
        dist.all_gather_object(all_keys, keys)
        result[key] = {"losses": train(model, fwd, opt, data[args.at:], rank, world), "params": full_params(model),
                       "state_keys": all_keys}
    if rank == 0:
        torch.save(result, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
