"""DeepSpeed integration: ``"optimizer": {"type": "fira", "params": {...}}`` in a ds_config.

- ``fira_dist.deepspeed.initialize(...)``: same signature and return value as ``deepspeed.initialize``. With a
  "fira" optimizer block it validates the block and the ZeRO settings before anything starts (no process
  group needed), sets ``zero_allow_untested_optimizer``, and DeepSpeed builds ``fira_dist.Fira``.
- ``fira_dist.deepspeed.register()``: teaches DeepSpeed's engine the "fira" type, so a plain
  ``deepspeed.initialize(config=...)`` and a Hugging Face ``Trainer`` run with ``--deepspeed ds_config.json``
  build Fira too. Idempotent.

Either way the Fira optimizer gets the DeepSpeed layout (``fira_dist.layouts.flat_partition``): ZeRO 0-3,
fp32 or bf16 (fp32 master weights), each matrix's Fira state on one rank, updates written back into
DeepSpeed's partitions, and the engine's ``load_checkpoint`` loads a ZeRO-1/2/3 checkpoint at another
data-parallel world size or stage too (``fira_dist.ds_universal``). See docs/deepspeed.md for every key of the block.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
from typing import Any, Iterable, Mapping

import torch

from fira_dist.config import GROUP_DEFAULTS, GroupOptions, MomentumReset, normalize_group
from fira_dist.optimizer import Fira, param_groups

log = logging.getLogger(__name__)

WHERE = "ds_config optimizer.params"
DEFAULT_TARGET_MODULES = ("attn", "mlp")

# Every key the "params" block accepts, with its default (None: Fira's own default).
ACCEPTED_KEYS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "rank": 128,
    "update_proj_gap": GROUP_DEFAULTS["update_proj_gap"],
    "alpha": 0.25,
    "scale": None,  # galore-torch's name for alpha
    "proj_type": GROUP_DEFAULTS["proj_type"],
    "algorithm": GROUP_DEFAULTS["algorithm"],
    "limiter_gamma": GROUP_DEFAULTS["limiter_gamma"],
    "residual": GROUP_DEFAULTS["residual"],
    "projector": GROUP_DEFAULTS["projector"],
    "state_dtype": GROUP_DEFAULTS["state_dtype"],
    "correct_bias": True,
    "target_modules": DEFAULT_TARGET_MODULES,
    "comm_bucket_bytes": None,  # None: zero_optimization.reduce_bucket_size x the gradients' element size
    "momentum_reset_interval": None,  # K: zero moments and step counts every K engine steps (None: never)
    "recovery_steps": None,  # learning-rate ramp from 0.001x over this many updates after a reset (min(10, K - 1))
}
_HINTS = {"gamma": "limiter_gamma", "galore_scale": "alpha", "proj_gap": "update_proj_gap", "lowrank": "rank",
          "rank_r": "rank", "targets": "target_modules", "modules": "target_modules", "beta1": "betas",
          "beta2": "betas", "adam_w_mode": None, "torch_adam": None, "bucket_size": "comm_bucket_bytes",
          "reduce_bucket_size": "comm_bucket_bytes", "comm_bucket_size": "comm_bucket_bytes",
          "cycle_length": "momentum_reset_interval", "reset_interval": "momentum_reset_interval",
          "restart_every": "momentum_reset_interval", "recovery": "recovery_steps"}
_FIRA_ONLY = ("limiter_gamma", "residual")  # meaningless with algorithm "galore"


@dataclasses.dataclass(frozen=True)
class FiraBlock:
    """The validated ``params`` of a "fira" optimizer block."""

    defaults: dict[str, Any]  # Fira(...) keyword arguments (every group, and the optimizer-wide reset options)
    lowrank: dict[str, Any]  # keys of the low-rank group (rank, update_proj_gap, alpha, proj_type, ...)
    target_modules: tuple[str, ...]


def is_fira_name(name: Any) -> bool:
    return isinstance(name, str) and name.lower() == "fira"


def is_fira_config(config: Mapping[str, Any] | None) -> bool:
    opt = (config or {}).get("optimizer")
    return isinstance(opt, Mapping) and is_fira_name(opt.get("type"))


def parse_fira_block(params: Mapping[str, Any] | None, where: str = WHERE) -> FiraBlock:
    """Validate a "fira" block's ``params``; every error names the key, the value and what is accepted.

    ``"rank": null`` puts every parameter in one plain-Adam group (no low-rank matrices): Adam with Fira's
    momentum resets, e.g. for a low-rank factorized model (``fira_dist.lowrank``)."""
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(params).__name__}")
    params = dict(params or {})
    for key in params:
        if key not in ACCEPTED_KEYS:
            hint = _HINTS.get(key, "") if key in _HINTS else (difflib.get_close_matches(key, ACCEPTED_KEYS, 1, 0.6) or [""])[0]
            did = f" (did you mean {hint!r}?)" if hint else ""
            raise ValueError(f"{where} has unknown key {key!r}{did}; accepted keys: {', '.join(ACCEPTED_KEYS)}")
    for key, val in params.items():
        if isinstance(val, str) and val == "auto":
            raise ValueError(f"{where}[{key!r}]='auto' is not accepted here: 'auto' is filled in by the Hugging Face "
                             "Trainer only; give a value")
    budget = params.pop("comm_bucket_bytes", None)
    if budget is not None:
        from fira_dist.layouts.plan import check_comm_bucket_bytes

        budget = check_comm_bucket_bytes(budget, f"{where}['comm_bucket_bytes']")
    tm = params.pop("target_modules", DEFAULT_TARGET_MODULES)
    if isinstance(tm, str) or not isinstance(tm, (list, tuple)) or not tm or \
            not all(isinstance(t, str) and t for t in tm):
        raise ValueError(f"{where}['target_modules']={tm!r} is not accepted; expected a non-empty list of module-name "
                         "substrings, e.g. [\"attn\", \"mlp\"]")
    algorithm = params.get("algorithm", "fira")
    if isinstance(algorithm, str) and algorithm.lower() == "galore":
        for key in _FIRA_ONLY:
            if key in params:
                raise ValueError(f"{where}[{key!r}]={params[key]!r} is only used by algorithm 'fira'; with "
                                 "algorithm='galore' (low-rank Adam, no residual, no limiter) remove it")
    MomentumReset.from_values(params.get("momentum_reset_interval"), params.get("recovery_steps"),
                              f"{where}['momentum_reset_interval']", f"{where}['recovery_steps']")
    group = {k: (ACCEPTED_KEYS[k] if k not in params else params[k]) for k in ACCEPTED_KEYS
             if k not in ("target_modules", "scale", "comm_bucket_bytes")}
    if "scale" in params:
        group["scale"] = params["scale"]
        if "alpha" not in params:
            group.pop("alpha")
        else:
            group["alpha"] = params["alpha"]
    normalize_group(group, where)  # scale -> alpha; both and different is an error
    betas = group["betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
        raise ValueError(f"{where}['betas']={betas!r} is not accepted; expected a pair [beta1, beta2]")
    group["betas"] = tuple(betas)
    if group["limiter_gamma"] is not None and isinstance(group["limiter_gamma"], bool):
        raise ValueError(f"{where}['limiter_gamma']={group['limiter_gamma']!r} is not accepted; expected a number > 1 "
                         "or null (no limiter)")
    if not isinstance(group["correct_bias"], bool):
        raise ValueError(f"{where}['correct_bias']={group['correct_bias']!r} is not accepted; expected true or false")
    GroupOptions.from_group(group, where=where)  # ranges and enum values, named
    lowrank_keys = ("rank", "update_proj_gap", "alpha", "proj_type")
    defaults = {k: v for k, v in group.items() if k not in lowrank_keys}  # with the optimizer-wide reset options
    defaults["update_proj_gap"] = group["update_proj_gap"]
    defaults["alpha"] = group["alpha"]
    defaults["proj_type"] = group["proj_type"]
    if budget is not None:
        defaults["comm_bucket_bytes"] = budget
    return FiraBlock(defaults=defaults, lowrank={k: group[k] for k in lowrank_keys}, target_modules=tuple(tm))


def _device_of(section: Any) -> str:
    if isinstance(section, Mapping):
        return str(section.get("device", "none")).lower()
    return "none" if not section else "cpu"


def check_ds_config(config: Mapping[str, Any]) -> None:
    """Settings that cannot work with the "fira" optimizer, refused before training starts."""
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        return
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ds_config zero_optimization.stage={stage!r} is not accepted; expected 0, 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param", "cpu_offload"):
        dev = _device_of(zero.get(key))
        if dev not in ("none", "false"):
            raise ValueError(f"ds_config zero_optimization.{key} device={dev!r} is not supported with the 'fira' "
                             "optimizer; expected 'none' (Fira's state is already split across ranks; offload is "
                             "untested)")
    ckpt = config.get("checkpoint") or {}
    if isinstance(ckpt, Mapping) and ckpt.get("load_universal") and stage == 0:
        raise ValueError("ds_config checkpoint.load_universal=true is not accepted with the 'fira' optimizer under "
                         "ZeRO stage 0 (a ZeRO-0 checkpoint holds Fira's whole state and loads at any world size as "
                         "it is); expected false, or a zero_optimization.stage of 1-3 (Fira's universal checkpoints: "
                         "fira_dist.ds_universal)")
    if zero.get("elastic_checkpoint"):
        raise ValueError("ds_config zero_optimization.elastic_checkpoint=true is not supported with the 'fira' optimizer "
                         "(its per-matrix state does not follow the flat partition); expected false")


def build_optimizer(model: torch.nn.Module, block: FiraBlock, model_parameters: Iterable[Any] | None = None) -> Fira:
    """``fira_dist.Fira`` for ``model`` from a validated block: 2-D weights of nn.Linear modules whose name contains
    one of ``target_modules`` get the low-rank group, every other trainable parameter plain Adam. When
    ``model_parameters`` is given only those parameters are optimized, and a ``weight_decay`` that its groups set
    (as the Hugging Face Trainer's no-decay groups do) is kept per parameter. The layout is unbound: DeepSpeed binds
    it (``register()``)."""
    from fira_dist.layouts.flat_partition import FlatPartition

    allowed: set[int] | None = None
    wd_of: dict[int, float] = {}
    if model_parameters is not None:
        allowed = set()
        for item in model_parameters:
            if isinstance(item, Mapping):
                for p in item["params"]:
                    p = p[1] if isinstance(p, tuple) else p
                    allowed.add(id(p))
                    if "weight_decay" in item:
                        wd_of[id(p)] = float(item["weight_decay"])
            else:
                allowed.add(id(item[1] if isinstance(item, tuple) else item))
    low_keys = dict(block.lowrank)
    if low_keys["rank"] is None:  # "rank": null: one plain-Adam group
        groups = [{"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}]
    else:
        groups = param_groups(model, target_modules=block.target_modules, rank=low_keys.pop("rank"),
                              update_proj_gap=low_keys.pop("update_proj_gap"), alpha=low_keys.pop("alpha"),
                              proj_type=low_keys.pop("proj_type"))
    out = []
    for g in groups:
        params = [p for _, p in g["params"] if allowed is None or id(p) in allowed]
        extra = {k: v for k, v in g.items() if k != "params"}
        by_wd: dict[float | None, list] = {}
        for p in params:
            by_wd.setdefault(wd_of.get(id(p)), []).append(p)
        for wd, ps in by_wd.items():
            out.append({"params": ps, **extra, **({} if wd is None else {"weight_decay": wd})})
    if block.lowrank["rank"] is not None and not any(g.get("rank") for g in out if g["params"]):
        raise ValueError(f"{WHERE}['target_modules']={list(block.target_modules)!r} selected no trainable parameter")
    opt = Fira([g for g in out if g["params"]], layout="single", **block.defaults)
    opt.layout = FlatPartition(opt)
    return opt


def attach(engine: Any) -> None:
    """Give the engine's Fira the DeepSpeed layout and bind it to the engine's partitions."""
    from fira_dist.layouts.flat_partition import FlatPartition

    opt = engine.basic_optimizer
    if getattr(engine, "has_moe_layers", False):
        raise ValueError("fira: DeepSpeed MoE layers are not supported with the 'fira' optimizer")
    if type(engine).__name__ in ("PipelineEngine", "DualPipeVEngine"):
        raise ValueError("fira: DeepSpeed pipeline parallelism is not supported with the 'fira' optimizer")
    if not isinstance(opt.layout, FlatPartition):
        opt.layout = FlatPartition(opt)
    opt.layout.bind(engine)
    from fira_dist import ds_universal

    ds_universal.install(engine)  # engine.load_checkpoint also loads at another world size or ZeRO stage
    log.info("fira: DeepSpeed layout bound (%s, ZeRO stage %d, %d ranks)", opt.layout.mode, opt.layout.stage,
             opt.layout.comm.world_size)


_ORIGINAL: dict[str, Any] = {}


def register() -> None:
    """Teach ``deepspeed.runtime.engine.DeepSpeedEngine`` the "fira" optimizer type (idempotent).

    After it, ``deepspeed.initialize(config=...)`` with ``"optimizer": {"type": "fira", ...}`` builds
    ``fira_dist.Fira`` from the block (and a Hugging Face Trainer given such a config does too); a Fira passed as
    ``optimizer=`` gets the DeepSpeed layout as well.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    if _ORIGINAL:
        return
    _ORIGINAL["_is_supported_optimizer"] = DeepSpeedEngine._is_supported_optimizer
    _ORIGINAL["_configure_optimizer"] = DeepSpeedEngine._configure_optimizer

    def _is_supported_optimizer(self, optimizer_name):
        return is_fira_name(optimizer_name) or _ORIGINAL["_is_supported_optimizer"](self, optimizer_name)

    def _configure_optimizer(self, client_optimizer, model_parameters):
        if client_optimizer is None and is_fira_name(self._config.optimizer_name):
            block = parse_fira_block(self._config.optimizer_params)
            check_ds_config(self._config._param_dict)
            client_optimizer = build_optimizer(self.module, block, model_parameters)
        elif client_optimizer is not None and not isinstance(client_optimizer, torch.optim.Optimizer) \
                and callable(client_optimizer):
            client_optimizer = client_optimizer(model_parameters)
        if isinstance(client_optimizer, Fira):
            check_ds_config(self._config._param_dict)
            self._config.zero_allow_untested_optimizer = True
        _ORIGINAL["_configure_optimizer"](self, client_optimizer, model_parameters)
        if isinstance(self.basic_optimizer, Fira):
            attach(self)

    DeepSpeedEngine._is_supported_optimizer = _is_supported_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer


def unregister() -> None:
    """Undo ``register()``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name, fn in _ORIGINAL.items():
        setattr(DeepSpeedEngine, name, fn)
    _ORIGINAL.clear()


def _load_config(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return dict(load_ds_config(config))


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int = 29500, mpu: Any = None, dist_init_required: bool | None = None,
               collate_fn: Any = None, config: Any = None, mesh_param: Any = None, config_params: Any = None):
    """``deepspeed.initialize`` with the "fira" optimizer type: returns (engine, optimizer, dataloader, scheduler).

    A "fira" block is validated here, before the process group or the engine exist; errors name the key.
    """
    import deepspeed

    if config is None and config_params is not None:
        config, config_params = config_params, None
    from_args = config is None and getattr(args, "deepspeed_config", None) is not None
    raw = args.deepspeed_config if from_args else config
    if raw is not None:
        cfg = _load_config(raw)
        if is_fira_config(cfg) or isinstance(optimizer, Fira):
            if optimizer is None:
                parse_fira_block(cfg["optimizer"].get("params"))
            check_ds_config(cfg)
            cfg["zero_allow_untested_optimizer"] = True
            config = cfg
            if from_args:
                args = copy.copy(args)
                args.deepspeed_config = None
    register()
    return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                training_data=training_data, lr_scheduler=lr_scheduler,
                                distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
                                collate_fn=collate_fn, config=config, mesh_param=mesh_param)


def fira_state_bytes(engine: Any) -> int:
    """Bytes of Fira optimizer state on this rank (for memory checks)."""
    return engine.basic_optimizer.layout.state_bytes()


__all__ = ["initialize", "register", "unregister", "parse_fira_block", "check_ds_config", "build_optimizer",
           "FiraBlock", "ACCEPTED_KEYS", "fira_state_bytes"]
