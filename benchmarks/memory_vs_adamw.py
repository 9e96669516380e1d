"""Does Fira hold less per rank than AdamW, at the peak, under every strategy? Estimated at 7B, measured on CPU.

    python benchmarks/memory_vs_adamw.py                      # the 7B tables (estimates: seconds)
    python benchmarks/memory_vs_adamw.py --measure            # + real runs on CPU (minutes)
    python benchmarks/memory_vs_adamw.py --json results/memory_vs_adamw.json --markdown

1. LLaMA-7B, bf16-mixed, micro-batch 1 x 256 tokens, W = 8 and 64, strategies zero1, zero2, zero3, fsdp2, ddp:
   AdamW's and Fira's per-rank peak (``fira_dist.memory.estimate``, whose optimizer figures come from the
   layouts' own plans), with AdamW as its users run it: DeepSpeed's FusedAdam under ZeRO, torch.optim.AdamW
   (foreach) under FSDP2 and DDP. Goal per row: Fira's peak <= AdamW's peak - 0.8 x (AdamW's optimizer state -
   Fira's optimizer state).
2. The optimizer's bytes per regular step next to the bytes the framework moves itself (ZeRO: gradient
   reduce-scatter + parameter all-gather; FSDP2 the same per layer; DDP the gradient all-reduce), by the layouts'
   formulas (``memory.optimizer.optimizer_comm_bytes``, which the tests check against measured bytes).
   Goal: <= 5 % under ZeRO-1/2 at W = 8. And the refresh step's bytes, exact SVD against the distributed sketch.
3. ZeRO-1/2 locality: each rank's Fira state against total / W + the largest matrix's state.
4. ``--measure``: real runs on CPU (torchrun, gloo) of a matrix-dominated LLaMA (``llama_bench``: 72M parameters,
   98 % in the attention and MLP matrices) in fp32: the ds_config "adamw" type (DeepSpeed's own optimizer)
   against "fira" under ZeRO-2, and torch.optim.AdamW against Fira under FSDP2, at 2 and 4 ranks, through a
   refresh step and a regular step. Per rank: the peak memory growth from just before the first step (the CPU
   allocator's high-water mark, torch.profiler memory events) next to the estimate of the same quantity.
   Goals: Fira's growth below AdamW's by at least 70 % of AdamW's optimizer state per rank; estimate and
   measurement within 10 %.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fira_dist.memory import MemoryConfig, estimate, model_info  # noqa: E402
from fira_dist.layouts.plan import lowrank_state_numel  # noqa: E402
from fira_dist.memory.optimizer import optimizer_comm_bytes, optimizer_state  # noqa: E402
from fira_dist.projector import side_for  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
STRATEGIES = ("zero1", "zero2", "zero3", "fsdp2", "ddp")


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


# ------------------------------------------------------------------------------------------------ estimates
def peak_rows(model: str, worlds: list[int], micro_batch: int, precision: str) -> list[dict[str, Any]]:
    rows = []
    for W in worlds:
        for s in STRATEGIES:
            d = {o: estimate(MemoryConfig(model=model, optimizer=o, strategy=s, world_size=W, precision=precision,
                                          micro_batch=micro_batch)) for o in ("adamw", "fira")}
            a, f = d["adamw"], d["fira"]
            bar = a["peak"] - 0.8 * (a["optimizer_states"] - f["optimizer_states"])
            rows.append({"world_size": W, "strategy": s, "adamw": a["adamw_impl"],
                         "adamw_state": a["optimizer_states"], "fira_state": f["optimizer_states"],
                         "adamw_peak": a["peak"], "fira_peak": f["peak"], "ratio": f["peak"] / a["peak"],
                         "goal": bar, "met": f["peak"] <= bar, "fira_phase": f["peak_breakdown"]["phase"],
                         "adamw_phase": a["peak_breakdown"]["phase"], "fira_exchange": f["comm_step"],
                         "fira_workspace": f["optimizer_step_transient"], "budget": f["comm_bucket_bytes"]})
    return rows


def comm_rows(model: str, worlds: list[int], precision: str) -> list[dict[str, Any]]:
    rows = []
    for W in worlds:
        for s in STRATEGIES:
            cfg = MemoryConfig(model=model, optimizer="fira", strategy=s, world_size=W, precision=precision)
            d = estimate(cfg)
            info = model_info(model, "fira", d["config"]["rank"])
            r = d["rank"]
            full = MemoryConfig(**{**d["config"], "target_modules": tuple(d["config"]["target_modules"])})
            exact = optimizer_comm_bytes(info, full, r, full.rank, refresh="svd")
            sketch = optimizer_comm_bytes(info, full, r, full.rank, refresh="randomized")
            rows.append({"world_size": W, "strategy": s, "optimizer_bytes": d["optimizer_comm_bytes"],
                         "framework_bytes": d["framework_comm_bytes"],
                         "share": d["optimizer_comm_bytes"] / d["framework_comm_bytes"],
                         "refresh_exact": exact, "refresh_sketch": sketch})
    return rows


def state_bound_rows(model: str, worlds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for W in worlds:
        for s in ("zero1", "zero2"):
            cfg = MemoryConfig(model=model, optimizer="fira", strategy=s, world_size=W)
            info = model_info(model, "fira", estimate(cfg, rank=0)["config"]["rank"])
            rank = estimate(cfg, rank=0)["config"]["rank"]
            per = [optimizer_state(info, cfg, r, rank) for r in range(W)]
            tot = [x["projectors"] + x["moments"] + x["scalars"] for x in per]
            one = MemoryConfig(model=model, optimizer="fira", strategy="single")
            whole = optimizer_state(info, one, 0, rank)
            largest = max(4 * lowrank_state_numel(p.shape, rank, side_for(p.shape, "std")) + 4  # + step
                          for p in info.params if p.low_rank)
            bound = sum(tot) / W + largest
            rows.append({"world_size": W, "strategy": s, "max_state": max(tot), "mean_state": sum(tot) / W,
                         "largest_matrix_state": largest, "bound": bound, "within": max(tot) <= bound,
                         "one_process_state": whole["projectors"] + whole["moments"] + whole["scalars"]})
    return rows


# ------------------------------------------------------------------------------------------------ measured
MEASURE_MODEL = "llama_bench"
MEASURE_CASES = [("zero2", "adamw"), ("zero2", "fira"), ("fsdp2", "adamw"), ("fsdp2", "fira")]


def growth_estimate(d: dict[str, Any]) -> int:
    """Estimated peak minus what exists before the first step (the layouts' and DeepSpeed's construction:
    parameters, master weights, persistent communication buffers)."""
    return d["peak"] - d["params"] - d["master_params"] - d["comm_persistent"]


def measure(worlds: list[int], micro_batch: int, seq_len: int) -> list[dict[str, Any]]:
    from fira_dist.memory.measure import launch

    rows = []
    for W in worlds:
        cfgs = []
        for s, o in MEASURE_CASES:
            cfg = MemoryConfig(model=MEASURE_MODEL, optimizer=o, strategy=s, world_size=W, precision="fp32",
                               micro_batch=micro_batch, seq_len=seq_len, zero_reduce_bucket_size=1 << 24, device="cpu")
            filled = estimate(cfg, rank=0)["config"]
            cfgs.append(MemoryConfig(**{**filled, "target_modules": tuple(filled["target_modules"])}))
        results = launch(cfgs, steps=2, timeout=1800)
        for (s, o), cfg, per_rank in zip(MEASURE_CASES, cfgs, results):
            for m in per_rank:
                est = estimate(cfg, rank=m["rank"])
                rows.append({"world_size": W, "strategy": s, "optimizer": o, "rank": m["rank"],
                             "measured_growth": m["peak_allocated"] - m["live_before_first_step"],
                             "measured_peak": m["peak_allocated"], "estimated_peak": est["peak"],
                             "estimated_growth": growth_estimate(est),
                             "optimizer_state": m["optimizer_states"], "estimated_state": est["optimizer_states"]})
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def measure_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (W, strategy): the mean over ranks of AdamW's and Fira's measured and estimated growth. The ranks do the
    same work, but their measured peaks differ by up to 30 % from rank to rank and run to run (under ZeRO-2 on CPU
    DeepSpeed keeps a varying number of extra reduce-bucket-sized buffers from one step to the next; see
    docs/memory.md): the mean over ranks is the figure the goals are judged on; every rank's is printed too."""
    out = []
    for W in sorted({r["world_size"] for r in rows}):
        for s in sorted({r["strategy"] for r in rows}):
            pick = {o: [r for r in rows if (r["world_size"], r["strategy"], r["optimizer"]) == (W, s, o)]
                    for o in ("adamw", "fira")}
            if not all(pick.values()):
                continue
            m = {o: _mean([r["measured_growth"] for r in v]) for o, v in pick.items()}
            e = {o: _mean([r["estimated_growth"] for r in v]) for o, v in pick.items()}
            state = _mean([r["optimizer_state"] for r in pick["adamw"]])
            saved = m["adamw"] - m["fira"]
            out.append({"world_size": W, "strategy": s, "adamw_measured": m["adamw"], "fira_measured": m["fira"],
                        "adamw_estimated": e["adamw"], "fira_estimated": e["fira"], "adamw_state": state,
                        "saved": saved, "saved_share_of_adamw_state": saved / state, "met": saved >= 0.7 * state,
                        "estimate_error": {o: e[o] / m[o] - 1 for o in m},
                        "estimates_within_10pct": all(abs(e[o] / m[o] - 1) <= 0.10 for o in m)})
    return out


