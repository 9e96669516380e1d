"""Optimizer step time on LLaMA matrix shapes: fira_dist.Fira vs fira.FiraAdamW vs torch AdamW(foreach).

For each model size, the low-rank weights of one LLaMA (q, k, v, o, gate, up, down per layer) with fixed
random gradients (the dense embedding / norm parameters are left out: they are plain Adam in every
optimizer). Reports, in one run:
- steady-state step time (no projector refresh): median over --steps steps after a warm-up (the optimizers
  take turns step by step, so that a slow spell of a shared machine falls on all of them), and the time
  of the matrix products alone (2 per matrix for ours, 3 for the reference): the floor of ours/ref where
  the products dominate the step;
- refresh-step time (SVD of every matrix, then the step), exact SVD and randomized, the projectors alone
  (what a refresh adds to a step; both the best of 3), and the randomized
  projector's subspace error (sin of the largest principal angle, max over matrices) against the exact SVD,
  and the share of the exact projection's norm it captures, on the benchmark's i.i.d. gradients (a flat
  spectrum: the worst case) and on matrices with singular values 1/i.

    python benchmarks/optimizer_step.py                 # LLaMA-60M and -130M, prints a table
    python benchmarks/optimizer_step.py --sizes 60m --steps 5 --json out.json
    python benchmarks/optimizer_step.py --batching      # same-shape matrices one by one vs stacked
    python benchmarks/optimizer_step.py --moments       # the low-rank Adam: elementwise kernels vs fused

--sizes toy (hidden 64, 2 layers, rank 16) is for the tests: it runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import torch

from fira_dist import Fira
from fira_dist.algorithm import project, project_back
from fira_dist.projector import compute_projector, side_for, subspace_error

SIZES = {  # hidden, intermediate, layers, rank (the GaLore / Fira papers' settings, fira_dist.models)
    "60m": (512, 1376, 8, 128),
    "130m": (768, 2048, 12, 256),
    "1b": (2048, 5461, 24, 512),
    "7b_layer": (4096, 11008, 1, 64),  # one decoder layer of LLaMA-7B, Fira's 7B rank
    "toy": (64, 172, 2, 16),
}


def layer_shapes(hidden: int, inter: int) -> list[tuple[int, int]]:
    """q, k, v, o, gate, up, down as nn.Linear weights (out_features, in_features)."""
    return [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]


def matrices(hidden: int, inter: int, layers: int, seed: int = 0,
             device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, grad) pairs, layer after layer, drawn on ``device`` (the same values for a seed on one device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(s, generator=g, device=device) * 0.02, torch.randn(s, generator=g, device=device) * 1e-3)
            for _ in range(layers) for s in layer_shapes(hidden, inter)]


def make(kind: str, params: list[torch.nn.Parameter], rank: int, gap: int, projector: str = "svd"):
    group = {"params": params, "rank": rank, "update_proj_gap": gap, "alpha": 0.25, "proj_type": "std"}
    if kind == "fira_dist":
        return Fira([{**group, "projector": projector}], lr=1e-3)
    if kind == "reference":
        import fira

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fira.FiraAdamW([group], lr=1e-3)
    if kind == "adamw_fused":  # one kernel for all tensors (CUDA, and CPU from torch 2.4)
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def time_steps(opt, params, grads, n: int) -> list[float]:
    out = []
    for _ in range(n):
        for p, g in zip(params, grads):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(timers: dict, rounds: int) -> dict[str, list[float]]:
    """Each timer (a callable returning seconds) once per round, in turn: {name: [seconds per round]}."""
    out: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            out[name].append(timer())
    return out


def bench_size(name: str, steps: int, threads: int) -> dict:
    hidden, inter, layers, rank = SIZES[name]
    mats = matrices(hidden, inter, layers)
    grads = [g for _, g in mats]
    res: dict = {"size": name, "matrices": len(mats), "rank": rank, "threads": threads}
    # The optimizers take turns, one step each per round, so that a slower spell of a shared machine falls
    # on all of them alike; each kind's median over the rounds.
    runs = {}
    for kind in ("fira_dist", "reference", "adamw"):
        params = [torch.nn.Parameter(w.clone()) for w, _ in mats]
        runs[kind] = (make(kind, params, rank, gap=10**9), params)
        time_steps(*runs[kind], grads, 2)  # warm-up (first step: SVD)
    times = interleaved({kind: (lambda o=opt, p=params: time_steps(o, p, grads, 1)[0])
                         for kind, (opt, params) in runs.items()}, steps)
    for kind, ts in times.items():
        res[f"steady_{kind}_s"] = statistics.median(ts)
    del runs
    # The floor set by the matrix products alone: ours needs 2 per matrix (project, project back), the
    # reference 3 (it also projects G back for the residual). Where they dominate, ours/ref -> 2/3.
    prods = []
    for _, g in mats:
        side = side_for(g.shape, "std")
        k = min(rank, *g.shape)
        P = torch.randn(k, g.shape[1]) if side == "right" else torch.randn(g.shape[0], k)
        prods.append((g, P, side))

    def products(n: int) -> None:
        for g, P, side in prods:
            R = project(g, P, side)
            for _ in range(n - 1):
                project_back(R, P, side)

    products(3)  # warm-up
    res.update({f"products{n}_s": statistics.median(ts) for n, ts in interleaved(
        {n: (lambda n=n: _timed(lambda: products(n))) for n in (2, 3)}, max(3, steps)).items()})
    refresh = {}
    for kind, projector in (("fira_dist", "svd"), ("fira_dist", "randomized"), ("reference", "svd")):
        params = [torch.nn.Parameter(w.clone()) for w, _ in mats]
        opt = make(kind, params, rank, gap=1, projector=projector)  # every step refreshes
        time_steps(opt, params, grads, 1)
        refresh[f"refresh_{kind}_{projector}_s"] = (lambda o=opt, p=params: time_steps(o, p, grads, 1)[0])
    res.update({key: min(ts) for key, ts in interleaved(refresh, 3).items()})
    del refresh
    gen = torch.Generator().manual_seed(0)

    def projectors(kind: str) -> float:  # every matrix once: what a refresh adds to a step
        return _timed(lambda: [compute_projector(g, rank, side_for(g.shape, "std"), kind=kind, generator=gen)
                               for g in grads])

    for projector in ("svd", "randomized"):  # warm-up
        compute_projector(grads[-1], rank, side_for(grads[-1].shape, "std"), kind=projector, generator=gen)
    res.update({f"projectors_{kind}_s": min(ts) for kind, ts in interleaved(
        {kind: (lambda kind=kind: projectors(kind)) for kind in ("svd", "randomized")}, 3).items()})
    errs, energy, energy_decay = [], [], []
    gen = torch.Generator().manual_seed(1)
    for _, g in mats[:7]:  # one layer: each distinct shape
        side = side_for(g.shape, "std")
        for G, out in ((g, energy), (power_law(g.shape, gen), energy_decay)):
            exact = compute_projector(G, rank, side)
            approx = compute_projector(G, rank, side, kind="randomized", generator=torch.Generator().manual_seed(0))
            captured = (lambda P: float(torch.linalg.matrix_norm(project(G, P, side))))
            out.append(captured(approx) / captured(exact))
            if G is g:
                errs.append(subspace_error(approx, exact, side))
    # sin of the largest principal angle: ~1 for i.i.d. gradients (no spectral gap at the rank cut: any
    # near-top subspace is as good); the captured-norm ratio says how much of the exact projection is kept:
    # on the i.i.d. gradients (flat spectrum, the worst case) and on a decaying spectrum sigma_i ~ 1/i.
    res["randomized_subspace_error_max"] = max(errs)
    res["randomized_captured_norm_min"] = min(energy)
    res["randomized_captured_norm_decaying_min"] = min(energy_decay)
    return res


def power_law(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A matrix of the given shape with random singular vectors and singular values 1/i."""
    m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    return (U / torch.arange(1, k + 1, dtype=torch.float32)) @ V.T


