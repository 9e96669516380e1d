"""Shared pieces of the DDP / FSDP2 / DCP tests: a tiny LLaMA, its data, the optimizer, and a training loop
that runs the same global batch in one process or split across ranks.

Used by the workers in this folder (launched with torchrun) and, for the single-process reference, by the
pytest process itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

HIDDEN = 32
VOCAB = 131  # odd: embedding and lm_head rows divide by neither 2 nor 3
SEQ = 16
GLOBAL_BATCH = 6  # divides by 2 and 3


@dataclasses.dataclass
class RunConfig:
    steps: int = 32
    lr: float = 3e-3
    rank: int = 8
    update_proj_gap: int = 10
    alpha: float = 0.25
    weight_decay: float = 0.01
    seed: int = 0
    data_seed: int = 1


def tiny_llama(seed: int = 0) -> nn.Module:
    """2-layer LLaMA (hidden 32, GQA: k/v are 16 x 32, so left-projected like down_proj), fp32, plus one
    low-rank-group matrix that the forward never uses (so it never gets a gradient)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * SEQ,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.model.layers[0].mlp.unused_proj = nn.Linear(HIDDEN, 24, bias=False)  # never called in forward
    return model


def batches(cfg: RunConfig, steps: int | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.data_seed)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps or cfg.steps)]


def make_optimizer(model: nn.Module, cfg: RunConfig, **kw: Any):
    import fira_dist

    groups = fira_dist.param_groups(model, target_modules=("attn", "mlp", "lm_head"), rank=cfg.rank,
                                    update_proj_gap=cfg.update_proj_gap, alpha=cfg.alpha)
    return fira_dist.Fira(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


def micro_batch(tokens: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = tokens.shape[0] // world
    return tokens[rank * per:(rank + 1) * per]


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def run_single(cfg: RunConfig, steps: int | None = None) -> dict[str, Any]:
    """The reference: one process, the whole global batch, layout 'single'."""
    model = tiny_llama(cfg.seed)
    opt = make_optimizer(model, cfg, layout="single")
    losses = []
    for tokens in batches(cfg, steps):
        loss = loss_of(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def init_dist() -> tuple[int, int]:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def out_path(name: str) -> str:
    return os.path.join(os.environ["FIRA_TEST_OUT"], name)
