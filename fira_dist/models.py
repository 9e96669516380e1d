"""LLaMA model configurations of the GaLore / Fira pretraining experiments.

The architecture values are those of the GaLore repository's
``configs/llama_*.json`` (the Fira repository uses the same files): LLaMA with
SwiGLU MLP, RMSNorm (eps 1e-6), rotary embeddings, untied input/output
embeddings, ``vocab_size`` 32000 and ``max_sequence_length`` 1024 (2048 for
7B).  The papers tokenize C4 with the ``t5-base`` tokenizer, whose
``len(tokenizer)`` is 32100: its last 100 ids are the ``<extra_id_*>`` sentinels,
which never occur in plain text, so the 32000-row embedding of the configs is
enough.  Pass ``vocab_size=len(tokenizer)`` (or ``tokenizer=``) to
:func:`get_model_config` for any other tokenizer, e.g. the embedded 8192-token
one.

Parameter counts (:func:`count_params`) count every parameter, embeddings and
the separate LM head included, as GaLore's ``torchrun_main.py`` logs them
(``sum(p.numel() for p in model.parameters())``): llama_60m 58.07M, llama_130m
134.11M, llama_350m 367.97M, llama_1b 1339.08M, llama_7b 6738.42M.

Each entry also carries the Fira hyper-parameters (:class:`FiraHParams`):
``source="paper"`` where they come from the Fira paper / scripts (60M, 130M,
350M, 1B, 7B), ``source="analogy"`` where they were chosen here by analogy
(rank ~ hidden/4, the 60M-1B learning rate, alpha 0.25 below 1B and 0.0625 from
1B on, 10% warm-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "FiraHParams", "LlamaSpec", "MODEL_CONFIGS", "get_spec", "get_model_config",
    "build_model", "count_params", "model_names",
]


@dataclasses.dataclass(frozen=True)
class FiraHParams:
    """Fira pretraining hyper-parameters for one model size (C4, GaLore recipe).

    ``seq_len`` tokens per sequence, ``total_batch_size`` sequences per
    optimizer update (so ``seq_len * total_batch_size`` = 131072 tokens a step),
    ``lr`` peak learning rate (cosine schedule to ``min_lr_ratio * lr`` after
    ``warmup_steps`` linear warm-up), ``rank`` / ``update_proj_gap`` / ``alpha``
    the Fira projection rank, the number of steps between SVD updates of the
    projection and the scale factor of the low-rank update.  ``source`` is
    ``"paper"`` or ``"analogy"`` (chosen here, not published).
    """

    lr: float
    rank: int
    update_proj_gap: int
    alpha: float
    num_training_steps: int
    warmup_steps: int
    seq_len: int = 256
    total_batch_size: int = 512
    weight_decay: float = 0.0
    grad_clipping: float = 0.0
    min_lr_ratio: float = 0.1
    scheduler: str = "cosine"
    source: str = "paper"

    def __post_init__(self):
        for f in ("rank", "update_proj_gap", "num_training_steps", "seq_len", "total_batch_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"FiraHParams.{f} must be a positive int, got {v!r}")
        if not 0 <= self.warmup_steps <= self.num_training_steps:
            raise ValueError(f"FiraHParams.warmup_steps={self.warmup_steps} must lie in "
                             f"[0, num_training_steps={self.num_training_steps}]")
        if not (self.lr > 0 and self.alpha > 0):
            raise ValueError(f"FiraHParams lr and alpha must be > 0, got lr={self.lr}, alpha={self.alpha}")
        if self.source not in ("paper", "analogy"):
            raise ValueError(f"FiraHParams.source must be 'paper' or 'analogy', got {self.source!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.total_batch_size


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """One LLaMA architecture (the fields of a GaLore ``configs/llama_*.json``).

    ``published_params`` is the size the papers quote (e.g. ``"60M"``); the
    exact count is :func:`count_params` of :meth:`to_config`.
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    fira: FiraHParams
    vocab_size: int = 32000
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    published_params: str = ""
    note: str = ""

    def __post_init__(self):
        for f in ("hidden_size", "intermediate_size", "num_attention_heads",
                  "num_hidden_layers", "vocab_size", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{self.name}: {f} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"{self.name}: head_dim {self.hidden_size // self.num_attention_heads} "
                             "must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"{self.name}: rms_norm_eps must be > 0")
        if self.fira.rank > min(self.hidden_size, self.intermediate_size):
            raise ValueError(f"{self.name}: Fira rank {self.fira.rank} exceeds the smallest "
                             f"weight dimension {min(self.hidden_size, self.intermediate_size)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_config(self, vocab_size: Optional[int] = None, **overrides):
        """``transformers.LlamaConfig`` of this spec (``vocab_size`` overrides the table's)."""
        from transformers import LlamaConfig

        kw = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            num_hidden_layers=self.num_hidden_layers,
            vocab_size=int(vocab_size or self.vocab_size),
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            hidden_act=self.hidden_act,
            tie_word_embeddings=False,
            # GaLore's files say bos 0, eos 1 (T5 ids) and pad -1; a pad id of -1
            # would make HF's embedding treat the last row as padding, so no pad id.
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=None,
            use_cache=False,
        )
        kw.update(overrides)
        return LlamaConfig(**kw)


def _fira(lr, rank, gap, alpha, steps, source="paper", **kw) -> FiraHParams:
    return FiraHParams(lr=lr, rank=rank, update_proj_gap=gap, alpha=alpha,
                       num_training_steps=steps, warmup_steps=steps // 10, source=source, **kw)


_A = "analogy"
MODEL_CONFIGS: dict[str, LlamaSpec] = {s.name: s for s in [
    # --- tiny sizes for tests and demos (not in the papers) ---
    LlamaSpec("llama_tiny", 64, 128, 4, 2, vocab_size=512, max_position_embeddings=256,
              fira=_fira(0.01, 16, 10, 0.25, 100, _A, seq_len=64, total_batch_size=8),
              note="for unit tests; pass vocab_size=len(tokenizer)"),
    LlamaSpec("llama_demo", 192, 512, 4, 4, vocab_size=8192, max_position_embeddings=512,
              fira=_fira(0.01, 48, 50, 0.25, 300, _A, seq_len=128, total_batch_size=16),
              published_params="4.9M (vocab 8192)",
              note="4.9M parameters with the embedded 8192-token tokenizer; a step of 16 x 128 "
                   "tokens takes 1-2 s on 2 CPU cores, so the 300 steps take minutes"),
    LlamaSpec("llama_bench", 768, 2048, 12, 10, vocab_size=1024, max_position_embeddings=512,
              fira=_fira(0.01, 64, 200, 0.25, 1000, _A, seq_len=128),
              published_params="72M (vocab 1024)",
              note="matrix-dominated (98% of its 72M parameters in the attention and MLP matrices): the model of "
                   "benchmarks/memory_vs_adamw.py's CPU measurements; rank 64 = hidden / 12 (7B's recipe is "
                   "hidden / 64), so Fira's state is 12% of AdamW's, as at scale, not 34% as rank hidden / 4 gives"),
    # --- GaLore configs/llama_*.json ---
    LlamaSpec("llama_9m", 128, 352, 4, 4, fira=_fira(0.01, 32, 200, 0.25, 10_000, _A),
              published_params="9M"),
    LlamaSpec("llama_20m", 256, 688, 4, 4, fira=_fira(0.01, 64, 200, 0.25, 10_000, _A),
              published_params="20M"),
    LlamaSpec("llama_35m", 384, 1024, 8, 6, fira=_fira(0.01, 96, 200, 0.25, 10_000, _A),
              published_params="35M"),
    LlamaSpec("llama_60m", 512, 1376, 8, 8, fira=_fira(0.01, 128, 200, 0.25, 10_000),
              published_params="60M (58M counted)"),
    LlamaSpec("llama_71m", 512, 1368, 8, 12, fira=_fira(0.01, 128, 200, 0.25, 10_000, _A),
              published_params="71M"),
    LlamaSpec("llama_130m", 768, 2048, 12, 12, fira=_fira(0.01, 256, 200, 0.25, 20_000),
              published_params="130M (134M counted)"),
    LlamaSpec("llama_250m", 768, 2560, 16, 24, fira=_fira(0.01, 256, 200, 0.25, 40_000, _A),
              published_params="250M"),
    LlamaSpec("llama_350m", 1024, 2736, 16, 24, fira=_fira(0.01, 256, 200, 0.25, 60_000),
              published_params="350M (368M counted)"),
    LlamaSpec("llama_1b", 2048, 5461, 32, 24, fira=_fira(0.01, 512, 200, 0.0625, 100_000),
              published_params="1B (1.34B counted)"),
    LlamaSpec("llama_3b", 2560, 6848, 32, 32,
              fira=_fira(0.005, 640, 200, 0.0625, 100_000, _A, grad_clipping=1.0),
              published_params="3B"),
    LlamaSpec("llama_7b", 4096, 11008, 32, 32, max_position_embeddings=2048,
              fira=_fira(0.005, 64, 500, 0.0625, 10_000, grad_clipping=1.0),
              published_params="7B (6.74B counted)",
              note="Fira's pre_training_c4/scripts/llama_7b.sh: rank 64, 10K steps, grad clip 1.0 "
                   "(a second copy of the script, scripts/pre_training_c4/llama_7b.sh, says rank 512)"),
]}


def model_names() -> list[str]:
    """Names accepted by :func:`get_model_config`, smallest first."""
    return list(MODEL_CONFIGS)


def get_spec(name: str) -> LlamaSpec:
    """The :class:`LlamaSpec` of ``name`` (``"llama_60m"``; ``"60m"`` also works).

    Raises ``ValueError`` naming the accepted names for an unknown one.
    """
    key = str(name).lower()
    if not key.startswith("llama_"):
        key = f"llama_{key}"
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}: accepted names are "
                         f"{', '.join(MODEL_CONFIGS)}, or a path to a transformers config.json")
    return MODEL_CONFIGS[key]


