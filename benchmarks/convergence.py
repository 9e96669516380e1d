"""Convergence evidence: AdamW (full rank) vs GaLore vs Fira on the same small LLaMA, same token budget; on request
also the methods of Glentis et al. 2025 (arXiv 2505.22922): low-rank factorized training (lowrank), the same with
restarts (lowrank+restarts: refactorization + momentum reset every --restart-every steps) and any optimizer with
momentum resets (fira+reset, galore+reset, adamw+reset).

Every run is a real `fira-dist pretrain` process (python -m fira_dist.pretrain), so what is measured is
what users run. Single-process runs for each optimizer and seed; with --distributed also Fira under
DeepSpeed ZeRO-2 and FSDP2 with 2 processes on the same global batch (micro-batch halved per rank).

    python benchmarks/convergence.py --distributed --publish docs   # the README's Results (~45 min, 2 CPU cores)
    python benchmarks/convergence.py --smoke               # a minute: a tiny model, 1 seed, for the tests
    python benchmarks/convergence.py --data 'my/*.txt'     # any local text instead of the embedded corpus
    python benchmarks/convergence.py --optimizers adamw,galore,fira,lowrank,lowrank+restarts,fira+reset

Each optimizer gets the same learning-rate sweep (--lr-grid, seed 0); the best learning rate is then run
with every seed (the seed-0 run is reused). Writes to --out (default results/convergence): runs/<name>/
(each run's metrics), results.json, results.md (the tables) and val_loss.png (validation loss against
tokens), and prints the tables; --publish DIR also copies results.md and val_loss.png to
DIR/convergence.md and DIR/convergence_val_loss.png. Finished runs with the same flags are reused
(--fresh reruns them). Rank ratio as the paper (LLaMA-60M: rank 128 of hidden 512, i.e. hidden/4), alpha 0.25;
lowrank uses the same rank for its factors and --lowrank-alpha (32, theirs); restarts and resets every
--restart-every steps with a --recovery-steps learning-rate ramp (theirs: 500 of 11k steps at 60M, 10).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KNOWN = ("adamw", "galore", "fira", "lowrank", "lowrank+restarts", "fira+reset", "galore+reset", "adamw+reset")


def method_flags(method: str, args: argparse.Namespace) -> list[str]:
    """The `fira-dist pretrain` flags of a method name (see KNOWN) after --optimizer: rank/alpha, resets (in the
    order earlier versions wrote them, so that their finished runs are still reused)."""
    base, _, extra = method.partition("+")
    flags = []
    if base == "lowrank":
        flags += ["--rank", str(args.rank), "--alpha", str(args.lowrank_alpha)]
    elif base != "adamw":
        flags += ["--rank", str(args.rank), "--alpha", str(args.alpha), "--update-proj-gap", str(args.update_proj_gap)]
    if extra:  # "restarts" (lowrank: the trainer also refactorizes) or "reset"
        flags += ["--momentum-reset-interval", str(args.restart_every), "--recovery-steps", str(args.recovery_steps)]
    return flags


def run_one(name: str, args: argparse.Namespace, optimizer: str, lr: float, seed: int, strategy: str,
            out: Path) -> dict:
    """One pretraining run; returns its summary.json plus the eval curve from metrics.jsonl."""
    run_dir = out / "runs" / name
    nproc = 1 if strategy == "single" else 2
    flags = [
        "--model", args.model, "--optimizer", optimizer.partition("+")[0], "--lr", str(lr), "--seed", str(seed),
        "--max-steps", str(args.steps), "--warmup-steps", str(max(1, args.steps // 10)),
        "--micro-batch-size", str(args.batch // nproc), "--seq-len", str(args.seq_len),
        "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
        "--save-every", "0", "--resume", "none", "--no-tensorboard", "--output-dir", str(run_dir),
        "--strategy", strategy, "--log-every", str(max(1, args.steps // 10)), *method_flags(optimizer, args),
    ]
    if args.data:
        flags += ["--data", args.data]
    if strategy == "deepspeed":
        cfg = {"train_micro_batch_size_per_gpu": args.batch // nproc, "gradient_accumulation_steps": 1,
               "gradient_clipping": 0.0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
        ds_path = run_dir / "ds_config.json"
        flags += ["--deepspeed", str(ds_path)]
    if not args.fresh and finished_with(run_dir, flags):  # the same run finished earlier: reuse it
        return load_run(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if strategy == "deepspeed":
        run_dir.mkdir(parents=True)
        ds_path.write_text(json.dumps(cfg, indent=1))
    # Threads per process: the caller's OMP_NUM_THREADS (e.g. 1 when two drivers share two cores), else the cores
    # split between the run's processes.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // nproc))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads}
    if nproc == 1:
        cmd = [sys.executable, "-m", "fira_dist.pretrain", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "fira_dist.pretrain", *flags]
    t0 = time.perf_counter()
    log_path = out / "runs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"run {name} failed with exit code {rc}; see {log_path}")
    (run_dir / "flags.json").write_text(json.dumps(flags))
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return load_run(run_dir)


def finished_with(run_dir: Path, flags: list[str]) -> bool:
    """Whether ``run_dir`` holds a run that finished (exit 0, every step) with exactly these flags."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        same = json.loads((run_dir / "flags.json").read_text()) == flags
    except (OSError, ValueError):
        return False
    return same and summary.get("exit_code") == 0 and summary.get("end_step") == summary.get("max_steps")


