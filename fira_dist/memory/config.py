"""A training configuration to estimate or measure (``MemoryConfig``), and the element sizes it implies."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from fira_dist.layouts.plan import DEFAULT_COMM_BUCKET_BYTES, check_comm_bucket_bytes

STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp2")
OPTIMIZERS = ("adamw", "galore", "fira", "lowrank")  # lowrank: the factorized model (fira_dist.lowrank), plain Adam
PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")  # all but eager: no (s, s) matrix kept
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

# The keys every configuration carries (bytes per rank); finer keys are listed in ``estimate``.
MAIN_KEYS = ("params", "grads", "master_params", "optimizer_states", "activations", "comm_buffers", "peak")

# DeepSpeed 0.19 defaults (deepspeed/runtime/zero/config.py), overridable in MemoryConfig.
DS_REDUCE_BUCKET_SIZE = 500_000_000
DS_PREFETCH_BUCKET_SIZE = 50_000_000
DS_PARAM_PERSISTENCE_THRESHOLD = 100_000
DS_SUB_GROUP_SIZE = 1_000_000_000


@dataclasses.dataclass(kw_only=True)
class MemoryConfig:
    """One training configuration. Every field has a CLI flag of the same name (dashes for underscores).

    precision:
      "fp32"        fp32 weights, gradients, activations.
      "bf16-mixed"  the usual mixed precision of each strategy: single/DDP: fp32 weights + torch.autocast
                    bf16 (weights are their own master copy); DeepSpeed: bf16 weights and gradients + fp32
                    master partition; FSDP2: fp32 shards + MixedPrecisionPolicy(param_dtype=bf16,
                    reduce_dtype=fp32).
      "bf16-pure"   bf16 weights and gradients, no master copy (as the GaLore / Fira papers' memory
                    figures assume); not available under DeepSpeed, which always keeps fp32 masters.
    state_dtype: dtype of the optimizer moments and projectors. None: fp32 for Fira/GaLore
      (``Fira(state_dtype="float32")``), and for AdamW the dtype of the tensors it updates (torch's
      ``zeros_like``): the fp32 master / shard, or bf16 under "bf16-pure".
    """

    model: str = "llama_7b"
    optimizer: str = "fira"
    rank: int | None = None  # None: the model's Fira rank (fira_dist.models), else 128
    target_modules: tuple[str, ...] = ("attn", "mlp")
    proj_type: str = "std"
    strategy: str = "single"
    world_size: int = 1
    precision: str = "bf16-mixed"
    state_dtype: str | None = None
    micro_batch: int = 1
    seq_len: int | None = None  # None: the model's pretraining sequence length (256 for the papers' runs)
    activation_checkpointing: bool = False
    attention: str = "sdpa"
    vocab_size: int | None = None
    ddp_bucket_view: bool = False  # DDP(gradient_as_bucket_view=True): gradients live in the buckets
    zero_reduce_bucket_size: int = DS_REDUCE_BUCKET_SIZE
    zero_overlap_comm: bool | None = None  # None: DeepSpeed's default (False for ZeRO-1/2, True for ZeRO-3)
    zero3_prefetch_bucket_size: int = DS_PREFETCH_BUCKET_SIZE
    zero3_param_persistence_threshold: int = DS_PARAM_PERSISTENCE_THRESHOLD
    zero3_sub_group_size: int = DS_SUB_GROUP_SIZE
    comm_bucket_bytes: int | None = None  # Fira's exchange budget; None: its default (see comm_budget)
    device: str = "cuda"  # "cuda" | "cpu": torch.optim.AdamW's default is foreach on CUDA, a loop per tensor on CPU

    def __post_init__(self) -> None:
        def one_of(name: str, accepted: Sequence[str]) -> None:
            v = getattr(self, name)
            if v not in accepted:
                raise ValueError(f"{name}={v!r} is not accepted; expected one of {', '.join(map(repr, accepted))}")

        self.optimizer = str(self.optimizer).lower()
        self.strategy = str(self.strategy).lower()
        one_of("optimizer", OPTIMIZERS)
        one_of("strategy", STRATEGIES)
        one_of("precision", PRECISIONS)
        one_of("attention", ATTENTIONS)
        one_of("device", ("cuda", "cpu"))
        if self.state_dtype is not None:
            one_of("state_dtype", ("fp32", "bf16"))
        for name in ("world_size", "micro_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is not accepted; expected an integer >= 1")
        for name in ("rank", "seq_len", "vocab_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} is not accepted; expected an integer >= 1 (or None)")
        if self.strategy == "single" and self.world_size != 1:
            raise ValueError(f"world_size={self.world_size} is not accepted with strategy='single'; expected 1")
        if self.strategy.startswith("zero") and self.precision == "bf16-pure":
            raise ValueError(f"precision='bf16-pure' is not accepted with strategy={self.strategy!r}: DeepSpeed "
                             "keeps fp32 master weights; use 'bf16-mixed' or 'fp32'")
        if self.strategy.startswith("zero") and self.state_dtype == "bf16":
            raise ValueError(f"state_dtype='bf16' is not accepted with strategy={self.strategy!r}: under DeepSpeed the "
                             "optimizer updates fp32 partitions and keeps fp32 state")
        if self.comm_bucket_bytes is not None:
            self.comm_bucket_bytes = check_comm_bucket_bytes(self.comm_bucket_bytes, "comm_bucket_bytes")
        self.target_modules = tuple(self.target_modules)

    def replace(self, **kw: Any) -> "MemoryConfig":
        return dataclasses.replace(self, **kw)


def dtypes(cfg: MemoryConfig) -> dict[str, int]:
    """Element sizes: weights the model holds (w), gradients (g), master copy (m, 0 = none),
    activation pattern ("fp32" | "pure" | "autocast"), and what the optimizer updates (o)."""
    s, p = cfg.strategy, cfg.precision
    if p == "fp32":
        return {"w": 4, "g": 4, "m": 4 if s.startswith("zero") else 0, "o": 4, "act": "fp32"}
    if p == "bf16-pure":
        return {"w": 2, "g": 2, "m": 0, "o": 2, "act": "pure"}
    # bf16-mixed
    if s.startswith("zero"):
        return {"w": 2, "g": 2, "m": 4, "o": 4, "act": "pure"}
    if s == "fsdp2":  # fp32 shards (the master), bf16 unsharded compute weights, fp32 reduce
        return {"w": 4, "g": 4, "m": 0, "o": 4, "act": "pure"}
    return {"w": 4, "g": 4, "m": 0, "o": 4, "act": "autocast"}  # single / DDP: fp32 weights + autocast


def state_bytes(cfg: MemoryConfig, dt: dict[str, Any]) -> int:
    if cfg.strategy.startswith("zero"):
        return 4  # the optimizer updates DeepSpeed's fp32 flat partitions
    if cfg.state_dtype is not None:
        return DTYPE_BYTES[cfg.state_dtype]
    return 4 if cfg.optimizer in ("fira", "galore", "lowrank") else dt["o"]




def comm_budget(cfg: MemoryConfig) -> int:
    """Fira's ``comm_bucket_bytes`` in this configuration: as given, else under DeepSpeed its reduce bucket in the
    gradients' dtype (what ``FlatPartition.bind`` derives), else the layouts' default."""
    if cfg.comm_bucket_bytes is not None:
        return cfg.comm_bucket_bytes
    if cfg.strategy.startswith("zero"):
        return cfg.zero_reduce_bucket_size * dtypes(cfg)["g"]
    return DEFAULT_COMM_BUCKET_BYTES


def rank_of(cfg: MemoryConfig, default: int) -> int:
    return cfg.rank if cfg.rank is not None else default
