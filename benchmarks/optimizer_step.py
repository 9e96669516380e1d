"""Optimizer step time on LLaMA matrix shapes: fira_dist.Fira vs fira.FiraAdamW vs torch AdamW(foreach).

For each model size, the low-rank weights of one LLaMA (q, k, v, o, gate, up, down per layer) with fixed
random gradients (the dense embedding / norm parameters are left out: they are plain Adam in every
optimizer). Reports, in one run:
- steady-state step time (no projector refresh): median over --steps steps after a warm-up;
- refresh-step time (SVD of every matrix, then the step), exact SVD and randomized, and the randomized
  projector's subspace error (sin of the largest principal angle, max over matrices) against the exact SVD.

    python benchmarks/optimizer_step.py                 # LLaMA-60M and -130M, prints a table
    python benchmarks/optimizer_step.py --sizes 60m --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from fira_dist import Fira
from fira_dist.projector import compute_projector, side_for, subspace_error

SIZES = {  # hidden, intermediate, layers, rank (the GaLore / Fira papers' settings)
    "60m": (512, 1376, 8, 128),
    "130m": (768, 2048, 12, 256),
}


def matrices(hidden: int, inter: int, layers: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, grad) pairs with the shapes of nn.Linear weights (out_features, in_features)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]
    return [(torch.randn(s, generator=g) * 0.02, torch.randn(s, generator=g) * 1e-3) for _ in range(layers) for s in shapes]


def make(kind: str, params: list[torch.nn.Parameter], rank: int, gap: int, projector: str = "svd"):
    group = {"params": params, "rank": rank, "update_proj_gap": gap, "alpha": 0.25, "proj_type": "std"}
    if kind == "fira_dist":
        return Fira([{**group, "projector": projector}], lr=1e-3)
    if kind == "reference":
        import fira

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fira.FiraAdamW([group], lr=1e-3)
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


def bench_size(name: str, steps: int, threads: int) -> dict:
    hidden, inter, layers, rank = SIZES[name]
    mats = matrices(hidden, inter, layers)
    grads = [g for _, g in mats]
    res: dict = {"size": name, "matrices": len(mats), "rank": rank, "threads": threads}
    for kind in ("fira_dist", "reference", "adamw"):
        params = [torch.nn.Parameter(w.clone()) for w, _ in mats]
        opt = make(kind, params, rank, gap=10**9)
        time_steps(opt, params, grads, 2)  # warm-up (first step: SVD)
        res[f"steady_{kind}_s"] = statistics.median(time_steps(opt, params, grads, steps))
    for kind, projector in (("fira_dist", "svd"), ("fira_dist", "randomized"), ("reference", "svd")):
        params = [torch.nn.Parameter(w.clone()) for w, _ in mats]
        opt = make(kind, params, rank, gap=1, projector=projector)  # every step refreshes
        time_steps(opt, params, grads, 1)
        res[f"refresh_{kind}_{projector}_s"] = min(time_steps(opt, params, grads, 1))
    errs, energy = [], []
    for _, g in mats[:7]:  # one layer: each distinct shape
        side = side_for(g.shape, "std")
        exact = compute_projector(g, rank, side)
        approx = compute_projector(g, rank, side, kind="randomized", generator=torch.Generator().manual_seed(0))
        errs.append(subspace_error(approx, exact, side))
        captured = (lambda P: float(torch.linalg.matrix_norm(g @ P.T if side == "right" else P.T @ g)))
        energy.append(captured(approx) / captured(exact))
    # sin of the largest principal angle: ~1 for i.i.d. gradients (no spectral gap at the rank cut: any
    # near-top subspace is as good); the captured-norm ratio says how much of the exact projection is kept.
    res["randomized_subspace_error_max"] = max(errs)
    res["randomized_captured_norm_min"] = min(energy)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60m,130m", help=f"comma-separated, from {sorted(SIZES)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steady-state steps per optimizer")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = args.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"--sizes {','.join(bad)} not accepted; expected from {sorted(SIZES)}")
    rows = [bench_size(s, args.steps, args.threads) for s in sizes]
    print(f"device: cpu, {args.threads} threads, torch {torch.__version__}")
    print("| model | matrices | steady: fira_dist / reference / AdamW (ms) | ours/ref | ours/AdamW "
          "| refresh: ours SVD / ours randomized / ref (s) | rand/SVD | subspace err (sin max angle) | captured ||PG|| vs exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s_ours, s_ref, s_adam = (r[f"steady_{k}_s"] for k in ("fira_dist", "reference", "adamw"))
        f_svd, f_rand, f_ref = (r[k] for k in ("refresh_fira_dist_svd_s", "refresh_fira_dist_randomized_s",
                                               "refresh_reference_svd_s"))
        print(f"| llama_{r['size']} r={r['rank']} | {r['matrices']} | {1e3 * s_ours:.1f} / {1e3 * s_ref:.1f} / "
              f"{1e3 * s_adam:.1f} | {s_ours / s_ref:.2f}x | {s_ours / s_adam:.2f}x | {f_svd:.2f} / {f_rand:.2f} / "
              f"{f_ref:.2f} | {f_rand / f_svd:.2f}x | {r['randomized_subspace_error_max']:.2f} | "
              f"{r['randomized_captured_norm_min']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