def load_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "eval":
                curve.append((rec["step"] * summary["tokens_per_step"], rec["eval_loss"]))
    summary["curve"] = curve
    return summary


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_bytes(args: argparse.Namespace, optimizer: str) -> dict[str, int]:
    """Weights and optimizer-state bytes of one process, from the memory estimator (the optimizers' own rules; for
    lowrank the factorized model of fira_dist.lowrank, plain Adam on every tensor)."""
    from fira_dist.memory import MemoryConfig, estimate
    from fira_dist.pretrain.data import load_tokenizer

    cfg = MemoryConfig(model=args.model, optimizer=optimizer.partition("+")[0], rank=args.rank, strategy="single",
                       world_size=1, precision="fp32", micro_batch=args.batch, seq_len=args.seq_len,
                       vocab_size=len(load_tokenizer()))
    d = estimate(cfg)
    return {"weights": int(d["params"]), "optimizer_states": int(d["optimizer_states"])}


def next_rate(tried: dict[float, float]) -> float | None:
    """The sweep's extension rule, the same for every method: when the rate with the lowest loss in ``tried``
    ({lr: final validation loss}) is the lowest rate tried, half of it; when it is the highest, twice it; else
    None (the best is inside the grid). A one-rate grid counts as its lowest end."""
    best = min(tried, key=tried.get)
    if best == min(tried):
        return float(f"{best / 2:.6g}")
    if best == max(tried):
        return float(f"{best * 2:.6g}")
    return None


