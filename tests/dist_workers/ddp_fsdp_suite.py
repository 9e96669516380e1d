"""Worker for the DDP / FSDP2 / DCP tests: runs several parts in ONE torchrun launch (one process group; a
launch costs ~5-30 s of interpreter and import start-up on a loaded 2-core machine, a part ~1-5 s).

    torchrun --nproc-per-node W tests/dist_workers/ddp_fsdp_suite.py OUT.pt --part P [--part P ...]

Parts (rank 0 writes {part: result} to OUT.pt):
    train:replicated:ddp       tiny LLaMA, DDP on micro-batches, replicated layout (picked by layout="auto")
    train:replicated:exact     no DDP: every rank computes the whole global batch (identical gradients)
    train:LAYOUT:GRADS:BYTES   the same with comm_bucket_bytes=BYTES (the optimizer's exchanges in small rounds)
    train:row_sharded:fsdp     FSDP2 fully_shard on each decoder layer and the root, micro-batches ("auto")
    two                        two matrices on W ranks, both layouts, explicit process group / device mesh
    dcp_save:LAYOUT:DIR        train [0, K), dcp.save to DIR, train [K, N); then a FRESH model and optimizer
                               dcp.load DIR and train [K, N) again ("resumed")
    dcp_load:DIR:LAYOUT        fresh model and optimizer under LAYOUT, dcp.load DIR (saved by either
                               layout, at any world size), train [K, N)
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

from dist_workers.ddp_fsdp_common import (
    TWO_VARIANTS,
    RunConfig,
    TwoMatrices,
    batches,
    finish,
    init_dist,
    loss_of,
    make_optimizer,
    micro_batch,
    tiny_llama,
    two_matrices_optimizer,
    two_matrices_run,
)
from fira_dist.layouts.replicated import svd_flops

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
DCP_AT, DCP_STEPS = 12, 22  # save after 12 steps, train to 22 (a projector refresh at step 20 on the way)
CLASS = {"replicated": "Replicated", "row_sharded": "RowSharded"}


def build(layout: str, grads: str, cfg: RunConfig, **kw):
    """(model, module to call, Fira with layout='auto')."""
    model = tiny_llama(cfg.seed)
    fwd = model
    if layout == "row_sharded":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif grads == "ddp":
        fwd = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = make_optimizer(model, cfg, layout="auto", **kw)
    assert type(opt.layout).__name__ == CLASS[layout], type(opt.layout)
    return model, fwd, opt


def train_steps(fwd, opt, data, grads: str, on_step=None) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for tokens in data:
        loss = loss_of(fwd, tokens if grads == "exact" else micro_batch(tokens, rank, world))
        loss.backward()
        before = opt.layout.expected_comm_bytes()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(before, opt.comm_stats()["bytes_per_step"])
        lt = loss.detach().clone()
        if grads != "exact":
            dist.all_reduce(lt)
            lt /= world
        losses.append(lt.item())
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone())
            for n, p in model.named_parameters()}


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def state_keys(model, opt) -> list:
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted((names[id(p)], tuple(sorted(st))) for p, st in opt.state.items())


# ---------------------------------------------------------------------- parts
def part_train(layout: str, grads: str, budget: str | None = None) -> dict:
    cfg = RunConfig()
    model, fwd, opt = build(layout, grads, cfg, **({} if budget is None else {"comm_bucket_bytes": int(budget)}))
    expected, measured = [], []
    losses = train_steps(fwd, opt, batches(cfg), grads, lambda e, m: (expected.append(e), measured.append(m)))
    lay = opt.layout
    mine = {"rank": dist.get_rank(), "state_bytes": lay.state_bytes(), "svd_count": lay.svd_count,
            "svd_flops": lay.svd_flops, "measured": measured, "expected": expected, "state_keys": state_keys(model, opt)}
    return {"losses": losses, "params": full_params(model), "ranks": gather(mine),
            "state_total": lay.state_bytes_total(), "state_max_single": lay.state_bytes_max(),
            "svd_flops_max_single": max(svd_flops(e.shape) for e in lay.entries if e.low_rank)}


def part_two() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))  # an explicit process group
    mesh = init_device_mesh("cpu", (world,))  # an explicit device mesh
    result = {}
    for variant in TWO_VARIANTS:
        # replicated: every rank the whole batch (a NaN gradient then is NaN on every rank, as after DDP)
        model = TwoMatrices()
        opt = two_matrices_optimizer(model, variant, layout="auto", process_group=group)
        losses = two_matrices_run(model, opt, inject_nan=variant == "nan")
        result[f"replicated:{variant}"] = _two_collect(model, opt, losses)
        # FSDP2, micro-batches (the NaN lands in the last rank's rows only)
        model = TwoMatrices()
        fully_shard(model, mesh=mesh)
        opt = two_matrices_optimizer(model, variant, layout="auto", process_group=mesh)
        lt = torch.tensor(two_matrices_run(model, opt, rank=rank, world=world, split=True,
                                           inject_nan=variant == "nan" and rank == world - 1))
        dist.all_reduce(lt)
        result[f"row_sharded:{variant}"] = _two_collect(model, opt, (lt / world).tolist())
    return result


def _two_collect(model, opt, losses) -> dict:
    mine = {"layout": type(opt.layout).__name__, "state_bytes": opt.layout.state_bytes(),
            "svd_count": opt.layout.svd_count, "sketch_count": getattr(opt.layout, "sketch_count", 0),
            "steps": {n: float(t) if (t := opt.state[p]["step"]).numel() == 1 else None  # None: a placeholder
                      for n, p in model.named_parameters()},
            "skipped": dict(opt.layout.skipped),
            "local_rows": {n: (p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0])
                           for n, p in model.named_parameters()}}
    return {"losses": losses, "params": full_params(model), "ranks": gather(mine)}


def save(model, opt, path: str) -> None:
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=OPTIONS)},
             checkpoint_id=path)


def load(model, opt, path: str) -> None:
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=OPTIONS)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=OPTIONS)


def _resume(ckpt: str, layout: str, data) -> dict:
    model, fwd, opt = build(layout, "ddp", RunConfig(steps=DCP_STEPS))
    load(model, opt, ckpt)
    keys = gather(sorted((k, tuple(sorted(v))) for k, v in get_optimizer_state_dict(model, opt)["state"].items()))
    losses = train_steps(fwd, opt, data[DCP_AT:], "ddp")
    return {"losses": losses, "params": full_params(model), "state_keys": keys}


def part_dcp_save(layout: str, ckpt: str) -> dict:
    data = batches(RunConfig(steps=DCP_STEPS))
    model, fwd, opt = build(layout, "ddp", RunConfig(steps=DCP_STEPS))
    train_steps(fwd, opt, data[:DCP_AT], "ddp")
    save(model, opt, ckpt)
    losses = train_steps(fwd, opt, data[DCP_AT:], "ddp")
    result = {"losses": losses, "params": full_params(model)}
    del model, fwd, opt
    result["resumed"] = _resume(ckpt, layout, data)
    return result


def part_dcp_load(ckpt: str, layout: str) -> dict:
    return _resume(ckpt, layout, batches(RunConfig(steps=DCP_STEPS)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--part", action="append", default=[], required=True)
    args = ap.parse_args()
    rank, _ = init_dist()
    results = {}
    for part in args.part:
        name, *rest = part.split(":")
        results[part] = {"train": part_train, "two": part_two, "dcp_save": part_dcp_save,
                         "dcp_load": part_dcp_load}[name](*rest)
    if rank == 0:
        torch.save(results, args.out)
    finish()


if __name__ == "__main__":
    main()
