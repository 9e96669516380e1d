"""Per-rank memory of a training configuration: estimate (any size, no allocation) and the CLI.

``fira-dist memory --model llama_7b --optimizer fira --rank 64 --strategy zero2 --world-size 64`` prints
one rank's bytes of parameters, gradients, master weights, optimizer states (projectors and moments
apart), activations, communication buffers and the peak. ``--compare`` tabulates optimizers x strategies,
``--sweep-world-size`` world sizes, ``--json`` / ``--markdown`` print machine-readable figures / a table,
``--plot F.png`` draws one stacked bar per configuration (what is alive at its peak), ``--measure`` runs real
steps and prints measured next to estimated (memory_measure.py). docs/memory.md has the 7B tables.

Where the numbers come from (nothing here is a hand-kept table of model sizes):

- Shapes: the real ``LlamaForCausalLM`` built on the meta device (``fira_dist.pretrain.models``), and the
  real param groups (``fira_dist.param_groups``: which matrices are low rank).
- Optimizer state: the shapes the optimizer allocates (``projector.projector_shape`` /
  ``lowrank_shape``, ``side_for``), placed on ranks by the rules each layout uses: the owner maps
  (``layouts.owners.assign_owners`` on ``lowrank_state_numel``) and row splits of ``Replicated`` (DDP), the
  owner map and partition pieces of ``FlatPartition`` (ZeRO), the row/column shards of ``RowSharded``
  (FSDP2). The tests check these bytes against the optimizer's actual state tensors, exactly, on 2 processes
  and, through the layouts' own planning code on the meta device, at 8 and 64 ranks.
- Parameters, gradients and master weights: the framework's own sizing rules (DeepSpeed's flat-buffer
  alignment, ZeRO-3's per-parameter padding and persistence threshold, FSDP2's padded dim-0 shards,
  DDP's gradient buckets), each quoted where it is used.
- Activations: what HF LLaMA saves for backward, per token and layer, derived op by op in
  ``activation_bytes`` and checked exactly against ``saved_tensors_hooks`` in the tests.

Byte figures are per rank. The optimizer-state, parameter, gradient, master-weight and saved-activation
figures are exact for what the tests cover; buffers, transients and "peak" (the high-water mark of one
step, see ``_peak``) are estimates, checked against the CPU allocator's high-water mark (docs/memory.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from typing import Any, Iterable, Sequence

from fira_dist.layouts.owners import assign_owners, lowrank_state_numel
from fira_dist.projector import effective_rank, lowrank_shape, projector_shape, side_for

STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp2")
OPTIMIZERS = ("adamw", "galore", "fira")
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
    rank: int | None = None  # None: the model's Fira rank (fira_dist.pretrain.models), else 128
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
        self.target_modules = tuple(self.target_modules)

    def replace(self, **kw: Any) -> "MemoryConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------- model shapes
@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter as the optimizer sees it (logical, unsharded shape)."""

    name: str
    shape: tuple[int, ...]
    low_rank: bool  # in the group with ``rank`` and 2-D: projected
    unit: str  # the FSDP2 / ZeRO-3 gather unit: "model.layers.<i>" or "" (the root module)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Shapes of a LLaMA model and its optimizer param groups (indices into ``params``, in group order)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    max_positions: int
    params: tuple[ParamInfo, ...]
    groups: tuple[tuple[int, ...], ...]
    default_rank: int
    default_seq_len: int

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def lowrank(self) -> list[ParamInfo]:
        """The projected matrices in the optimizer's task order (group order, then order in the group)."""
        return [self.params[i] for g in self.groups for i in g if self.params[i].low_rank]


def _llama_config(model: str, vocab_size: int | None):
    try:
        from fira_dist.pretrain.models import get_model_config
    except ImportError:  # pragma: no cover - the models module is part of the package
        from transformers import LlamaConfig

        return LlamaConfig.from_json_file(model)
    return get_model_config(model, vocab_size=vocab_size)


def _meta_model(config):
    try:
        from fira_dist.pretrain.models import build_model
    except ImportError:  # pragma: no cover
        import torch
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(config)
    return build_model(config, device="meta")


def _model_defaults(model: str) -> tuple[int | None, int | None]:
    """(Fira rank, sequence length) of a named model's pretraining recipe, or (None, None)."""
    try:
        from fira_dist.pretrain.models import get_spec

        spec = get_spec(model)
        return spec.fira.rank, spec.fira.seq_len
    except (ImportError, ValueError, AttributeError):
        return None, None


@functools.lru_cache(maxsize=64)
def model_info(model: str, optimizer: str = "fira", rank: int = 128, target_modules: tuple[str, ...] = ("attn", "mlp"),
               vocab_size: int | None = None) -> ModelInfo:
    """Shapes of ``model`` (a name of ``fira_dist.pretrain.models`` or a config.json), built on the meta
    device: nothing is allocated, llama_7b takes about a second. Cached."""
    config = _llama_config(model, vocab_size)
    module = _meta_model(config)
    d_rank, d_seq = _model_defaults(model)
    return model_info_from_module(module, optimizer, rank, target_modules, name=model, config=config,
                                  default_rank=d_rank or 128, default_seq_len=d_seq or 256)


def model_info_from_module(module: Any, optimizer: str = "fira", rank: int = 128,
                           target_modules: Iterable[str] = ("attn", "mlp"), *, name: str | None = None,
                           config: Any = None, default_rank: int = 128, default_seq_len: int = 256) -> ModelInfo:
    """``ModelInfo`` of a built model (meta, real, or already sharded: DTensor shapes are global).

    The param groups are those ``fira_dist.param_groups`` builds (low rank: 2-D weights of the
    ``target_modules`` linears; the rest plain Adam) for galore/fira, and one group for adamw.
    """
    from fira_dist.optimizer import param_groups

    config = config if config is not None else getattr(module, "config", None)
    named = []
    seen: set[int] = set()
    for pname, p in module.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        named.append((pname, p))
    index = {id(p): i for i, (_, p) in enumerate(named)}
    if optimizer == "adamw":
        low_ids: set[int] = set()
        groups = (tuple(range(len(named))),)
    else:
        pg = param_groups(module, target_modules=tuple(target_modules), rank=rank)
        low_ids = {id(p) for g in pg if g.get("rank") is not None for _, p in g["params"]}
        groups = tuple(tuple(index[id(p)] for _, p in g["params"]) for g in pg)
    params = []
    for pname, p in named:
        parts = pname.split(".")
        unit = ".".join(parts[:3]) if len(parts) > 3 and parts[1] == "layers" and parts[2].isdigit() else ""
        shape = tuple(int(s) for s in p.shape)
        params.append(ParamInfo(pname, shape, id(p) in low_ids and len(shape) == 2, unit))
    h = int(getattr(config, "hidden_size"))
    heads = int(getattr(config, "num_attention_heads"))
    return ModelInfo(
        name=name or type(module).__name__, hidden=h, intermediate=int(config.intermediate_size), heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or h // heads), layers=int(config.num_hidden_layers),
        vocab=int(config.vocab_size), max_positions=int(config.max_position_embeddings), params=tuple(params),
        groups=groups, default_rank=default_rank, default_seq_len=default_seq_len,
    )