def ordering(rows: list[dict]) -> list[str]:
    """Markdown lines ranking the single-process methods by mean final validation loss, each against the next:
    the gap, its standard error sqrt(s1^2/n1 + s2^2/n2) over the seeds, and whether the gap exceeds twice it
    ("resolved": beyond the seed spread). Empty with fewer than two methods of two or more seeds."""
    ranked = sorted((r for r in rows if r["seeds"] > 1 and "(" not in r["config"]), key=lambda r: r["val_loss_mean"])
    if len(ranked) < 2:
        return []
    lines = ["", "Ordering (single process, mean over seeds, lowest first; resolved: the gap exceeds twice its "
                 "standard error over the seeds):", "",
             "| method | next | gap in val loss | standard error of the gap | resolved |", "|---|---|---:|---:|---|"]
    for a, b in zip(ranked, ranked[1:]):
        gap = b["val_loss_mean"] - a["val_loss_mean"]
        se = math.sqrt(a["val_loss_std"] ** 2 / a["seeds"] + b["val_loss_std"] ** 2 / b["seeds"])
        lines.append(f"| {a['config']} | {b['config']} | {gap:.4f} | {se:.4f} | {'yes' if gap > 2 * se else 'no'} |")
    return lines


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_demo")
    ap.add_argument("--data", help="local text files (default: the embedded corpus)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sweep-steps", type=int, default=None,
                    help="steps of the learning-rate sweep's runs (default --steps: the sweep's seed-0 run is reused)")
    ap.add_argument("--batch", type=int, default=16, help="global sequences per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, help="projection rank (default hidden/4, the paper's ratio at 60M)")
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--lowrank-alpha", type=float, default=32.0, help="lowrank: W = (alpha / rank) B A (32)")
    ap.add_argument("--restart-every", type=int, default=50,
                    help="lowrank+restarts and OPT+reset: refactorization / momentum reset interval (50)")
    ap.add_argument("--recovery-steps", type=int, help="learning-rate ramp after each reset (min(10, K - 1))")
    ap.add_argument("--update-proj-gap", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", action="append", default=[], metavar="OPT=LR",
                    help="a fixed learning rate for an optimizer (no sweep for it)")
    ap.add_argument("--lr-grid", default="0.0025,0.005,0.01,0.02",
                    help="learning rates tried with seed 0 for each optimizer without --lr; the one with the lowest "
                         "final validation loss is then run with every seed (default %(default)s)")
    ap.add_argument("--extend-grid", type=int, default=2, metavar="N",
                    help="while the best rate of the sweep is its lowest (highest), also try half (twice) of it, at "
                         "most N more rates per optimizer (default %(default)s; 0: the grid only)")
    ap.add_argument("--optimizers", default="adamw,galore,fira",
                    help=f"comma-separated methods of {', '.join(KNOWN)} (default %(default)s)")
    ap.add_argument("--distributed", action="store_true", help="also Fira under DeepSpeed ZeRO-2 and FSDP2, 2 processes")
    ap.add_argument("--distributed-seeds", type=int, default=1, help="seeds for the distributed runs (1)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=10, help="micro-batches per rank per evaluation (0: the whole validation split)")
    ap.add_argument("--out", default=str(REPO / "results" / "convergence"))
    ap.add_argument("--fresh", action="store_true", help="rerun runs that already finished in --out")
    ap.add_argument("--publish", metavar="DIR", help="also copy results.md and val_loss.png into DIR")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, 1 seed (for the tests)")
    args = ap.parse_args(argv)
    known = KNOWN
    optimizers = args.optimizers.split(",")
    for opt in optimizers:
        if opt not in known:
            ap.error(f"--optimizers: {opt!r} is not one of {', '.join(known)}")
    lrs: dict[str, float] = {}
    for item in args.lr:
        opt, _, val = item.partition("=")
        try:
            lrs[opt] = float(val)
        except ValueError:
            opt = ""
        if opt not in known:
            ap.error(f"--lr {item!r} not accepted; expected OPT=LR with OPT in {', '.join(known)} and LR a number")
    if args.recovery_steps is None:
        args.recovery_steps = min(10, args.restart_every - 1)
    if args.restart_every < 1 or not 0 <= args.recovery_steps < args.restart_every:
        ap.error(f"--restart-every {args.restart_every} / --recovery-steps {args.recovery_steps} not accepted; expected "
                 "K >= 1 and R in [0, K - 1]")
    if args.extend_grid < 0:
        ap.error(f"--extend-grid {args.extend_grid} not accepted; expected a count >= 0 (0: the grid only)")
    try:
        grid = [float(x) for x in args.lr_grid.split(",")]
    except ValueError:
        ap.error(f"--lr-grid {args.lr_grid!r} not accepted; expected comma-separated numbers")
    if args.smoke:
        args.model, args.steps, args.batch, args.seq_len, args.rank = "llama_tiny", 6, 4, 32, 16
        args.seeds, args.eval_every, args.eval_batches, args.update_proj_gap = 1, 3, 2, 3
        args.restart_every, args.recovery_steps = 3, 1
        grid = grid[:2]
    if args.rank is None:
        from fira_dist.models import get_spec

        args.rank = get_spec(args.model).hidden_size // 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def one(opt: str, lr: float, seed: int, strategy: str = "single", steps: int | None = None) -> dict:
        if steps is None or steps == args.steps:
            return run_one(f"{opt}-{strategy}-lr{lr:g}-s{seed}", args, opt, lr, seed, strategy, out)
        short = argparse.Namespace(**{**vars(args), "steps": steps, "eval_every": max(1, min(args.eval_every, steps))})
        return run_one(f"{opt}-{strategy}-lr{lr:g}-s{seed}-sweep{steps}", short, opt, lr, seed, strategy, out)

    print(f"{args.steps} steps x {args.batch} seqs x {args.seq_len} tokens ({args.model}) per run; "
          f"lr grid {grid} for {', '.join(o for o in optimizers if o not in lrs) or 'none'}", flush=True)
    sweep: dict[str, list[tuple[float, float]]] = {}  # optimizer -> [(lr, final val loss of seed 0)]
    for opt in optimizers:
        if opt in lrs:
            continue
        tried = {lr: one(opt, lr, 0, steps=args.sweep_steps)["eval_last"]["eval_loss"] for lr in grid}
        for _ in range(args.extend_grid):
            nxt = next_rate(tried)
            if nxt is None:
                break
            print(f"  {opt}: lr {min(tried, key=tried.get):g} is the best at an end of the grid; trying {nxt:g}",
                  flush=True)
            tried[nxt] = one(opt, nxt, 0, steps=args.sweep_steps)["eval_last"]["eval_loss"]
        sweep[opt] = sorted(tried.items())
        lrs[opt] = min(sweep[opt], key=lambda t: t[1])[0]
        edge = " (still at an end of the extended grid)" if lrs[opt] in (sweep[opt][0][0], sweep[opt][-1][0]) else ""
        print(f"  {opt}: lr {lrs[opt]:g} has the lowest seed-0 validation loss{edge}", flush=True)

    runs: dict[str, list[dict]] = {}
    plan = [(opt, "single") for opt in optimizers]
    if args.distributed and "fira" in optimizers:
        plan += [("fira", "deepspeed"), ("fira", "fsdp2")]
    for opt, strategy in plan:
        key = opt if strategy == "single" else f"{opt} ({strategy}, 2 procs)"
        for seed in range(args.seeds if strategy == "single" else args.distributed_seeds):
            runs.setdefault(key, []).append(one(opt, lrs[opt], seed, strategy))

    rows = []
    for key, rs in runs.items():
        opt = key.split(" ")[0]
        final = [r["eval_last"]["eval_loss"] for r in rs]
        m, s = mean_std(final)
        rows.append({"config": key, "lr": lrs[opt], "seeds": len(rs), "val_loss_mean": m, "val_loss_std": s,
                     "restart_every": args.restart_every if "+" in opt else None,
                     "val_ppl_mean": statistics.fmean(math.exp(x) for x in final),
                     "tokens": rs[0]["tokens"], "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs),
                     "wall_s": statistics.fmean(r["wall_s"] for r in rs),
                     **{f"{k}_bytes": v for k, v in memory_bytes(args, opt).items()}, "final_losses": final})
    table = ["| optimizer | lr | seeds | final val loss (mean +- std) | val perplexity | optimizer state | weights + "
             "optimizer state | tokens | tokens/s | s per run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['config']} | {r['lr']:g} | {r['seeds']} | {r['val_loss_mean']:.4f} +- {r['val_loss_std']:.4f} "
                     f"| {r['val_ppl_mean']:.2f} | {r['optimizer_states_bytes'] / 2**20:.2f} MiB | "
                     f"{(r['weights_bytes'] + r['optimizer_states_bytes']) / 2**20:.2f} MiB | {r['tokens']:,} "
                     f"| {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |")
    header = (f"model {args.model}, {args.steps} steps x {args.batch} seqs x {args.seq_len} tokens, rank {args.rank}, "
              f"alpha {args.alpha}, update_proj_gap {args.update_proj_gap}, data {args.data or 'embedded corpus'}")
    if any(o.startswith("lowrank") for o in optimizers):
        header += f"; lowrank alpha {args.lowrank_alpha:g}"
    if any("+" in o for o in optimizers):
        header += f"; restarts / resets every {args.restart_every} steps, lr recovery {args.recovery_steps} steps"
    table += ordering(rows)
    if sweep:
        sweep_note = f", {args.sweep_steps} steps" if args.sweep_steps and args.sweep_steps != args.steps else ""
        cols = sorted({lr for pts in sweep.values() for lr, _ in pts})
        extended = f"; a rate outside {grid} was tried because the best sat at that end" if len(cols) > len(grid) else ""
        table += ["", f"Learning-rate sweep (seed 0{sweep_note}, final validation loss; the lowest is used above"
                      f"{extended}):", "",
                  "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for opt, pts in sweep.items():
            got = dict(pts)
            table.append(f"| {opt} | " + " | ".join(f"{got[lr]:.4f}" if lr in got else "-" for lr in cols) + " |")
    text = header + "\n\n" + "\n".join(table)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "lr_grid": grid, "sweep": sweep, "rows": rows,
                                                  "curves": {k: [r["curve"] for r in rs] for k, rs in runs.items()}},
                                                 indent=1))
    plot(runs, out / "val_loss.png", header)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'val_loss.png'}")
    if args.publish:
        dest = Path(args.publish)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.md", dest / "convergence.md")
        shutil.copyfile(out / "val_loss.png", dest / "convergence_val_loss.png")
        print(f"copied them to {dest / 'convergence.md'} and {dest / 'convergence_val_loss.png'}")
    return 0


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, rs in runs.items():
        n = min(len(r["curve"]) for r in rs)
        xs = [rs[0]["curve"][i][0] for i in range(n)]
        ys = [statistics.fmean(r["curve"][i][1] for r in rs) for i in range(n)]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{key} (mean of {len(rs)})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=8)  # the settings line, wrapped to the figure
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
