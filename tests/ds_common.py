"""Shared by the DeepSpeed tests and their worker: the tiny LLaMA, its data, ds_configs, the single-process run.

Imported both by pytest (the single-process reference, no process group) and by tests/ds_worker.py (ranks).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def one_thread():
    """Run the single-process references on one thread: on a shared 2-core machine, two intra-op threads
    competing with other jobs make a 1 s run take 30 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_llama(seed: int = 0):
    """LLaMA, hidden 64, 2 layers, 4 heads, SwiGLU 128, vocab 128, untied embeddings, fp32, same weights for a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


ODD_IN, ODD_OUT = 37, 2


class OddMLP(torch.nn.Module):
    """Four linears whose ZeRO-3 slices cut rows everywhere at 2 and 3 ranks: (50, 37) right projection, (31, 50)
    left, (31, 31) right and square, (2, 31) left with rank covering it (the exact SVD) and fewer elements per rank
    than a row at 3 ranks. ``forward(batch)``: batch (B, 37 + 2) = [x, y] -> mean squared error of mlp(x) - y."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp0 = torch.nn.Linear(ODD_IN, 50, bias=False)
        self.mlp1 = torch.nn.Linear(50, 31, bias=False)
        self.mlp2 = torch.nn.Linear(31, 31, bias=False)
        self.mlp3 = torch.nn.Linear(31, ODD_OUT, bias=True)  # a bias: plain Adam beside the matrices

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        dt = self.mlp0.weight.dtype
        x, y = batch[:, :ODD_IN].to(dt), batch[:, ODD_IN:].to(dt)
        h = torch.tanh(self.mlp1(torch.tanh(self.mlp0(x))))
        out = self.mlp3(torch.tanh(self.mlp2(h)))
        return ((out.float() - y.float()) ** 2).mean()


def odd_mlp(seed: int = 0) -> OddMLP:
    torch.manual_seed(seed)
    return OddMLP().float()


def make_odd_batches(steps: int, global_batch: int, seed: int = 0) -> torch.Tensor:
    """(steps, global_batch, 39) rows [x, y]: x with a geometric spectrum (feature i scaled by 0.8^i), so gradients
    have well-separated singular values and the projectors do not move under rounding; y from a fixed teacher."""
    g = torch.Generator().manual_seed(4321 + seed)
    x = torch.randn(steps * global_batch, ODD_IN, generator=g) * (0.8 ** torch.arange(ODD_IN, dtype=torch.float32))
    teacher = torch.randn(ODD_IN, ODD_OUT, generator=g)
    y = torch.tanh(x @ teacher)
    return torch.cat([x, y], dim=1).view(steps, global_batch, ODD_IN + ODD_OUT)


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed) if kind == "llama" else odd_mlp(seed)


def batches(kind: str, steps: int, global_batch: int, seed: int = 0) -> torch.Tensor:
    return make_batches(steps, global_batch, seed) if kind == "llama" else make_odd_batches(steps, global_batch, seed)