# ----------------------------------------------------------------------------------------------- dtypes
def _bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def _dtypes(cfg: MemoryConfig) -> dict[str, int]:
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


def _state_bytes(cfg: MemoryConfig, dt: dict[str, Any]) -> int:
    if cfg.strategy.startswith("zero"):
        return 4  # the optimizer updates DeepSpeed's fp32 flat partitions
    if cfg.state_dtype is not None:
        return _bytes(cfg.state_dtype)
    return 4 if cfg.optimizer in ("fira", "galore") else dt["o"]


# ----------------------------------------------------------------------------------------------- sharding rules
def fsdp2_rows(dim0: int, world_size: int, rank: int) -> int:
    """Rows of a dim-0 FSDP2 shard (``torch.chunk`` semantics: ceil-sized chunks, trailing ranks may get 0)."""
    c = -(-dim0 // world_size)
    return max(0, min(c, dim0 - rank * c))


def fsdp2_padded_rows(dim0: int, world_size: int) -> int:
    """Rows every rank allocates for a dim-0 FSDP2 shard (padded to ceil(dim0 / W), _fsdp_param.py)."""
    return -(-dim0 // world_size)


def zero12_partition(group_numels: Sequence[int], world_size: int, alignment_factor: int = 2) -> tuple[int, int]:
    """(aligned flat numel, partition numel) of one DeepSpeed ZeRO-1/2 param group (stage_1_and_2.py:
    ``alignment = nccl_start_alignment_factor * dp_size``; ``aligned_numel = ceil(numel / alignment) *
    alignment``; partition = aligned / dp_size; parameter_alignment off, the default)."""
    a = alignment_factor * world_size
    aligned = -(-sum(group_numels) // a) * a
    return aligned, aligned // world_size


def zero3_partition_numel(numel: int, world_size: int) -> int:
    """Elements of one parameter's ZeRO-3 partition (partition_parameters.py ``_aligned_size``: padded to a
    multiple of the world size)."""
    return -(-numel // world_size)


def lowrank_owners(info: ModelInfo, rank: int, proj_type: str, world_size: int, state_bytes: int = 4) -> list[int]:
    """Owner of each low-rank matrix (in ``info.lowrank()`` order) under ``Replicated`` (DDP)."""
    owners = replicated_owners(info, rank, proj_type, world_size, state_bytes)
    return [owners[i] for g in info.groups for i in g if info.params[i].low_rank]


def replicated_owners(info: ModelInfo, rank: int, proj_type: str, world_size: int, state_bytes: int = 4) -> dict[int, int]:
    """Owner of each parameter (index into ``info.params``) under ``layouts.replicated.Replicated`` (DDP,
    ZeRO-0), as ``Replicated._ensure_plan``: the low-rank matrices by greedy LPT (``assign_owners``) on their
    state bytes (``lowrank_state_numel`` x state itemsize), in param-group order; a 0-d elementwise tensor on
    rank 0; every other elementwise tensor -1: split by rows over all ranks (``fsdp2_rows``)."""
    order = [i for g in info.groups for i in g]
    mats = [i for i in order if info.params[i].low_rank]
    costs = [lowrank_state_numel(info.params[i].shape, rank, side_for(info.params[i].shape, proj_type)) * state_bytes
             for i in mats]
    owner = {i: (-1 if info.params[i].shape else 0) for i in order if not info.params[i].low_rank}
    owner.update(zip(mats, assign_owners(costs, world_size)))
    return owner


def _rows_numel(p: ParamInfo, world_size: int, r: int) -> int:
    """Elements of p in rank r's rows (torch.chunk split of dim 0)."""
    return fsdp2_rows(p.shape[0], world_size, r) * (p.numel // p.shape[0])


# ----------------------------------------------------------------------------------------------- optimizer state
def _lowrank_parts(shape: tuple[int, int], rank: int, proj_type: str) -> tuple[int, int]:
    """(projector numel, one moment's numel) of a whole matrix."""
    side = side_for(shape, proj_type)
    a, b = projector_shape(shape, rank, side)
    c, d = lowrank_shape(shape, rank, side)
    return a * b, c * d


def optimizer_state(info: ModelInfo, cfg: MemoryConfig, r: int) -> dict[str, int]:
    """Bytes of rank ``r``'s optimizer state tensors: projectors, moments (exp_avg + exp_avg_sq), scalars
    (0-d fp32 tensors: ``step`` per state entry, Fira's ``limiter_norm`` per matrix).

    adamw: torch.optim.AdamW (one step per tensor it updates, moments ``zeros_like`` it). Fira/GaLore, per layout:
      single      every matrix: projector + moments + step + limiter; Adam tensors: moments + step.
      ddp         ``Replicated``: each matrix's state on its owner (``replicated_owners``), 0-element
                  placeholders elsewhere; elementwise-Adam moments split by rows, a step on every rank.
      zero1/2/3   ``FlatPartition``: a matrix's whole state on its owner (``flat_partition_plan``); Adam state
                  for the piece of each non-matrix parameter this rank's flat partition holds.
      fsdp2       ``RowSharded``: moments by G's rows (right) / columns (left), projector by its rows (Q (k, n)
                  or P (m, k)), both with torch.chunk semantics; step and limiter on every rank; Adam moments
                  by the parameter's rows.
    """
    dt = _dtypes(cfg)
    sb = _state_bytes(cfg, dt)
    rank = _rank(info, cfg)
    W, s = cfg.world_size, cfg.strategy
    if cfg.optimizer == "adamw":
        if s in ("single", "ddp"):
            return {"projectors": 0, "moments": 2 * info.numel * sb, "scalars": 4 * len(info.params)}
        if s == "fsdp2":
            rows = sum(fsdp2_rows(p.shape[0], W, r) * (p.numel // p.shape[0]) for p in info.params)
            return {"projectors": 0, "moments": 2 * rows * sb, "scalars": 4 * len(info.params)}
        flats = _flat_partitions(info, cfg)
        return {"projectors": 0, "moments": 2 * sum(flats) * sb, "scalars": 4 * len(flats)}
    proj = mom = scal = 0
    if s in ("single", "ddp"):
        owner = replicated_owners(info, rank, cfg.proj_type, W, sb) if s == "ddp" else {}
        for i, p in enumerate(info.params):
            o = owner.get(i, r)
            if p.low_rank and o == r:
                pn, mn = _lowrank_parts(p.shape, rank, cfg.proj_type)
                proj, mom, scal = proj + pn * sb, mom + 2 * mn * sb, scal + 8
            elif not p.low_rank and o == -1:  # row-split elementwise Adam: this rank's rows, a step everywhere
                mom, scal = mom + 2 * _rows_numel(p, W, r) * sb, scal + 4
            elif not p.low_rank and o == r:
                mom, scal = mom + 2 * p.numel * sb, scal + 4
    elif s.startswith("zero"):
        plan = flat_partition_plan(info, s, W, rank, cfg.proj_type, cfg.zero3_sub_group_size)
        for i, o in plan.owners.items():
            if o == r:
                pn, mn = _lowrank_parts(info.params[i].shape, rank, cfg.proj_type)
                proj, mom, scal = proj + pn * sb, mom + 2 * mn * sb, scal + 8
        for length in plan.adam_pieces[r]:
            mom, scal = mom + 2 * length * sb, scal + 4
    else:  # fsdp2
        for p in info.params:
            if p.low_rank:
                side = side_for(p.shape, cfg.proj_type)
                k = effective_rank(p.shape, rank)
                m, n = p.shape
                if side == "right":
                    mom += 2 * fsdp2_rows(m, W, r) * k * sb
                    proj += fsdp2_rows(k, W, r) * n * sb
                else:
                    mom += 2 * k * fsdp2_rows(n, W, r) * sb
                    proj += fsdp2_rows(m, W, r) * k * sb
                scal += 8
            else:
                mom += 2 * fsdp2_rows(p.shape[0], W, r) * (p.numel // p.shape[0]) * sb
                scal += 4
    return {"projectors": proj, "moments": mom, "scalars": scal}


@dataclasses.dataclass(frozen=True)
class FlatPlan:
    """What ``layouts.flat_partition.FlatPartition`` does with a model under ZeRO-1/2/3 on W ranks.

    owners: low-rank parameter index -> owner rank. adam_pieces[r]: lengths of the non-matrix pieces rank r
    holds (one Adam state entry each). buckets: parameter indices per flat tensor (ZeRO-1/2 group, ZeRO-3
    sub-group). holds[i]: {rank: elements of parameter i in that rank's flat partition}.
    """

    owners: dict[int, int]
    adam_pieces: tuple[tuple[int, ...], ...]
    buckets: tuple[tuple[int, ...], ...]
    holds: dict[int, dict[int, int]]


@functools.lru_cache(maxsize=32)
def flat_partition_plan(info: ModelInfo, strategy: str, world_size: int, rank: int, proj_type: str,
                        sub_group_size: int = DS_SUB_GROUP_SIZE) -> FlatPlan:
    """The pieces and owners of ``FlatPartition._bind_zero12`` / ``_bind_zero3`` + ``_finish_partitioned``.

    ZeRO-1/2: each param group is one flat buffer, parameters end to end at their offsets, cut into W
    partitions of ``zero12_partition`` elements. ZeRO-3: each parameter is cut into W pieces of
    ceil(numel / W) (the last ones shorter or empty); sub-groups as ``_flat_partitions``. Owners: greedy LPT
    (``assign_owners``) of the matrices (in bucket order) on ``lowrank_state_numel + 1``, starting from
    loads of 2 * length + 1 per Adam piece.
    """
    W = world_size
    buckets: list[tuple[int, ...]] = []
    holds: dict[int, dict[int, int]] = {}
    for g in info.groups:
        if strategy in ("zero1", "zero2"):
            ps = zero12_partition([info.params[i].numel for i in g], W)[1]
            off = 0
            for i in g:
                n = info.params[i].numel
                h = {}
                for q in range(off // ps, (off + n - 1) // ps + 1) if n else ():
                    length = min(off + n, (q + 1) * ps) - max(off, q * ps)
                    if length > 0:
                        h[q] = length
                holds[i] = h
                off += n
            buckets.append(tuple(g))
        else:
            cur: list[int] = []
            acc = 0
            for i in g:
                n = info.params[i].numel
                pn = zero3_partition_numel(n, W)
                holds[i] = {q: min(pn, n - q * pn) for q in range(W) if n - q * pn > 0} if n else {}
                cur.append(i)
                acc += pn
                if acc >= sub_group_size:
                    buckets.append(tuple(cur))
                    cur, acc = [], 0
            if cur:
                buckets.append(tuple(cur))
    loads = [0.0] * W
    adam: list[list[int]] = [[] for _ in range(W)]
    mats: list[int] = []
    for b in buckets:
        for i in b:
            if info.params[i].low_rank:
                mats.append(i)
            else:
                for q, length in holds[i].items():
                    loads[q] += 2 * length + 1
                    adam[q].append(length)
    costs = [lowrank_state_numel(info.params[i].shape, rank, side_for(info.params[i].shape, proj_type)) + 1 for i in mats]
    owners = dict(zip(mats, assign_owners(costs, W, initial_loads=loads)))
    return FlatPlan(owners, tuple(tuple(a) for a in adam), tuple(buckets), holds)


def _rank(info: ModelInfo, cfg: MemoryConfig) -> int:
    return cfg.rank if cfg.rank is not None else info.default_rank


def _is_lowrank_group(info: ModelInfo, group: Sequence[int]) -> bool:
    return any(info.params[i].low_rank for i in group)


def _flat_partitions(info: ModelInfo, cfg: MemoryConfig, groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Numel of each flat fp32 tensor the client optimizer gets on one rank (ZeRO-1/2: one per param group;
    ZeRO-3: one per sub-group of ``sub_group_size`` partition elements)."""
    groups = info.groups if groups is None else groups
    W = cfg.world_size
    out = []
    for g in groups:
        numels = [info.params[i].numel for i in g]
        if cfg.strategy in ("zero1", "zero2"):
            out.append(zero12_partition(numels, W)[1])
        else:  # zero3 (stage3.py _create_fp16_sub_groups): split where the running sum reaches sub_group_size
            cur = 0
            for n in numels:
                cur += zero3_partition_numel(n, W)
                if cur >= cfg.zero3_sub_group_size:
                    out.append(cur)
                    cur = 0
            if cur:
                out.append(cur)
    return out


# ----------------------------------------------------------------------------------------------- activations
def activation_bytes(info: ModelInfo, micro_batch: int, seq_len: int, pattern: str = "pure",
                     attention: str = "sdpa", checkpointing: bool = False) -> dict[str, int]:
    """Bytes HF ``LlamaForCausalLM`` (transformers 5) keeps for backward for one micro-batch, derived per op.

    pattern: "fp32" (fp32 weights), "pure" (bf16 weights), "autocast" (fp32 weights under torch.autocast bf16).
    Per token t = micro_batch * seq_len, per layer, with h hidden, f intermediate, q = heads*head_dim,
    kv = kv_heads*head_dim, B the activation element size (4 fp32, 2 otherwise):
      RMSNorm x2: the fp32 input (or its fp32 copy) 4h, rsqrt 4, normalized y (Y h), output saved by the next
        linears (B h; under autocast one bf16 cast per consuming linear: 3 for q/k/v, 2 for gate/up)
      attention (sdpa/flash): q, k, v (after rotary), output: B (2q + 2kv)... as (q + 2 kv + q) B; logsumexp
        4 * heads; eager instead keeps the fp32 softmax and its cast: (4 + B') heads * seq
      MLP (SwiGLU): gate, silu(gate), up, silu*up: 4 B f
    Plus the final norm, fp32 log-softmax of the logits (4 V per token), label/index tensors (16 per token),
    rotary cos/sin (2 seq head_dim, per micro-batch), and under autocast the bf16 weight casts (2 bytes per
    linear weight element; only lm_head's with checkpointing). With checkpointing each layer keeps only its
    input (4h fp32/autocast, B h pure) and one layer is recomputed at a time during backward.

    Returns saved (kept from forward to backward), layer (one layer's saved bytes, the recompute transient
    with checkpointing), logits (the model output held by the caller: B V per token) and loss_transient
    (at the start of backward the fp32 gradients w.r.t. the log-softmax output and w.r.t. the logits
    coexist: 8 V per token; measured with the CPU allocator's peak on llama_20m, every precision).
    """
    if pattern not in ("fp32", "pure", "autocast"):
        raise ValueError(f"pattern={pattern!r} is not accepted; expected 'fp32', 'pure' or 'autocast'")
    t = micro_batch * seq_len
    h, f, V = info.hidden, info.intermediate, info.vocab
    q, kv = info.heads * info.head_dim, info.kv_heads * info.head_dim
    B = 4 if pattern == "fp32" else 2
    Y = 2 if pattern == "pure" else 4  # normalized y dtype: bf16 only when the weights are bf16
    if pattern == "autocast":
        norm_out_1, norm_out_2, norm_out_final = 3 * 2 * h, 2 * 2 * h, 2 * h
    else:
        norm_out_1 = norm_out_2 = norm_out_final = B * h
    norm = 4 * h + 4 + Y * h
    attn = B * (2 * q + 2 * kv)
    if attention != "eager":  # sdpa / flash kernels keep q, k, v, the output and the fp32 logsumexp
        attn += 4 * info.heads
    else:
        attn += (4 + (B if pattern != "fp32" else 0)) * info.heads * seq_len
    mlp = 4 * B * f
    per_layer_token = norm + norm_out_1 + attn + norm + norm_out_2 + mlp
    final_token = norm + norm_out_final + 4 * V + 16
    rope = 2 * seq_len * info.head_dim * (4 if pattern in ("fp32", "autocast") else 2)
    layer_weights = sum(p.numel for p in info.params if p.unit and len(p.shape) == 2)
    head_weights = sum(p.numel for p in info.params if p.name.startswith("lm_head"))
    if checkpointing:
        resid = 4 if pattern in ("fp32", "autocast") else 2
        saved = info.layers * resid * h * t + final_token * t + 4  # + nll_loss's 0-d total_weight
        casts = 2 * head_weights if pattern == "autocast" else 0
        layer = per_layer_token * t + rope + (2 * layer_weights // max(info.layers, 1) if pattern == "autocast" else 0)
    else:
        saved = info.layers * per_layer_token * t + final_token * t + rope + 4
        casts = 2 * (layer_weights + head_weights) if pattern == "autocast" else 0
        layer = 0
    return {"saved": saved + casts, "weight_casts": casts, "layer": layer, "logits": B * V * t,
            "loss_transient": 8 * V * t}


# ----------------------------------------------------------------------------------------------- estimate
def estimate(cfg: MemoryConfig, rank: int | None = None, info: ModelInfo | None = None) -> dict[str, Any]:
    """Per-rank bytes of one configuration. No tensor is allocated; llama_7b takes about a second.

    rank: which rank (0..W-1); None gives the rank with the highest peak. ``info`` may be passed (e.g.
    ``model_info_from_module(model)`` from a training loop) to skip building the meta model.

    Keys (bytes per rank):
      params, grads, master_params: see ``_estimate_rank``; grads is the gradient storage handed to the
        optimizer step (DeepSpeed: this rank's low-precision partition).
      optimizer_states = optimizer_projectors + optimizer_moments + optimizer_scalars (0-d step counters
        and limiter norms): exactly the optimizer's state tensors on this rank.
      activations = activations_saved (kept for backward) + activations_logits (the logits the model
        returns) + activations_transient (the largest short-lived buffer: loss in fp32, or one recomputed
        layer under activation checkpointing).
      comm_buffers = comm_persistent + max(comm_backward, comm_step): buckets and gather buffers.
      grads_backward_transient (ZeRO-1's full gradients before the reduce), optimizer_step_transient
        (temporaries of the optimizer step, including an SVD at a projector refresh); under FSDP2
        grads_backward_transient is the root's unsharded gradients at the end of backward.
      peak: see ``_peak``.
    Also: rank, config (with defaults filled in), model_params, lowrank_matrices, notes.
    """
    if info is None:
        info = model_info(cfg.model, cfg.optimizer, cfg.rank or _model_defaults(cfg.model)[0] or 128,
                          cfg.target_modules, cfg.vocab_size)
    if cfg.rank is None:
        cfg = cfg.replace(rank=info.default_rank)
    if cfg.seq_len is None:
        cfg = cfg.replace(seq_len=info.default_seq_len)
    if rank is not None:
        if not 0 <= rank < cfg.world_size:
            raise ValueError(f"rank={rank!r} is not accepted; expected 0 <= rank < world_size={cfg.world_size}")
        return _estimate_rank(info, cfg, rank)
    results = [_estimate_rank(info, cfg, r) for r in _candidate_ranks(info, cfg)]
    return max(results, key=lambda d: (d["peak"], -d["rank"]))


def estimate_all_ranks(cfg: MemoryConfig, info: ModelInfo | None = None) -> list[dict[str, Any]]:
    """``estimate`` for every rank (for small world sizes: tests, measurements)."""
    first = estimate(cfg, rank=0, info=info)
    cfg = MemoryConfig(**first["config"])
    info = info or model_info(cfg.model, cfg.optimizer, cfg.rank, cfg.target_modules, cfg.vocab_size)
    return [first] + [estimate(cfg, rank=r, info=info) for r in range(1, cfg.world_size)]


def _candidate_ranks(info: ModelInfo, cfg: MemoryConfig) -> list[int]:
    """Ranks whose figures can differ most: the first and last (padding, empty FSDP2 chunks) and, under the
    owner-computes layouts, the rank with the most owned state (from the same owner map)."""
    W = cfg.world_size
    if W <= 4:
        return list(range(W))
    cand = {0, W - 1}
    if cfg.optimizer != "adamw" and (cfg.strategy == "ddp" or cfg.strategy.startswith("zero")):
        sb = _state_bytes(cfg, _dtypes(cfg))
        loads = [0] * W
        if cfg.strategy == "ddp":
            owners = {i: o for i, o in replicated_owners(info, _rank(info, cfg), cfg.proj_type, W, sb).items()
                      if info.params[i].low_rank}
        else:
            owners = flat_partition_plan(info, cfg.strategy, W, _rank(info, cfg), cfg.proj_type,
                                         cfg.zero3_sub_group_size).owners
        for i, o in owners.items():
            loads[o] += info.params[i].numel
        cand.add(max(range(W), key=lambda o: (loads[o], -o)))
    return sorted(cand)


def _estimate_rank(info: ModelInfo, cfg: MemoryConfig, r: int) -> dict[str, Any]:
    """Rank r's figures. Rules per strategy (N model elements, W ranks; element sizes from ``_dtypes``):

    single/ddp: params N w, grads N g; DDP's reducer buckets hold another N g unless gradient_as_bucket_view.
    zero1/2 (stage_1_and_2.py): every rank keeps the whole flat low-precision buffer of each param group
      (padded, ``zero12_partition``), its fp32 master partition, its low-precision gradient partition;
      ZeRO-1 keeps all full gradients until the end of backward; the step makes an fp32 copy of one group's
      gradient partition; the reduce bucket is reduce_bucket_size elements.
    zero3 (stage3.py, partition_parameters.py): each parameter's partition (padded to W), small parameters
      (< param_persistence_threshold) also whole; fp32 master and gradient partitions; gathered layers
      (prefetch bucket + the current one) and the reduce bucket.
    fsdp2: dim-0 shards padded to ceil(dim0 / W) rows; during forward/backward the root module's
      unsharded weights (embeddings, lm_head: not resharded after forward), the current and the prefetched
      layer's, and lm_head's unsharded gradient; at the end of backward the root's unsharded gradients and
      their fp32 reduce-scatter input (bf16-mixed).
    """
    dt = _dtypes(cfg)
    W, s, N = cfg.world_size, cfg.strategy, info.numel
    notes: list[str] = []
    grads_bwd_transient = 0  # gradient storage that exists only around the end of backward
    grads_at_bwd_start = 0  # gradient storage that already exists when backward starts
    step_extra = 0  # gradient copies made inside the optimizer step (DeepSpeed's fp32 partition)
    comm_persistent = comm_backward = 0
    if s in ("single", "ddp"):
        params, grads, master = N * dt["w"], N * dt["g"], 0
        if s == "ddp" and not cfg.ddp_bucket_view:
            comm_persistent += N * dt["g"]
            notes.append("DDP's gradient buckets hold a second copy of all gradients (gradient_as_bucket_view=False)")
    elif s in ("zero1", "zero2"):
        parts = [zero12_partition([info.params[i].numel for i in g], W) for g in info.groups]
        params = sum(a for a, _ in parts) * dt["w"]
        master = sum(p for _, p in parts) * dt["m"]
        grads = sum(p for _, p in parts) * dt["g"]
        grads_at_bwd_start = grads if s == "zero2" else 0
        step_extra = max(p for _, p in parts) * 4
        if s == "zero1":
            grads_bwd_transient = N * dt["g"]
            notes.append("ZeRO-1 holds every full gradient until the end of backward, then reduces to the partition")
        overlap = cfg.zero_overlap_comm if cfg.zero_overlap_comm is not None else False
        # the bucket is allocated at its full configured size (torch.empty(reduce_bucket_size)), however small the model
        comm_backward += cfg.zero_reduce_bucket_size * dt["g"] * (2 if overlap else 1)
    elif s == "zero3":
        part = sum(zero3_partition_numel(p.numel, W) for p in info.params)
        persistent = sum(p.numel for p in info.params if p.numel < cfg.zero3_param_persistence_threshold)
        params = (part + persistent) * dt["w"]
        master = part * dt["m"]
        grads = part * dt["g"]
        grads_at_bwd_start = grads
        step_extra = max(_flat_partitions(info, cfg)) * 4
        unit = _largest_unit(info)
        gathered = min(N, max(cfg.zero3_prefetch_bucket_size, unit) + unit)
        comm_backward += gathered * dt["w"] + cfg.zero_reduce_bucket_size * dt["g"]
        if persistent:
            notes.append(f"ZeRO-3 keeps {persistent} elements of small parameters (< param_persistence_threshold "
                         f"{cfg.zero3_param_persistence_threshold}) whole on every rank")
    else:  # fsdp2
        rows = sum(fsdp2_padded_rows(p.shape[0], W) * (p.numel // p.shape[0]) for p in info.params)
        params, grads, master = rows * dt["w"], rows * dt["g"], 0
        compute = 2 if cfg.precision == "bf16-mixed" else dt["w"]
        reduce_copy = 4 if cfg.precision == "bf16-mixed" else 0  # reduce_dtype=fp32 copy of the bf16 gradients
        root = sum(p.numel for p in info.params if not p.unit)  # embeddings, final norm, lm_head
        root_max = max((p.numel for p in info.params if not p.unit), default=0)
        layer = max((n for u, n in _unit_sizes(info).items() if u), default=0)
        # forward/backward: the root's unsharded weights (kept for backward), the current and the prefetched
        # layer's, and lm_head's unsharded gradient (produced first, reduced with the root's at the end)
        comm_backward += (root + 2 * layer + root_max) * compute
        # end of backward: the root's unsharded gradients and their reduce-scatter input
        grads_bwd_transient = (root + layer) * (compute + reduce_copy)
        if cfg.precision == "bf16-mixed":
            notes.append("FSDP2 bf16-mixed: the fp32 shards are the master weights (master_params 0)")
    st = optimizer_state(info, cfg, r)
    states = st["projectors"] + st["moments"] + st["scalars"]
    comm_step, step_transient = _optimizer_buffers(info, cfg, r, dt)
    act = activation_bytes(info, cfg.micro_batch, cfg.seq_len, dt["act"], cfg.attention, cfg.activation_checkpointing)
    act_transient = max(act["loss_transient"], act["layer"])
    out = {
        "params": params, "grads": grads, "master_params": master, "optimizer_states": states,
        "activations": act["saved"] + act["logits"] + act_transient,
        "comm_buffers": comm_persistent + max(comm_backward, comm_step),
        "optimizer_projectors": st["projectors"], "optimizer_moments": st["moments"],
        "optimizer_scalars": st["scalars"],
        "activations_saved": act["saved"], "activations_logits": act["logits"],
        "activations_transient": act_transient, "activations_weight_casts": act["weight_casts"],
        "comm_persistent": comm_persistent, "comm_backward": comm_backward, "comm_step": comm_step,
        "grads_backward_transient": grads_bwd_transient, "grads_at_backward_start": grads_at_bwd_start,
        "optimizer_step_transient": step_transient + step_extra,
    }
    out["peak"] = _peak(out)
    out["peak_breakdown"] = peak_breakdown(out)
    out["rank"] = r
    out["config"] = dataclasses.asdict(cfg)
    out["model_params"] = N
    out["lowrank_matrices"] = len(info.lowrank()) if cfg.optimizer != "adamw" else 0
    out["notes"] = notes
    return out


def _unit_sizes(info: ModelInfo) -> dict[str, int]:
    units: dict[str, int] = {}
    for p in info.params:
        units[p.unit] = units.get(p.unit, 0) + p.numel
    return units


def _largest_unit(info: ModelInfo) -> int:
    return max(_unit_sizes(info).values())


def _optimizer_buffers(info: ModelInfo, cfg: MemoryConfig, r: int, dt: dict[str, Any]) -> tuple[int, int]:
    """(communication buffers, step temporaries) of the optimizer step on rank r.

    Communication (the layouts' buffers; fp32 unless said):
      ddp     ``Replicated`` all-gathers the owners' updated values: a send buffer of L and a receive buffer of
              W L elements in the weights' dtype, L the largest rank's owned elements.
      zero*   ``FlatPartition``, per flat tensor: the whole gradient and weight of every owned matrix (G, P),
              the [gradient, weight] pieces sent to and received from the owners, alive together.
      fsdp2   ``RowSharded``: the prologue all-gather (flags and the right projectors' Q shards: W (2 |E| +
              sum ceil(k / W) n)), the left matrices' reduce-scatter input (W S) and all-gather (W S), S = sum
              (k + 1) ceil(n / W); at a refresh the rows of every due gradient to the SVD owners (this rank's
              rows of all matrices out, the whole owned matrices in). The larger of the two.
    Temporaries (Fira/GaLore, on the largest matrix this rank computes): at a projector refresh
    torch.linalg.svd of the fp32 gradient (the copy, U, S, Vh); otherwise the fp32 gradient copy and R, N, X.
    AdamW (torch foreach on CUDA): one temporary the size of one moment (sqrt(exp_avg_sq) for the whole group;
    on CPU the foreach ops run tensor by tensor and need less).
    """
    W, s = cfg.world_size, cfg.strategy
    sb = _state_bytes(cfg, dt)
    if cfg.optimizer == "adamw":  # torch's foreach AdamW on CUDA: sqrt(exp_avg_sq) for the whole group at once
        return 0, optimizer_state(info, cfg, r)["moments"] // 2
    rank = _rank(info, cfg)
    mats = info.lowrank()
    comm = 0
    if s == "single":
        mine = mats
    elif s == "ddp":
        owner = replicated_owners(info, rank, cfg.proj_type, W, sb)
        mine = [info.params[i] for i in owner if owner[i] == r and info.params[i].low_rank]
        if W > 1:
            loads = [0] * W
            for i, o in owner.items():
                if o >= 0:
                    loads[o] += info.params[i].numel
                else:
                    for q in range(W) if W <= 64 else (0, W - 1):
                        loads[q] += _rows_numel(info.params[i], W, q)
            if W > 64:  # ranks between the first and last hold ceil-sized row chunks, as the first
                loads = [max(loads)]
            comm = (W + 1) * max(loads) * dt["w"]
    elif s.startswith("zero"):
        plan = flat_partition_plan(info, s, W, rank, cfg.proj_type, cfg.zero3_sub_group_size)
        mine = [info.params[i] for i, o in plan.owners.items() if o == r]
        for b in plan.buckets:
            owned = sent = recvd = 0
            for i in b:
                o = plan.owners.get(i)
                if o is None:
                    continue
                if o == r:
                    owned += info.params[i].numel
                    recvd += sum(length for q, length in plan.holds[i].items() if q != r)
                else:
                    sent += plan.holds[i].get(r, 0)
            comm = max(comm, 4 * 2 * (owned + sent + recvd))
    else:  # fsdp2
        ids = [i for g in info.groups for i in g if info.params[i].low_rank]
        svd_owner = dict(zip(ids, assign_owners([_svd_flops(info.params[i].shape) for i in ids], W)))
        mine = [info.params[i] for i in ids if svd_owner[i] == r]
        if W > 1:
            k_of = {i: effective_rank(info.params[i].shape, rank) for i in ids}
            right = [i for i in ids if side_for(info.params[i].shape, cfg.proj_type) == "right"]
            left = [i for i in ids if i not in set(right)]
            seg = 2 * len(info.params) + sum(-(-k_of[i] // W) * info.params[i].shape[1] for i in right)
            S = sum((k_of[i] + (1 if cfg.optimizer == "fira" else 0)) * -(-info.params[i].shape[1] // W) for i in left)
            regular = 4 * (W + 1) * max(seg, S)
            rows_out = sum(fsdp2_rows(info.params[i].shape[0], W, r) * info.params[i].shape[1] for i in ids)
            whole_in = sum(info.params[i].numel for i in ids if svd_owner[i] == r)
            grad_copy = rows_out if dt["g"] != 4 else 0  # .to(fp32) of low-precision gradient rows
            refresh = 4 * (rows_out + whole_in + grad_copy)  # the all-to-all input (cat) and output
            comm = max(regular, refresh)
    transient = 0
    for p in mine:
        m, n = p.shape
        k = effective_rank(p.shape, rank)
        svd = 4 * (m * n + m * min(m, n) + min(m, n) + min(m, n) * n)
        step = 4 * m * n + 3 * max(m, n) * k * sb
        transient = max(transient, svd, step)
    adam = [p for p in info.params if not p.low_rank]
    if adam:
        transient = max(transient, 2 * max(p.numel for p in adam) * sb)
    return comm, transient


def _svd_flops(shape: tuple[int, ...]) -> int:
    """``layouts.replicated.svd_flops``: the SVD owner map's cost under the row-sharded layout."""
    m, n = shape
    return m * n * min(m, n)


def peak_breakdown(d: dict[str, int]) -> dict[str, int]:
    """What is alive at the peak (see ``_peak``), by component; the values sum to ``d["peak"]``."""
    persistent = d["params"] + d["master_params"] + d["optimizer_states"] + d["comm_persistent"]
    fwd = d["activations"] + d["grads_at_backward_start"] + d["comm_backward"]
    bwd_end = d["grads_backward_transient"] + d["comm_backward"]
    opt_step = d["optimizer_step_transient"] + d["comm_step"]
    out = {"params": d["params"], "master_params": d["master_params"],
           "optimizer_projectors": d["optimizer_projectors"], "optimizer_moments": d["optimizer_moments"],
           "optimizer_scalars": d["optimizer_scalars"], "grads": 0, "activations": 0, "comm_buffers": d["comm_persistent"],
           "temporaries": 0}
    if fwd >= d["grads"] + max(bwd_end, opt_step):
        out["phase"] = "forward/backward"
        out.update(grads=d["grads_at_backward_start"], activations=d["activations"])
        out["comm_buffers"] += d["comm_backward"]
    elif bwd_end >= opt_step:
        out["phase"] = "end of backward"
        out.update(grads=d["grads"], temporaries=d["grads_backward_transient"])
        out["comm_buffers"] += d["comm_backward"]
    else:
        out["phase"] = "optimizer step"
        out.update(grads=d["grads"], temporaries=d["optimizer_step_transient"])
        out["comm_buffers"] += d["comm_step"]
    assert sum(v for k, v in out.items() if k != "phase") == persistent + max(fwd, d["grads"] + max(bwd_end, opt_step))
    return out


def _peak(d: dict[str, int]) -> int:
    """High-water mark of one step: what persists, plus the larger of two phases.

    persistent = params + master_params + optimizer_states + comm_persistent
    forward/backward (at the end of forward): activations + grads_at_backward_start + comm_backward
    end of backward / optimizer step: grads + max(grads_backward_transient + comm_backward,
                                                  optimizer_step_transient + comm_step)
    (Activations are freed as gradients are produced, so their sum is not counted.)
    """
    persistent = d["params"] + d["master_params"] + d["optimizer_states"] + d["comm_persistent"]
    fwd = d["activations"] + d["grads_at_backward_start"] + d["comm_backward"]
    step = d["grads"] + max(d["grads_backward_transient"] + d["comm_backward"],
                            d["optimizer_step_transient"] + d["comm_step"])
    return persistent + max(fwd, step)


# ----------------------------------------------------------------------------------------------- formatting
def human(n: float) -> str:
    """Bytes in GiB/MiB/KiB with three significant figures."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


ROWS = (
    ("params", "parameters"),
    ("grads", "gradients"),
    ("master_params", "master weights"),
    ("optimizer_projectors", "optimizer: projectors"),
    ("optimizer_moments", "optimizer: moments"),
    ("optimizer_scalars", "optimizer: step/limiter"),
    ("optimizer_states", "optimizer states (total)"),
    ("activations_saved", "activations: saved for bwd"),
    ("activations", "activations (with transients)"),
    ("comm_buffers", "communication buffers"),
    ("optimizer_step_transient", "optimizer step temporaries"),
    ("peak", "peak"),
)


def describe(cfg: dict[str, Any]) -> str:
    ck = "on" if cfg["activation_checkpointing"] else "off"
    opt = cfg["optimizer"] + (f" rank {cfg['rank']}" if cfg["optimizer"] != "adamw" else "")
    return (f"{cfg['model']}, {opt}, {cfg['strategy']} x {cfg['world_size']}, {cfg['precision']}, micro-batch "
            f"{cfg['micro_batch']} x seq {cfg['seq_len']}, activation checkpointing {ck}")


def format_single(d: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    lines = [f"per-rank memory (rank {d['rank']}): {describe(d['config'])}",
             f"model: {d['model_params'] / 1e6:.2f}M parameters, {d['lowrank_matrices']} low-rank matrices"]
    head = f"{'':30s} {'estimated':>12s}"
    if measured is not None:
        head += f" {'measured':>12s} {'diff':>8s}"
    lines.append(head)
    for key, label in ROWS:
        row = f"{label:30s} {human(d[key]):>12s}"
        if measured is not None:
            m = measured.get(key)
            if m is None:
                row += f" {'-':>12s}"
            else:
                diff = f"{100.0 * (m - d[key]) / d[key]:+.1f}%" if d[key] else ("0" if m == 0 else "n/a")
                row += f" {human(m):>12s} {diff:>8s}"
        lines.append(row)
    for n in d["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def format_table(results: Sequence[dict[str, Any]], title: str, label: Any = None) -> str:
    """One row per configuration, one column per component, in GiB."""
    label = label or (lambda d: f"{d['config']['optimizer']} / {d['config']['strategy']} / W={d['config']['world_size']}")
    cols = [("params", "params"), ("grads", "grads"), ("master_params", "master"),
            ("optimizer_projectors", "proj"), ("optimizer_moments", "moments"), ("optimizer_states", "opt"),
            ("activations", "activ"), ("comm_buffers", "comm"), ("peak", "peak")]
    width = max(len(label(d)) for d in results) if results else 10
    lines = [title, f"{'configuration':{width}s} " + " ".join(f"{c:>8s}" for _, c in cols) + "   (GiB per rank)"]
    for d in results:
        lines.append(f"{label(d):{width}s} " + " ".join(f"{gib(d[k]):>8s}" for k, _ in cols))
    return "\n".join(lines)


def markdown_table(results: Sequence[dict[str, Any]], label: Any) -> str:
    """One Markdown row per configuration, GiB per rank."""
    cols = [("params", "params"), ("grads", "grads"), ("master_params", "master"),
            ("optimizer_projectors", "projectors"), ("optimizer_moments", "moments"),
            ("activations", "activations"), ("comm_buffers", "comm buffers"),
            ("optimizer_step_transient", "step temporaries"), ("peak", "peak")]
    out = ["| configuration | " + " | ".join(c for _, c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for d in results:
        out.append(f"| {label(d)} | " + " | ".join(gib(d[k]) for k, _ in cols) + " |")
    return "\n".join(out)


PLOT_KEYS = (("params", "parameters"), ("grads", "gradients"), ("master_params", "master weights"),
             ("optimizer_projectors", "projectors"), ("optimizer_moments", "moments"),
             ("optimizer_scalars", "step/limiter"), ("activations", "activations"),
             ("comm_buffers", "comm buffers"), ("temporaries", "temporaries"))


def plot(results: Sequence[dict[str, Any]], path: str, title: str = "", label: Any = None) -> None:
    """Stacked bars, one per configuration (GiB per rank): what is alive at the peak (``peak_breakdown``), so
    each bar's height is the peak; the phase of the peak is written above the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = label or (lambda d: f"{d['config']['optimizer']}\n{d['config']['strategy']}\nW={d['config']['world_size']}")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(results) + 2), 5.0))
    xs = list(range(len(results)))
    bottom = [0.0] * len(results)
    for key, name in PLOT_KEYS:
        vals = [d["peak_breakdown"][key] / (1 << 30) for d in results]
        ax.bar(xs, vals, bottom=bottom, label=name, width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    short = {"forward/backward": "fwd/bwd", "end of backward": "bwd end", "optimizer step": "step"}
    for x, d in zip(xs, results):
        ax.text(x, d["peak"] / (1 << 30), short[d["peak_breakdown"]["phase"]], ha="center", va="bottom", fontsize=6)
    ax.set_xticks(xs)
    ax.set_xticklabels([label(d) for d in results], fontsize=7)
    ax.set_ylabel("GiB per rank")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fira-dist memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_7b", help="a name (llama_tiny, llama_9m ... llama_7b) or a config.json")
    p.add_argument("--optimizer", default="fira", help="adamw, galore, fira; comma-separated with --compare")
    p.add_argument("--rank", type=int, default=None, help="projection rank (default: the model's Fira rank)")
    p.add_argument("--target-modules", default="attn,mlp", help="names of the projected linears (comma-separated)")
    p.add_argument("--proj-type", default="std")
    p.add_argument("--strategy", default="single", help=f"{', '.join(STRATEGIES)}; comma-separated with --compare")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default 1 for single, else 8)")
    p.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    p.add_argument("--state-dtype", default=None, choices=("fp32", "bf16"))
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--attention", default="sdpa", choices=ATTENTIONS)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--ddp-bucket-view", action="store_true")
    p.add_argument("--zero-reduce-bucket-size", type=int, default=DS_REDUCE_BUCKET_SIZE)
    p.add_argument("--rank-index", type=int, default=None, help="report this rank (default: the rank with the highest peak)")
    p.add_argument("--compare", action="store_true", help="one table across --optimizer x --strategy lists "
                   "(default adamw,galore,fira x zero1,zero2,zero3,fsdp2)")
    p.add_argument("--sweep-world-size", default=None, metavar="W1,W2,...", nargs="?", const="1,8,64,512,4096",
                   help="one row per world size (default list 1,8,64,512,4096)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (GiB per rank)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="stacked bars per configuration")
    p.add_argument("--measure", action="store_true", help="run real steps and print measured next to estimated")
    p.add_argument("--measure-steps", type=int, default=3)
    p.add_argument("--measure-model", default=None, help="model to measure at (default: --model if it fits, else llama_20m)")
    p.add_argument("--measure-world-size", type=int, default=None, help="ranks to measure with (default min(W, 2) on CPU)")
    return p


def _configs(args: argparse.Namespace) -> list[MemoryConfig]:
    opts = [o.strip() for o in args.optimizer.split(",") if o.strip()]
    strats = [s.strip() for s in args.strategy.split(",") if s.strip()]
    if args.compare:
        if args.optimizer == "fira":
            opts = list(OPTIMIZERS)
        if args.strategy == "single":
            strats = ["zero1", "zero2", "zero3", "fsdp2"]
    if args.sweep_world_size:
        sizes = [int(w) for w in args.sweep_world_size.split(",")]
    else:
        sizes = [args.world_size]
    base = dict(model=args.model, rank=args.rank, target_modules=tuple(t for t in args.target_modules.split(",") if t),
                proj_type=args.proj_type, precision=args.precision, state_dtype=args.state_dtype,
                micro_batch=args.micro_batch, seq_len=args.seq_len, activation_checkpointing=args.activation_checkpointing,
                attention=args.attention, vocab_size=args.vocab_size, ddp_bucket_view=args.ddp_bucket_view,
                zero_reduce_bucket_size=args.zero_reduce_bucket_size)
    out = []
    for w in sizes:
        for s in strats:
            for o in opts:
                ws = 1 if s == "single" else (w if w is not None else 8)
                if s == "single" and ws != w and w not in (None, 1) and len(sizes) > 1:
                    continue
                out.append(MemoryConfig(optimizer=o, strategy=s, world_size=ws, **base))
    # one single-process row per optimizer even in a world-size sweep
    seen, uniq = set(), []
    for c in out:
        key = json.dumps(dataclasses.asdict(c), sort_keys=True)
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        configs = _configs(args)
        results = [estimate(c, rank=args.rank_index) for c in configs]
    except (ValueError, FileNotFoundError) as err:
        print(f"fira-dist memory: {err}", file=sys.stderr)
        return 2
    measured = None
    if args.measure:
        from fira_dist import memory_measure

        measured = [memory_measure.measure_configuration(c, steps=args.measure_steps, model=args.measure_model,
                                                         world_size=args.measure_world_size) for c in configs]
    if args.json:
        payload = {"configurations": results}
        if measured is not None:
            payload["measured"] = measured
        print(json.dumps(payload, indent=1))
    elif measured is not None:
        for m in measured:
            print(memory_measure.format_measurement(m))
            print()
    elif args.markdown:
        print(markdown_table(results, lambda d: f"{d['config']['optimizer']} / {d['config']['strategy']} / "
                                                f"W={d['config']['world_size']}"))
    elif len(results) == 1:
        print(format_single(results[0]))
    else:
        c0 = results[0]["config"]
        title = (f"{c0['model']}, {c0['precision']}, micro-batch {c0['micro_batch']} x seq {c0['seq_len']}, "
                 f"activation checkpointing {'on' if c0['activation_checkpointing'] else 'off'}"
                 + (f", rank {c0['rank']}" if any(d['config']['optimizer'] != 'adamw' for d in results) else ""))
        print(format_table(results, title))
    if args.plot:
        c0 = results[0]["config"]
        plot(results, args.plot, title=f"{c0['model']}: per-rank memory ({c0['precision']}, micro-batch "
             f"{c0['micro_batch']} x {c0['seq_len']})")
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