def get_model_config(name_or_path: str, vocab_size: Optional[int] = None, tokenizer=None, **overrides):
    """``transformers.LlamaConfig`` from a table name or a config.json path.

    ``name_or_path``: a name of :data:`MODEL_CONFIGS` (``"llama_60m"``, or
    ``"60m"``), a path to a transformers ``config.json`` (GaLore's files work:
    their ``max_sequence_length`` becomes ``max_position_embeddings``), or a
    folder holding one.  ``vocab_size`` overrides the embedding rows; with
    ``tokenizer`` given, ``vocab_size`` defaults to ``len(tokenizer)`` and the
    config's bos/eos/pad ids are the tokenizer's.  ``overrides`` are further
    ``LlamaConfig`` fields.  Unknown names raise ``ValueError`` listing the
    accepted names; a missing path raises ``FileNotFoundError``.
    """
    from transformers import LlamaConfig

    if tokenizer is not None:
        vocab_size = vocab_size or len(tokenizer)
        overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
        overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")

    looks_like_path = os.sep in name_or_path or name_or_path.endswith(".json") or os.path.exists(name_or_path)
    if not looks_like_path:
        return get_spec(name_or_path).to_config(vocab_size, **overrides)

    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config {name_or_path!r} does not exist: give a name "
                                f"({', '.join(MODEL_CONFIGS)}) or a transformers config.json path")
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object (a transformers LlamaConfig), got {type(raw).__name__}")
    if raw.get("model_type", "llama") != "llama":
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not 'llama'")
    if "max_sequence_length" in raw and "max_position_embeddings" not in raw:
        raw["max_position_embeddings"] = raw.pop("max_sequence_length")
    if raw.get("pad_token_id") == -1:
        raw["pad_token_id"] = None
    for k in ("architectures", "transformers_version", "max_sequence_length"):
        raw.pop(k, None)
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
    raw.update(overrides)
    return LlamaConfig(**raw)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} not understood: use a torch.dtype or one of {', '.join(_DTYPES)}")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on a transformers model: ``activation_checkpointing_enable`` where
    transformers has it (5.x, where the old name warns that it goes away in v6), else
    ``gradient_checkpointing_enable`` (4.x)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(config, device: Union[str, torch.device] = "cpu",
                dtype: Union[str, torch.dtype] = torch.float32, seed: Optional[int] = None,
                attn_implementation: Optional[str] = None):
    """A freshly initialised ``transformers.LlamaForCausalLM`` of ``config``.

    ``config``: a ``LlamaConfig`` or anything :func:`get_model_config` accepts.
    ``device="meta"`` allocates nothing (parameters are shapes only; use
    ``model.to_empty(device=...)`` and re-initialise, as FSDP2 does) and takes
    well under a second even for llama_7b.  Parameters are created directly in
    ``dtype`` (no float32 copy).  ``seed`` seeds the initialisation.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if not isinstance(config, LlamaConfig):
        config = get_model_config(config)
    dtype = _as_dtype(dtype)
    if seed is not None:
        torch.manual_seed(seed)
    kw = {}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    ctx = torch.device(device) if str(device) == "meta" else contextlib.nullcontext()
    with ctx:
        model = LlamaForCausalLM._from_config(config, dtype=dtype, **kw)
    if str(device) != "meta":
        model = model.to(device)
    logger.debug("built LlamaForCausalLM: %.2fM params on %s (%s)",
                 sum(p.numel() for p in model.parameters()) / 1e6, device, dtype)
    return model


def count_params(config, vocab_size: Optional[int] = None) -> int:
    """Number of parameters of ``config``, embeddings and LM head included.

    Builds the model on the meta device: nothing is allocated and llama_7b takes
    well under a second.  ``config`` is a ``LlamaConfig`` or anything
    :func:`get_model_config` accepts.
    """
    from transformers import LlamaConfig

    if not isinstance(config, LlamaConfig):
        config = get_model_config(config, vocab_size=vocab_size)
    elif vocab_size is not None:
        config = LlamaConfig(**{**config.to_dict(), "vocab_size": vocab_size})
    model = build_model(config, device="meta")
    return sum(p.numel() for p in model.parameters())