def loss_of(model: Any, mb: torch.Tensor, kind: str) -> torch.Tensor:
    return model(input_ids=mb, labels=mb).loss if kind == "llama" else model(mb)


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
              fira: dict[str, Any] | None = None, opt_type: str = "fira", grad_accum_dtype: str | None = None
              ) -> dict[str, Any]:
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
    if grad_accum_dtype:  # bf16 + ZeRO-1 + fp32 accumulation: DeepSpeed's BF16_Optimizer instead of ZeRO's
        cfg["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    return cfg


def single_process_run(steps: int, global_batch: int, fira: dict[str, Any] | None = None, clip: float = 0.0,
                       seed: int = 0, svd_log: list | None = None, init: dict[str, torch.Tensor] | None = None,
                       kind: str = "llama") -> dict[str, Any]:
    """The reference: fira_dist.Fira on one process, whole global batch per step (mean loss), fp32.

    svd_log, if given, receives (name, step, sigma_r, sigma_r+1) at every projector refresh: the spectral gap at
    the rank cut decides how far rounding differences can move the projector.
    """
    from fira_dist import Fira
    from fira_dist.deepspeed import build_optimizer, parse_fira_block

    block = parse_fira_block(fira if fira is not None else FIRA_PARAMS)
    model = build(kind, seed)
    if init is not None:  # start from given weights (a run whose model was built under deepspeed.zero.Init)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(init[n])
    opt = build_optimizer(model, block)
    from fira_dist.layouts.single import SingleProcess

    opt.layout = SingleProcess(opt)
    assert isinstance(opt, Fira)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:  # the names DeepSpeed's engine gives the layout (they seed randomized projectors)
        g["param_names"] = [names[id(p)] for p in g["params"]]
    rank = block.lowrank["rank"]
    gap = block.lowrank["update_proj_gap"]
    data = batches(kind, steps, global_batch, seed)
    losses = []
    for step in range(steps):
        batch = data[step]
        loss = loss_of(model, batch, kind)
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
        losses.append(loss.item())
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


def svd_conditioning(steps: int, global_batch: int, fira: dict[str, Any] | None = None, trials: int = 3,
                     seed: int = 0, clip: float = 0.0, noise: float = 5e-6) -> dict[str, Any]:
    """How well-conditioned the projector refreshes of a single-process run are, at refreshes after step 0.

    After step 0 Fira keeps its moments in the coordinates of the old projector (the reference never rotates
    them), so the result depends on each singular vector (and its sign), not only on the subspace. Reported:
    - flips: kept singular vectors that an additive perturbation of G (``noise`` x max |G|: 5x the drift of a
      distributed run's gradient from one process's, measured 1.2e-6 of max |G| at step 20 of a ZeRO-1 run)
      turns away from the unperturbed one (cos < 0.99, e.g. a sign flip), summed over matrices, refreshes and
      ``trials``;
    - min_sigma_ratio: smallest sigma_min / sigma_1 (~1e-9: a rank-deficient gradient. Its null space is
      rounding noise, and the signs LAPACK's fp32 divide-and-conquer SVD returns can follow that noise);
    - min_vector_gap: smallest (sigma_i - sigma_i+1) / sigma_1 over i <= k (how far apart the kept vectors are);
    - min_cut_gap: smallest (sigma_k - sigma_k+1) / sigma_k (the subspace's gap).
    """
    from fira_dist.deepspeed import build_optimizer, parse_fira_block
    from fira_dist.layouts.single import SingleProcess

    block = parse_fira_block(fira if fira is not None else FIRA_PARAMS)
    rank, gap = block.lowrank["rank"], block.lowrank["update_proj_gap"]
    model = tiny_llama(seed)
    opt = build_optimizer(model, block)
    opt.layout = SingleProcess(opt)
    low = {id(p) for g in opt.param_groups if g.get("rank") for p in g["params"]}
    data = make_batches(steps, global_batch, seed)
    g = torch.Generator().manual_seed(7)
    out = {"flips": 0, "min_sigma_ratio": math.inf, "min_vector_gap": math.inf, "min_cut_gap": math.inf, "checked": 0}
    for step in range(steps):
        batch = data[step]
        model(input_ids=batch, labels=batch).loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if step % gap == 0 and step > 0:
            for p in model.parameters():
                if id(p) not in low:
                    continue
                G = p.grad.detach().float()
                k = min(rank, *G.shape)
                s = torch.linalg.svdvals(G.double())
                out["min_sigma_ratio"] = min(out["min_sigma_ratio"], float(s[-1] / s[0]))
                if k < len(s):
                    out["min_vector_gap"] = min(out["min_vector_gap"], float(((s[:k] - s[1:k + 1]) / s[0]).min()))
                    out["min_cut_gap"] = min(out["min_cut_gap"], float((s[k - 1] - s[k]) / s[k - 1]))

                def vecs(M):
                    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
                    return Vh[:k] if M.shape[0] >= M.shape[1] else U[:, :k].T

                base = vecs(G)
                for _ in range(trials):
                    noisy = G + noise * G.abs().max() * torch.randn(G.shape, generator=g)
                    out["flips"] += int(((vecs(noisy) * base).sum(1) < 0.99).sum())
                out["checked"] += trials * k
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _fira_entries(obj: Any) -> list[dict[str, Any]]:
    """Every {"fira_units": ..., "fira_layout": ...} dict inside a loaded DeepSpeed optimizer-state file, in order."""
    out = []
    if isinstance(obj, dict):
        if "fira_units" in obj:
            return [obj]
        for v in obj.values():
            out += _fira_entries(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _fira_entries(v)
    return out


def rewrite_as_layout_v1(folder: Path, world: int, shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """Rewrite a DeepSpeed checkpoint's Fira state (layout version 2) the way fira_dist 0.1.0 (layout version 1)
    wrote it: every matrix's whole state on one rank (here: the j-th matrix of a flat group on rank j % W, so
    most move), no "layout_version" in the meta. ZeRO-3 slices are assembled into whole tensors with the plan's
    ranges (``layouts.plan.zero3_ranges``). Returns how many matrices were rewritten."""
    from fira_dist.layouts import plan as P
    from fira_dist.projector import side_for

    files = [folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    loaded = [torch.load(f, weights_only=False) for f in files]
    entries = [_fira_entries(d) for d in loaded]
    count = 0
    for idx in range(len(entries[0])):
        units = [entries[r][idx]["fira_units"] for r in range(world)]
        stage = entries[0][idx]["fira_layout"]["zero_stage"]
        names = [n for n in shapes if any(n in u and "projector" in u[n] for u in units)]
        for j, name in enumerate(names):
            parts = [u.pop(name, None) for u in units]
            if stage != 3:
                full = next(p for p in parts if p is not None)
            else:
                m, n = shapes[name]
                side, k = side_for((m, n), "std"), min(rank, m, n)
                full = {"step": parts[0]["step"], "limiter_norm": parts[0]["limiter_norm"]}
                if side == "right":
                    full["projector"] = torch.cat([p["projector"] for p in parts])
                    for key in ("exp_avg", "exp_avg_sq"):
                        full[key] = torch.cat([p[key] for p in parts])
                else:
                    P_full = torch.empty(m, k)
                    for p, (lo, hi) in reversed(list(zip(parts, P.zero3_ranges(m * n, world)))):
                        t0, t1 = P.touched_rows(lo, hi, n)
                        P_full[t0:t1] = p["projector"]
                    full["projector"] = P_full
                    for key in ("exp_avg", "exp_avg_sq"):
                        full[key] = torch.cat([p[key] for p in parts], dim=1)
            units[j % world][name] = full
            count += 1
        for r in range(world):
            entries[r][idx]["fira_layout"].pop("layout_version", None)
    for d, f in zip(loaded, files):
        torch.save(d, f)
    return count
