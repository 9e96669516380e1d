"""Shared by the DeepSpeed tests and their worker: the tiny LLaMA, its data, ds_configs, the single-process run.

Imported both by pytest (the single-process reference, no process group) and by tests/ds_worker.py (ranks).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, HIDDEN, LAYERS, HEADS, INTER = 128, 16, 64, 2, 4, 128

# The Fira block the exactness tests use: update_proj_gap 5 (SVD refresh at steps 0, 5, 10, ...), rank 8.
FIRA_PARAMS = {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01, "rank": 8, "update_proj_gap": 5,
               "alpha": 0.25, "proj_type": "std", "target_modules": ["attn", "mlp"]}


def tiny_llama(seed: int = 0):
    """LLaMA, hidden 64, 2 layers, 4 heads, SwiGLU 128, vocab 128, untied embeddings, fp32, same weights for a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def make_batches(steps: int, global_batch: int, seed: int = 0) -> torch.Tensor:
    """(steps, global_batch, SEQ) token ids from a sparse random Markov chain (a learnable structure: gradients
    with a few dominant directions). The same on every rank and in the single-process reference."""
    g = torch.Generator().manual_seed(1234 + seed)
    succ = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)  # each token has 3 likely successors
    x = torch.empty(steps * global_batch, SEQ, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (x.shape[0],), generator=g)
    for t in range(1, SEQ):
        choice = torch.randint(0, 3, (x.shape[0],), generator=g)
        nxt = succ[x[:, t - 1], choice]
        noise = torch.rand(x.shape[0], generator=g) < 0.1
        x[:, t] = torch.where(noise, torch.randint(0, VOCAB, (x.shape[0],), generator=g), nxt)
    return x.view(steps, global_batch, SEQ)


def ds_config(stage: int, dtype: str = "fp32", micro: int = 2, gas: int = 1, world: int = 2, clip: float = 0.0,
              fira: dict[str, Any] | None = None, opt_type: str = "fira") -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": clip,
        "optimizer": {"type": opt_type, "params": copy.deepcopy(fira if fira is not None else FIRA_PARAMS)},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "sub_group_size": 20000})
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def single_process_run(steps: int, global_batch: int, fira: dict[str, Any] | None = None, clip: float = 0.0,
                       seed: int = 0, svd_log: list | None = None) -> dict[str, Any]:
    """The reference: fira_dist.Fira on one process, whole global batch per step (mean loss), fp32.

    svd_log, if given, receives (name, step, sigma_r, sigma_r+1) at every projector refresh: the spectral gap at
    the rank cut decides how far rounding differences can move the projector.
    """
    from fira_dist import Fira
    from fira_dist.deepspeed import build_optimizer, parse_fira_block

    block = parse_fira_block(fira if fira is not None else FIRA_PARAMS)
    model = tiny_llama(seed)
    opt = build_optimizer(model, block)
    from fira_dist.layouts.single import SingleProcess

    opt.layout = SingleProcess(opt)
    assert isinstance(opt, Fira)
    names = {id(p): n for n, p in model.named_parameters()}
    rank = block.lowrank["rank"]
    gap = block.lowrank["update_proj_gap"]
    data = make_batches(steps, global_batch, seed)
    losses = []
    for step in range(steps):
        batch = data[step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if svd_log is not None and step % gap == 0:
            for g in opt.param_groups:
                if g.get("rank"):
                    for p in g["params"]:
                        s = torch.linalg.svdvals(p.grad.double())
                        k = min(rank, *p.shape)
                        if k < len(s):
                            svd_log.append((names[id(p)], step, float(s[k - 1]), float(s[k])))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}, "opt": opt}


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    d = float((a.double() - b.double()).abs().max())
    s = float(b.double().abs().max())
    return d / s if s > 0 else d


def min_relative_gap(svd_log: list) -> tuple[float, Any]:
    """min over refreshes of (sigma_r - sigma_r+1) / sigma_r, and where it was."""
    best, where = math.inf, None
    for name, step, a, b in svd_log:
        gap = (a - b) / a if a > 0 else 0.0
        if gap < best:
            best, where = gap, (name, step, a, b)
    return best, where