def bench_moments(name: str, steps: int) -> dict:
    """One step's low-rank Adam over a size's low-rank moments (m, k) / (k, n): the seven elementwise kernels
    of algorithm.adam_normalized_ against the fused kernel of algorithm.lowrank_adam_ (what the optimizer
    uses), taking turns; medians over `steps` rounds."""
    from fira_dist.algorithm import adam_normalized_, lowrank_adam_
    from fira_dist.config import GroupOptions
    from fira_dist.projector import lowrank_shape

    hidden, inter, layers, rank = SIZES[name]
    shapes = [lowrank_shape(s, rank, side_for(s, "std")) for _ in range(layers) for s in layer_shapes(hidden, inter)]
    g = torch.Generator().manual_seed(0)
    Rs = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    o = GroupOptions.from_group({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0,
                                 "correct_bias": True, "rank": rank}, where="bench_moments")
    kinds = {"elementwise": adam_normalized_, "fused": lowrank_adam_}
    state = {k: [(torch.zeros(s), torch.zeros(s)) for s in shapes] for k in kinds}

    def timer(kind: str) -> float:
        return _timed(lambda: [kinds[kind](r, m, v, o) for r, (m, v) in zip(Rs, state[kind])])

    for k in kinds:
        timer(k)  # warm-up
    times = interleaved({k: (lambda k=k: timer(k)) for k in kinds}, steps)
    return {"size": name, "matrices": len(shapes), "numbers": sum(math.prod(s) for s in shapes),
            **{f"{k}_s": statistics.median(ts) for k, ts in times.items()}}


BATCH_SHAPES = [(64, 64), (128, 128), (192, 512), (256, 256), (256, 688), (512, 512), (512, 1376)]


