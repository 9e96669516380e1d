"""``--strategy deepspeed``: the flags merged into the ds_config (the config wins; the CLI fills what it lacks).

Its optimizer block (``"type": "fira"`` with ``params``), batch sizes, ``bf16`` and ``gradient_clipping`` are used
as written; an ``optimizer`` block is added from --optimizer/--lr/--rank/... when there is none. An explicitly given
batch flag that disagrees with the config is an error; other disagreeing flags are ignored with a warning.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from fira_dist.pretrain.train_utils import UsageError, flag_error as _flag

ADAM_EPS = 1e-8  # torch AdamW's eps, for the plain-Adam fira_dist.Fira of lowrank (and adamw with resets)


def merge_ds_config(args, explicit, launch, notes, *, optimizer, lr, weight_decay, rank, update_proj_gap, alpha,
                     grad_clip, mbs, grad_accum, bf16, target_modules, total, reset_interval, recovery_steps):
    """Read, validate and complete the ds_config. Returns the merged dict and the values the run will use."""
    path = args.deepspeed
    src = f"--deepspeed={path!r}"
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{src} is not accepted: no such file; expected a ds_config JSON file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{src} is not accepted: cannot read it as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{src} is not accepted: expected a JSON object, got {type(raw).__name__}")
    cfg = copy.deepcopy(raw)
    world = launch.world_size

    def conflict(key: str, flag: str, cli: Any, conf: Any, hard: bool) -> None:
        msg = f"{src}: {key}={conf!r} disagrees with --{flag}={cli!r}"
        if hard:
            raise UsageError(msg + "; remove one of them or make them agree (the ds_config wins when the flag is "
                                   "not given)")
        notes.append(msg + f"; the ds_config wins (--{flag} ignored)")

    def num(key: str, conf: Any) -> int:
        if isinstance(conf, bool) or not isinstance(conf, int) or conf < 1:
            raise UsageError(f"{src}: {key}={conf!r} is not accepted; expected an integer >= 1 or \"auto\"")
        return conf

    # batch sizes
    conf_mbs = cfg.get("train_micro_batch_size_per_gpu", "auto")
    if conf_mbs != "auto":
        conf_mbs = num("train_micro_batch_size_per_gpu", conf_mbs)
        if "micro-batch-size" in explicit and conf_mbs != mbs:
            conflict("train_micro_batch_size_per_gpu", "micro-batch-size", mbs, conf_mbs, hard=True)
        mbs = conf_mbs
    conf_gas = cfg.get("gradient_accumulation_steps", "auto")
    conf_tbs = cfg.get("train_batch_size", "auto")
    if conf_gas != "auto":
        conf_gas = num("gradient_accumulation_steps", conf_gas)
        if "grad-accum" in explicit and conf_gas != grad_accum:
            conflict("gradient_accumulation_steps", "grad-accum", grad_accum, conf_gas, hard=True)
        grad_accum = conf_gas
    elif conf_tbs != "auto":
        conf_tbs = num("train_batch_size", conf_tbs)
        if conf_tbs % (mbs * world):
            raise UsageError(f"{src}: train_batch_size={conf_tbs} is not a multiple of micro-batch x world size = "
                             f"{mbs} x {world}")
        grad_accum = conf_tbs // (mbs * world)
    elif total is not None:
        if total % (mbs * world):
            raise _flag("total-batch-size", total, f"a multiple of micro-batch x world size = {mbs} x {world}")
        grad_accum = total // (mbs * world)
    if total is not None and total != mbs * grad_accum * world:
        conflict("train_batch_size", "total-batch-size", total, mbs * grad_accum * world, hard=True)
    if conf_tbs != "auto" and conf_tbs != mbs * grad_accum * world:
        raise UsageError(f"{src}: train_batch_size={conf_tbs} is not accepted; expected train_micro_batch_size_per_gpu "
                         f"x gradient_accumulation_steps x world size = {mbs} x {grad_accum} x {world} = "
                         f"{mbs * grad_accum * world}")
    cfg["train_micro_batch_size_per_gpu"] = mbs
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = mbs * grad_accum * world

    # precision
    if (cfg.get("fp16") or {}).get("enabled"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{src}: fp16.enabled=true is not accepted on CPU (DeepSpeed's fp16 needs a GPU); expected "
                             "bf16 or fp32")
        if bf16:
            conflict("fp16.enabled", "bf16", True, True, hard=True)
    bf16_block = cfg.get("bf16")
    if isinstance(bf16_block, dict) and "enabled" in bf16_block:
        if "bf16" in explicit and bool(bf16_block["enabled"]) != bf16:
            conflict("bf16.enabled", "bf16", bf16, bf16_block["enabled"], hard=False)
        bf16 = bool(bf16_block["enabled"])
    else:
        cfg["bf16"] = {**(bf16_block or {}), "enabled": bf16}

    # clipping
    if "gradient_clipping" in cfg:
        gc = cfg["gradient_clipping"]
        if isinstance(gc, bool) or not isinstance(gc, (int, float)) or not math.isfinite(gc) or gc < 0:
            raise UsageError(f"{src}: gradient_clipping={gc!r} is not accepted; expected a number >= 0 (0: off)")
        if "grad-clip" in explicit and cfg["gradient_clipping"] != grad_clip:
            conflict("gradient_clipping", "grad-clip", grad_clip, cfg["gradient_clipping"], hard=False)
        grad_clip = float(cfg["gradient_clipping"])
    else:
        cfg["gradient_clipping"] = grad_clip

    # ZeRO
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise UsageError(f"{src}: zero_optimization must be a JSON object")
    zero_stage = zero.get("stage", 0)
    if zero_stage not in (0, 1, 2, 3):
        raise UsageError(f"{src}: zero_optimization.stage={zero_stage!r} is not accepted; expected 0, 1, 2 or 3")

    # optimizer: the config's block wins; the CLI fills what it lacks. lowrank (and adamw with resets) is Fira's plain
    # Adam: a "fira" block with "rank": null (no low-rank groups)
    adam_via_fira = optimizer == "lowrank" or (optimizer == "adamw" and reset_interval is not None)
    resets = {"momentum_reset_interval": ("momentum-reset-interval", reset_interval),
              "recovery_steps": ("recovery-steps", recovery_steps)} if reset_interval is not None else {}
    block = cfg.get("optimizer")
    if block is None:
        if optimizer == "adamw" and reset_interval is None:
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                             "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}}
        else:
            params = {"lr": lr, "weight_decay": weight_decay}
            if adam_via_fira:
                params.update(rank=None, eps=ADAM_EPS)
            else:
                params.update(rank=rank, update_proj_gap=update_proj_gap, alpha=alpha, target_modules=list(target_modules))
            if optimizer == "galore":
                params["algorithm"] = "galore"
            params.update({key: value for key, (_, value) in resets.items()})
            cfg["optimizer"] = {"type": "fira", "params": params}
    else:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise UsageError(f"{src}: optimizer must be an object with a \"type\" (e.g. \"fira\")")
        params = block.setdefault("params", {})
        if not isinstance(params, dict):
            raise UsageError(f"{src}: optimizer.params must be a JSON object")
        kind = block["type"].lower()
        if kind == "fira":
            if optimizer == "lowrank":
                if params.get("rank", None) is not None:
                    raise UsageError(f"{src}: optimizer.params.rank={params['rank']!r} is not accepted with --optimizer "
                                     "lowrank; expected null (the factorized model is trained with plain Adam; --rank "
                                     "sets the factors' rank)")
                params["rank"] = None
                params.setdefault("eps", ADAM_EPS)
            if "rank" in params and params["rank"] is None:
                block_opt = "lowrank" if optimizer == "lowrank" else "adamw"
                fill = {"lr": ("lr", lr), "weight_decay": ("weight-decay", weight_decay)}
            else:
                block_opt = "galore" if str(params.get("algorithm", "fira")).lower() == "galore" else "fira"
                fill = {"lr": ("lr", lr), "weight_decay": ("weight-decay", weight_decay), "rank": ("rank", rank),
                        "update_proj_gap": ("update-proj-gap", update_proj_gap), "alpha": ("alpha", alpha),
                        "target_modules": ("target-modules", list(target_modules))}
                if "alpha" not in params and "scale" in params:
                    fill.pop("alpha")
                if "algorithm" not in params and optimizer == "galore":
                    params["algorithm"] = "galore"
                    block_opt = "galore"
            if "optimizer" in explicit and optimizer != block_opt:
                conflict("optimizer.params.rank" if block_opt in ("adamw", "lowrank") else "optimizer.params.algorithm",
                         "optimizer", optimizer, block_opt, hard=False)
            fill.update(resets)
            for key, (flag, value) in fill.items():
                if key in params:
                    if flag in explicit and params[key] != value:
                        conflict(f"optimizer.params.{key}", flag, value, params[key], hard=False)
                else:
                    params[key] = value
            optimizer = block_opt
            try:
                from fira_dist.deepspeed import check_ds_config, parse_fira_block

                fb = parse_fira_block(params)
                check_ds_config(cfg)  # offload, elastic checkpoints: refused now, not after start-up
            except ImportError:
                fb = None
            except ValueError as e:
                raise UsageError(f"{src}: {e}") from None
            if fb is not None:
                lr, weight_decay = fb.defaults["lr"], fb.defaults["weight_decay"]
                from fira_dist.config import MomentumReset

                mr = MomentumReset.from_values(fb.defaults["momentum_reset_interval"], fb.defaults["recovery_steps"],
                                               "momentum_reset_interval", "recovery_steps")  # validated already
                reset_interval, recovery_steps = mr.interval, mr.recovery_steps
                if fb.lowrank["rank"] is not None:
                    rank, update_proj_gap, alpha = fb.lowrank["rank"], fb.lowrank["update_proj_gap"], fb.lowrank["alpha"]
                    target_modules = tuple(fb.target_modules)  # what the run uses (the dry run checks these)
        elif kind in ("adamw", "adam"):
            if reset_interval is not None:
                raise UsageError(f"{src}: optimizer.type={block['type']!r} is not accepted with "
                                 f"--momentum-reset-interval={reset_interval}; expected \"fira\" (with \"rank\": null "
                                 "it is Adam with momentum resets), or remove the optimizer block")
            if optimizer == "lowrank":
                notes.append(f"{src}: optimizer.type={block['type']!r}: the factorized model is trained with "
                             "DeepSpeed's Adam")
            else:
                if "optimizer" in explicit and optimizer != "adamw":
                    conflict("optimizer.type", "optimizer", optimizer, block["type"], hard=False)
                optimizer = "adamw"
            if "lr" not in params:
                params["lr"] = lr
            lr = params["lr"]
            params.setdefault("torch_adam", True)
        else:
            raise UsageError(f"{src}: optimizer.type={block['type']!r} is not accepted; expected \"fira\" (Fira or, "
                             "with params.algorithm \"galore\", GaLore; with params.rank null, Adam) or \"AdamW\"")
    ds_scheduler = "scheduler" in cfg
    if ds_scheduler:
        notes.append(f"{src} has a scheduler block: DeepSpeed's scheduler sets the learning rate "
                     "(--warmup-steps / --min-lr-ratio ignored)")
    cfg.setdefault("steps_per_print", 2**31 - 1)
    cfg.setdefault("wall_clock_breakdown", False)
    return (cfg, zero_stage, ds_scheduler, optimizer, lr, weight_decay, rank, update_proj_gap, alpha, grad_clip,
            mbs, grad_accum, bf16, target_modules, reset_interval, recovery_steps)


# ----------------------------------------------------------------------------------------------- dry run