# ------------------------------------------------------------------------------------------------ printing
def print_tables(peaks, comms, bounds, measured, verdicts, model: str) -> None:
    print(f"## {model}: per-rank peak, AdamW vs Fira (bf16-mixed, micro-batch 1 x 256)\n")
    print("| W | strategy | AdamW | AdamW state | Fira state | AdamW peak | Fira peak | Fira/AdamW | goal: Fira <= | met |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in peaks:
        print(f"| {r['world_size']} | {r['strategy']} | {r['adamw']} | {gib(r['adamw_state'])} | {gib(r['fira_state'])} | "
              f"{gib(r['adamw_peak'])} | {gib(r['fira_peak'])} | {r['ratio']:.3f} | {gib(r['goal'])} | "
              f"{'yes' if r['met'] else 'NO'} |")
    print("\nGiB per rank. Fira's exchange budget: DeepSpeed's reduce bucket in bf16 (1 GB) under ZeRO, 64 MiB "
          "elsewhere.\n")
    print(f"## {model}: bytes per step and rank, the optimizer's against the framework's own\n")
    print("| W | strategy | optimizer, regular step (MiB) | framework (MiB) | share | refresh step, exact SVD (MiB) | "
          "refresh step, randomized sketch (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in comms:
        print(f"| {r['world_size']} | {r['strategy']} | {r['optimizer_bytes'] / MiB:.3f} | {r['framework_bytes'] / MiB:.0f} | "
              f"{100 * r['share']:.3f} % | {r['refresh_exact'] / MiB:.1f} | {r['refresh_sketch'] / MiB:.1f} |")
    print(f"\n## {model}: ZeRO-1/2 locality, Fira state per rank against total / W + the largest matrix's state\n")
    print("| W | strategy | max per rank (MiB) | mean (MiB) | largest matrix (MiB) | bound (MiB) | within |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in bounds:
        print(f"| {r['world_size']} | {r['strategy']} | {r['max_state'] / MiB:.1f} | {r['mean_state'] / MiB:.1f} | "
              f"{r['largest_matrix_state'] / MiB:.2f} | {r['bound'] / MiB:.1f} | {'yes' if r['within'] else 'NO'} |")
    if measured:
        print(f"\n## {MEASURE_MODEL} on CPU, fp32, a refresh step and a regular step: peak growth from before the "
              "first step\n")
        print("| W | strategy | optimizer | rank | measured growth (MiB) | estimated (MiB) | estimate/measured | "
              "optimizer state (MiB) |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for r in measured:
            print(f"| {r['world_size']} | {r['strategy']} | {r['optimizer']} | {r['rank']} | "
                  f"{r['measured_growth'] / MiB:.1f} | {r['estimated_growth'] / MiB:.1f} | "
                  f"{r['estimated_growth'] / r['measured_growth']:.3f} | {r['optimizer_state'] / MiB:.1f} |")
        print("\nMean over ranks (the goals' figures; see measure_verdicts):\n")
        print("| W | strategy | AdamW growth, measured / estimated (MiB) | Fira growth, measured / estimated (MiB) | "
              "AdamW - Fira, share of AdamW's state | goal >= 70 % | estimates within 10 % |")
        print("|---|---|---:|---:|---:|---|---|")
        for v in verdicts:
            print(f"| {v['world_size']} | {v['strategy']} | {v['adamw_measured'] / MiB:.1f} / {v['adamw_estimated'] / MiB:.1f} | "
                  f"{v['fira_measured'] / MiB:.1f} / {v['fira_estimated'] / MiB:.1f} | "
                  f"{100 * v['saved_share_of_adamw_state']:.1f} % | {'yes' if v['met'] else 'NO'} | "
                  f"{'yes' if v['estimates_within_10pct'] else 'NO'} (AdamW {100 * v['estimate_error']['adamw']:+.0f} %, "
                  f"Fira {100 * v['estimate_error']['fira']:+.0f} %) |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama_7b")
    ap.add_argument("--worlds", default="8,64", help="world sizes of the estimate tables")
    ap.add_argument("--measure", action="store_true", help="also run the CPU measurements (minutes)")
    ap.add_argument("--measure-worlds", default="2,4")
    ap.add_argument("--measure-micro-batch", type=int, default=2)
    ap.add_argument("--measure-seq-len", type=int, default=128)
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--measured-from", default=None, metavar="JSON",
                    help="print the measured tables of an earlier --measure run's --json instead of measuring again")
    a = ap.parse_args(argv)
    worlds = [int(w) for w in a.worlds.split(",")]
    peaks = peak_rows(a.model, worlds, 1, "bf16-mixed")
    comms = comm_rows(a.model, worlds, "bf16-mixed")
    bounds = state_bound_rows(a.model, worlds)
    measured, verdicts = [], []
    if a.measured_from:
        measured = json.loads(Path(a.measured_from).read_text())["measured"]
        verdicts = measure_verdicts(measured)
    elif a.measure:
        measured = measure([int(w) for w in a.measure_worlds.split(",")], a.measure_micro_batch, a.measure_seq_len)
        verdicts = measure_verdicts(measured)
    print_tables(peaks, comms, bounds, measured, verdicts, a.model)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"peaks": peaks, "comm": comms, "state_bounds": bounds,
                                            "measured": measured, "measured_verdicts": verdicts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
