"""Shared by tests/test_lowrank.py (one-process references) and tests/dist_workers/lowrank_worker.py (ranks):
the jobs, the model (tests/ds_common.py's tiny LLaMA, optionally factorized), the optimizer and one training loop
for every strategy (single, ddp, fsdp2, deepspeed) on the same global batch.

A job is a dict: {"name", "strategy", "method": "lowrank" (factorized, plain Adam, refactorized at each reset) |
"fira" (Fira low-rank groups), "steps", "batch" (global), "K" (momentum_reset_interval), "R" (recovery_steps),
"stage" (ZeRO), "persist" (ZeRO-3 persistent parameters), "save_at" / "resume" (checkpoint after / resume from that step), "ckpt" (a folder)}.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ds_common import FIRA_PARAMS, ds_config, make_batches, tiny_llama

RANK, ALPHA = 8, 16.0  # factor rank (min dimension of the tiny LLaMA's matrices is 64) and alpha
ADAM = {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}


def job(name: str, strategy: str, method: str = "lowrank", **kw: Any) -> dict[str, Any]:
    return {"name": name, "strategy": strategy, "method": method, "steps": 8, "batch": 12, "K": 3, "R": 2, **kw}


def fira_block(j: dict[str, Any]) -> dict[str, Any]:
    """The ds_config "fira" params (and, through parse_fira_block, the Fira arguments) of a job."""
    if j["method"] == "lowrank":
        params = {**ADAM, "rank": None}
    else:
        params = copy.deepcopy(FIRA_PARAMS)
    params.update(momentum_reset_interval=j["K"], recovery_steps=j["R"])
    return params


def build_model(j: dict[str, Any]):
    from fira_dist import lowrank

    model = tiny_llama(j.get("seed", 0))
    if j["method"] == "lowrank":
        lowrank.factorize(model, ("attn", "mlp"), rank=RANK, alpha=ALPHA)
    return model


def build_optimizer(model, j: dict[str, Any], layout: str = "auto"):
    from fira_dist.deepspeed import build_optimizer as ds_build, parse_fira_block

    opt = ds_build(model, parse_fira_block(fira_block(j)))  # the same groups as under DeepSpeed
    from fira_dist.layouts import make_layout

    opt.layout = make_layout(opt, layout, None)
    return opt


def local_batch(tokens: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = tokens.shape[0] // world
    return tokens[rank * per:(rank + 1) * per]


def full_params(model, engine=None, stage: int | None = None) -> dict[str, torch.Tensor]:
    if engine is not None and stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).float().clone()
    return out


def products(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per factorized module: B A_T^T (m, n) in float64 (what the model computes with, up to alpha / r)."""
    return {n[:-2]: params[n].double() @ params[n[:-1] + "A_T"].double().t() for n in params if n.endswith(".B")}


def train(j: dict[str, Any], model, fwd, opt, *, rank: int = 0, world: int = 1, engine=None,
          start: int = 0, stop: int | None = None, on_step=None) -> list[float]:
    """Steps [start, stop) of job j on the global batches (each rank its share; losses are global means).
    After every step that completes a reset interval, a lowrank job refactorizes its factors (then the optimizer's
    next step resets the moments)."""
    import torch.distributed as dist

    from fira_dist import lowrank

    fira = engine.basic_optimizer if engine is not None else opt
    data = make_batches(j["steps"], j["batch"], j.get("seed", 0))
    losses = []
    for step in range(start, j["steps"] if stop is None else stop):
        tokens = data[step] if world == 1 or j["strategy"] == "single" else local_batch(data[step], rank, world)
        loss = fwd(input_ids=tokens, labels=tokens).loss
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if j["method"] == "lowrank" and fira.momentum_reset_due():
            lowrank.refactorize(model, engine=engine)
        loss = loss.detach().float()
        if world > 1 and j["strategy"] != "single":
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
        if on_step is not None:
            on_step(step + 1)
    return losses


def run_single(j: dict[str, Any], stop: int | None = None) -> dict[str, Any]:
    """The reference: one process, the whole global batch, layout 'single'."""
    model = build_model(j)
    opt = build_optimizer(model, j, layout="single")
    losses = train(j, model, model, opt, stop=stop)
    return {"losses": losses, "params": full_params(model), "model": model, "opt": opt}


def ds_job_config(j: dict[str, Any], world: int) -> dict[str, Any]:
    cfg = ds_config(j["stage"], micro=j["batch"] // world, gas=1, world=world, fira=fira_block(j))
    if j.get("persist"):  # ZeRO-3 keeps parameters below the threshold gathered (DeepSpeed's default 1e5)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 100_000
    return cfg
