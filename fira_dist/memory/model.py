"""The model side of a memory estimate: a LLaMA's parameter shapes and param groups, and its saved activations.

``model_info`` builds the real ``LlamaForCausalLM`` on the meta device (``fira_dist.models``: nothing is
allocated; llama_7b takes about a second) and the real param groups (``fira_dist.param_groups``: which matrices
are low rank). ``activation_bytes`` derives, op by op, what HF LLaMA keeps for backward (checked exactly
against ``saved_tensors_hooks`` in the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable

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


def llama_config(model: str, vocab_size: int | None):
    """A ``LlamaConfig`` for a name of ``fira_dist.models`` or a config.json path."""
    from fira_dist.models import get_model_config

    return get_model_config(model, vocab_size=vocab_size)


def meta_model(config):
    """The model built on the meta device (no memory)."""
    from fira_dist.models import build_model

    return build_model(config, device="meta")


def model_defaults(model: str) -> tuple[int | None, int | None]:
    """(Fira rank, sequence length) of a named model's pretraining recipe, or (None, None)."""
    from fira_dist.models import get_spec

    try:
        spec = get_spec(model)
    except ValueError:
        return None, None
    return spec.fira.rank, spec.fira.seq_len


@functools.lru_cache(maxsize=64)
def model_info(model: str, optimizer: str = "fira", rank: int = 128, target_modules: tuple[str, ...] = ("attn", "mlp"),
               vocab_size: int | None = None) -> ModelInfo:
    """Shapes of ``model`` (a name of ``fira_dist.models`` or a config.json), built on the meta
    device: nothing is allocated, llama_7b takes about a second. Cached."""
    config = llama_config(model, vocab_size)
    module = meta_model(config)
    if optimizer == "lowrank":  # the factorized model (Glentis et al. 2025): every target linear -> B (m, r), A_T (n, r)
        from fira_dist.lowrank import factorize

        factorize(module, target_modules, rank)
    d_rank, d_seq = model_defaults(model)
    return model_info_from_module(module, optimizer, rank, target_modules, name=model, config=config,
                                  default_rank=d_rank or 128, default_seq_len=d_seq or 256)


def model_info_from_module(module: Any, optimizer: str = "fira", rank: int = 128,
                           target_modules: Iterable[str] = ("attn", "mlp"), *, name: str | None = None,
                           config: Any = None, default_rank: int = 128, default_seq_len: int = 256) -> ModelInfo:
    """``ModelInfo`` of a built model (meta, real, or already sharded: DTensor shapes are global).

    The param groups are those ``fira_dist.param_groups`` builds (low rank: 2-D weights of the
    ``target_modules`` linears; the rest plain Adam) for galore/fira, and one group for adamw and lowrank (a
    factorized model, Fira's plain Adam on every tensor).
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
    if optimizer in ("adamw", "lowrank"):
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