def bench_batching(steps: int, count: int = 8) -> list[dict]:
    """Steady step of `count` same-shape matrices (rank min(m, n) / 4), one by one vs stacked."""
    import fira_dist.algorithm as algorithm

    rows = []
    saved = algorithm.STACKED_MAX_NUMEL
    for shape in BATCH_SHAPES:
        g = torch.Generator().manual_seed(0)
        grads = [torch.randn(shape, generator=g) * 1e-3 for _ in range(count)]
        row = {"shape": shape, "count": count}
        timers = {}
        for mode, limit in (("one_by_one", 0), ("batched", 2**62)):
            params = [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02) for _ in range(count)]
            opt = make("fira_dist", params, min(shape) // 4, gap=10**9)

            def timer(opt=opt, params=params, limit=limit) -> float:
                algorithm.STACKED_MAX_NUMEL = limit  # 0: every matrix alone in the 2-D form
                return time_steps(opt, params, grads, 1)[0]

            timer(), timer()  # warm-up
            timers[f"{mode}_s"] = timer
        row.update({key: statistics.median(ts) for key, ts in interleaved(timers, steps).items()})
        rows.append(row)
    algorithm.STACKED_MAX_NUMEL = saved
    return rows


def size_line(r: dict) -> str:
    """One model's row of the main table."""
    s_ours, s_ref, s_adam = (r[f"steady_{k}_s"] for k in ("fira_dist", "reference", "adamw"))
    f_svd, f_rand, f_ref = (r[k] for k in ("refresh_fira_dist_svd_s", "refresh_fira_dist_randomized_s",
                                           "refresh_reference_svd_s"))
    return (f"| llama_{r['size']} r={r['rank']} | {r['matrices']} | {1e3 * s_ours:.1f} / {1e3 * s_ref:.1f} / "
            f"{1e3 * s_adam:.1f} | {s_ours / s_ref:.2f}x | {s_ours / s_adam:.2f}x | {1e3 * r['products2_s']:.1f} / "
            f"{1e3 * r['products3_s']:.1f} | {r['products2_s'] / r['products3_s']:.2f}x | {f_svd:.2f} / {f_rand:.2f} / "
            f"{f_ref:.2f} | {f_rand / f_svd:.2f}x | {r['projectors_svd_s']:.2f} / {r['projectors_randomized_s']:.2f} | "
            f"{r['projectors_randomized_s'] / r['projectors_svd_s']:.2f}x | {r['randomized_subspace_error_max']:.2f} | "
            f"{r['randomized_captured_norm_min']:.3f} / {r['randomized_captured_norm_decaying_min']:.4f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60m,130m", help=f"comma-separated, from {sorted(SIZES)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steady-state steps per optimizer")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the results to this file")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--batching", action="store_true",
                      help="instead: same-shape matrices one by one vs stacked, for a range of shapes")
    mode.add_argument("--moments", action="store_true",
                      help="instead: the low-rank Adam of one step, elementwise kernels vs the fused kernel")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = args.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"--sizes {','.join(bad)} not accepted; expected from {sorted(SIZES)}")
    device = f"device: cpu, {args.threads} threads, torch {torch.__version__}"
    if args.moments:
        rows = [bench_moments(s, args.steps) for s in sizes]
        columns = ["model", "low-rank matrices", "moment numbers", "elementwise (ms)", "fused (ms)",
                   "fused / elementwise"]
        lines = [f"| llama_{r['size']} | {r['matrices']} | {r['numbers']} | {1e3 * r['elementwise_s']:.2f} | "
                 f"{1e3 * r['fused_s']:.2f} | {r['fused_s'] / r['elementwise_s']:.2f}x |" for r in rows]
    elif args.batching:
        from fira_dist.algorithm import STACKED_MAX_NUMEL

        rows = bench_batching(args.steps)
        device += f"; stacked now when m * n <= {STACKED_MAX_NUMEL}"
        columns = ["shape", "matrices", "one by one, 2-D (ms)", "stacked (ms)", "stacked / one by one"]
        lines = [f"| {r['shape'][0]}x{r['shape'][1]} | {r['count']} | {1e3 * r['one_by_one_s']:.2f} | "
                 f"{1e3 * r['batched_s']:.2f} | {r['batched_s'] / r['one_by_one_s']:.2f}x |" for r in rows]
    else:
        rows = [bench_size(s, args.steps, args.threads) for s in sizes]
        columns = ["model", "matrices", "steady: fira_dist / reference / AdamW (ms)", "ours/ref", "ours/AdamW",
                   "products only: 2 / 3 per matrix (ms)", "floor",
                   "refresh step: ours SVD / ours randomized / ref (s)", "rand/SVD",
                   "projectors alone: SVD / randomized (s)", "rand/SVD", "subspace err (sin max angle)",
                   "captured ||PG|| vs exact: flat / 1/i spectrum"]
        lines = [size_line(r) for r in rows]
    print(device)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
