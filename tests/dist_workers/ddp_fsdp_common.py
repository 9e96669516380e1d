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
    losses, gaps = [], []
    for i, tokens in enumerate(batches(cfg, steps)):
        loss = loss_of(model, tokens)
        loss.backward()
        if i % cfg.update_proj_gap == 0:  # a refresh step: how well separated is the rank-k subspace?
            gaps.append(min_spectral_gap(opt))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "min_spectral_gap": min(gaps)}


def min_spectral_gap(opt) -> float:
    """min over the low-rank gradients of (s_k - s_{k+1}) / s_k at the rank cut k: the subspace the SVD picks moves
    by about (relative gradient perturbation) / gap, so this says how far a distributed run's projector can
    drift from one process's when the gradients differ in the last bits."""
    out = 1.0
    for g in opt.param_groups:
        if not g.get("rank"):
            continue
        for p in g["params"]:
            if p.grad is None:
                continue
            s = torch.linalg.svdvals(p.grad.double())
            k = min(g["rank"], *p.shape)
            if k < len(s):
                out = min(out, float((s[k - 1] - s[k]) / s[k - 1]))
    return out


def init_dist() -> tuple[int, int]:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def out_path(name: str) -> str:
    return os.path.join(os.environ["FIRA_TEST_OUT"], name)


# ---------------------------------------------------------------------- two matrices, three ranks
class TwoMatrices(nn.Module):
    """a: (20, 12), right projection; b: (2, 20), left projection with 2 rows, so under FSDP2 at W=3 rank 2
    holds none of its rows, and with two matrices rank 2 owns no state (DDP) and no SVD (either layout)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(12, 20, bias=False)
        self.b = nn.Linear(20, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def two_matrices_data(steps: int = 12, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, 12, generator=g), torch.randn(batch, 2, generator=g)) for _ in range(steps)]


# variant -> optimizer options; "nan" also puts a NaN into a.weight's gradient at step NAN_STEP (under FSDP2
# on one rank's rows only), which every rank must skip, as one process skips the whole matrix
TWO_VARIANTS = {"fira": {}, "galore": {"algorithm": "galore"}, "randomized": {"projector": "randomized"},
                "nan": {}}
NAN_STEP = 3


def two_matrices_optimizer(model: nn.Module, variant: str = "fira", **kw: Any):
    import fira_dist

    return fira_dist.Fira([{"params": [("a.weight", model.a.weight), ("b.weight", model.b.weight)], "rank": 4,
                            "update_proj_gap": 5,
                            "alpha": 0.5, **TWO_VARIANTS[variant]}], lr=1e-2, **kw)


def two_matrices_run(model: nn.Module, opt, fwd: nn.Module | None = None, rank: int = 0, world: int = 1,
                     split: bool = False, inject_nan: bool = False) -> list[float]:
    """Train on two_matrices_data(); split=True gives each rank its micro-batch (mean-reduced loss);
    inject_nan: put a NaN into this process's (local) gradient of a.weight at step NAN_STEP."""
    import warnings

    losses = []
    for i, (x, y) in enumerate(two_matrices_data()):
        if split:
            x, y = micro_batch(x, rank, world), micro_batch(y, rank, world)
        loss = torch.nn.functional.mse_loss((fwd or model)(x), y)
        loss.backward()
        if inject_nan and i == NAN_STEP:
            g = model.a.weight.grad
            (g.to_local() if hasattr(g, "to_local") else g)[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------- comparisons
LOSS_RTOL = 1e-4
PARAM_RTOL = 1e-4


def assert_matches(ref: dict[str, Any], got: dict[str, Any], bitwise: bool, what: str) -> dict[str, float]:
    """Losses within rtol 1e-4; each final parameter within rtol 1e-4 elementwise, with an absolute floor of
    1e-4 x the tensor's RMS for entries that sit near zero (an elementwise rtol alone is meaningless there), and
    within 1e-4 in relative Frobenius norm. bitwise=True: exactly equal. Returns the worst figures."""
    import math

    assert len(ref["losses"]) == len(got["losses"]), what
    if bitwise:
        assert got["losses"] == ref["losses"], f"{what}: losses differ"
        for k, v in ref["params"].items():
            assert torch.equal(got["params"][k], v), f"{what}: {k} differs (max {(got['params'][k] - v).abs().max():.3g})"
        return {"loss_rel": 0.0, "param_rel": 0.0}
    loss_rel = max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"]))
    assert loss_rel <= LOSS_RTOL, f"{what}: loss relative difference {loss_rel:.3g} > {LOSS_RTOL}"
    worst = 0.0
    for k, v in ref["params"].items():
        w = got["params"][k]
        rms = float(v.double().square().mean().sqrt())
        torch.testing.assert_close(w, v, rtol=PARAM_RTOL, atol=PARAM_RTOL * rms, msg=lambda m: f"{what}: {k}: {m}")
        rel = float((w - v).double().norm() / v.double().norm()) if v.norm() > 0 else float((w - v).double().norm())
        assert rel <= PARAM_RTOL, f"{what}: {k} relative norm difference {rel:.3g}"
        worst = max(worst, rel)
    assert math.isfinite(worst)
    return {"loss_rel": loss_rel, "param_rel": worst}


def check_state_and_svd(run: dict[str, Any], world: int, n_svd_total: int) -> list[str]:
    """Per-rank optimizer state <= total / W + the largest single parameter's state; SVD work (m n min(m, n)
    summed) per rank <= total / W + the largest single SVD; every SVD done once in the job. Returns a report."""
    ranks = run["ranks"]
    total, biggest = run["state_total"], run["state_max_single"]
    bound = total / world + biggest
    lines = [f"W={world}: state total {total} B, largest single {biggest} B, bound {bound:.0f} B"]
    for r in ranks:
        lines.append(f"  rank {r['rank']}: state {r['state_bytes']} B ({r['state_bytes'] / total:.2f} of total), "
                     f"SVDs {r['svd_count']}, SVD flops {r['svd_flops']}")
        assert r["state_bytes"] <= bound, lines
    assert sum(r["svd_count"] for r in ranks) == n_svd_total, lines
    flops = [r["svd_flops"] for r in ranks]
    assert max(flops) <= sum(flops) / world + run["svd_flops_max_single"], lines
    return lines


def finish() -> None:
    """Barrier, destroy the process group, and leave without interpreter finalization.

    About one run in ten on this 2-core machine, a gloo rank died at exit with "terminate called without an
    active exception" (SIGABRT) after all its work was done (a known teardown race between gloo's worker
    threads and interpreter finalization, pytorch/pytorch#179291); os._exit skips the finalization."""
    import sys

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
