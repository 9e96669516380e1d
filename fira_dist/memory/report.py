"""Reports of per-rank memory: human figures, tables (text, Markdown), stacked-bar plots, and the CLI
``fira-dist memory``.

``fira-dist memory --model llama_7b --optimizer fira --rank 64 --strategy zero2 --world-size 64`` prints one
rank's bytes of parameters, gradients, master weights, optimizer states (projectors and moments apart),
activations, communication buffers and the peak. ``--compare`` tabulates optimizers x strategies,
``--sweep-world-size`` world sizes, ``--json`` / ``--markdown`` print machine-readable figures / a table,
``--plot F.png`` draws one stacked bar per configuration (what is alive at its peak), ``--measure`` runs real
steps and prints measured next to estimated (``memory.measure``). docs/memory.md has the 7B tables;
benchmarks/memory_vs_adamw.py the comparison with AdamW.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence

from fira_dist.memory.config import ATTENTIONS, DS_REDUCE_BUCKET_SIZE, OPTIMIZERS, PRECISIONS, STRATEGIES, MemoryConfig
from fira_dist.memory.estimate import estimate

def human(n: float) -> str:
    """Bytes in GiB/MiB/KiB with three significant figures."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


ROWS = (
    ("params", "parameters"),
    ("grads", "gradients"),
    ("master_params", "master weights"),
    ("optimizer_projectors", "optimizer: projectors"),
    ("optimizer_moments", "optimizer: moments"),
    ("optimizer_scalars", "optimizer: step/limiter"),
    ("optimizer_states", "optimizer states (total)"),
    ("activations_saved", "activations: saved for bwd"),
    ("activations", "activations (with transients)"),
    ("comm_buffers", "communication buffers"),
    ("optimizer_step_transient", "optimizer step temporaries"),
    ("peak", "peak"),
)


def describe(cfg: dict[str, Any]) -> str:
    ck = "on" if cfg["activation_checkpointing"] else "off"
    opt = cfg["optimizer"] + (f" rank {cfg['rank']}" if cfg["optimizer"] != "adamw" else "")
    return (f"{cfg['model']}, {opt}, {cfg['strategy']} x {cfg['world_size']}, {cfg['precision']}, micro-batch "
            f"{cfg['micro_batch']} x seq {cfg['seq_len']}, activation checkpointing {ck}")


def format_single(d: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    lines = [f"per-rank memory (rank {d['rank']}): {describe(d['config'])}",
             f"model: {d['model_params'] / 1e6:.2f}M parameters, {d['lowrank_matrices']} low-rank matrices"]
    head = f"{'':30s} {'estimated':>12s}"
    if measured is not None:
        head += f" {'measured':>12s} {'diff':>8s}"
    lines.append(head)
    for key, label in ROWS:
        row = f"{label:30s} {human(d[key]):>12s}"
        if measured is not None:
            m = measured.get(key)
            if m is None:
                row += f" {'-':>12s}"
            else:
                diff = f"{100.0 * (m - d[key]) / d[key]:+.1f}%" if d[key] else ("0" if m == 0 else "n/a")
                row += f" {human(m):>12s} {diff:>8s}"
        lines.append(row)
    for n in d["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def format_table(results: Sequence[dict[str, Any]], title: str, label: Any = None) -> str:
    """One row per configuration, one column per component, in GiB."""
    label = label or (lambda d: f"{d['config']['optimizer']} / {d['config']['strategy']} / W={d['config']['world_size']}")
    cols = [("params", "params"), ("grads", "grads"), ("master_params", "master"),
            ("optimizer_projectors", "proj"), ("optimizer_moments", "moments"), ("optimizer_states", "opt"),
            ("activations", "activ"), ("comm_buffers", "comm"), ("peak", "peak")]
    width = max(len(label(d)) for d in results) if results else 10
    lines = [title, f"{'configuration':{width}s} " + " ".join(f"{c:>8s}" for _, c in cols) + "   (GiB per rank)"]
    for d in results:
        lines.append(f"{label(d):{width}s} " + " ".join(f"{gib(d[k]):>8s}" for k, _ in cols))
    return "\n".join(lines)


def markdown_table(results: Sequence[dict[str, Any]], label: Any) -> str:
    """One Markdown row per configuration, GiB per rank."""
    cols = [("params", "params"), ("grads", "grads"), ("master_params", "master"),
            ("optimizer_projectors", "projectors"), ("optimizer_moments", "moments"),
            ("activations", "activations"), ("comm_buffers", "comm buffers"),
            ("optimizer_step_transient", "step temporaries"), ("peak", "peak")]
    out = ["| configuration | " + " | ".join(c for _, c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for d in results:
        out.append(f"| {label(d)} | " + " | ".join(gib(d[k]) for k, _ in cols) + " |")
    return "\n".join(out)


PLOT_KEYS = (("params", "parameters"), ("grads", "gradients"), ("master_params", "master weights"),
             ("optimizer_projectors", "projectors"), ("optimizer_moments", "moments"),
             ("optimizer_scalars", "step/limiter"), ("activations", "activations"),
             ("comm_buffers", "comm buffers"), ("temporaries", "temporaries"))


def plot(results: Sequence[dict[str, Any]], path: str, title: str = "", label: Any = None) -> None:
    """Stacked bars, one per configuration (GiB per rank): what is alive at the peak (``peak_breakdown``), so
    each bar's height is the peak; the phase of the peak is written above the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = label or (lambda d: f"{d['config']['optimizer']}\n{d['config']['strategy']}\nW={d['config']['world_size']}")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(results) + 2), 5.0))
    xs = list(range(len(results)))
    bottom = [0.0] * len(results)
    for key, name in PLOT_KEYS:
        vals = [d["peak_breakdown"][key] / (1 << 30) for d in results]
        ax.bar(xs, vals, bottom=bottom, label=name, width=0.7)
        bottom = [b + v for b, v in zip(bottom, vals)]
    short = {"forward/backward": "fwd/bwd", "end of backward": "bwd end", "optimizer step": "step"}
    for x, d in zip(xs, results):
        ax.text(x, d["peak"] / (1 << 30), short[d["peak_breakdown"]["phase"]], ha="center", va="bottom", fontsize=6)
    ax.set_xticks(xs)
    ax.set_xticklabels([label(d) for d in results], fontsize=7)
    ax.set_ylabel("GiB per rank")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_measurement(m: dict[str, Any]) -> str:
    req, cfg = m["requested"], m["config"]
    lines = []
    if (req["model"], req["world_size"]) != (cfg["model"], cfg["world_size"]):
        lines.append(f"requested {req['model']} x {req['world_size']} ranks; measured at {cfg['model']} x "
                     f"{cfg['world_size']} ranks (what fits here), next to the estimate of that configuration")
    for r in m["ranks"]:
        meas = dict(r["measured"])
        meas.setdefault("optimizer_projectors", meas.get("projectors"))
        meas["optimizer_projectors"] = meas.get("projectors")
        meas["optimizer_moments"] = meas.get("moments")
        meas["optimizer_scalars"] = meas.get("scalars")
        meas["activations"] = None  # transients are only seen in the peak
        meas["peak"] = meas.get("peak_allocated")
        lines.append(format_single(r["estimated"], measured=meas))
        where = "CUDA max_memory_allocated" if str(r["measured"].get("device", "")).startswith("cuda") else \
            "CPU allocator, torch.profiler memory events"
        lines.append(f"measured peak: {where}; peak RSS {human(meas['peak_rss'])} (includes the Python/torch runtime)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fira-dist memory", description=__doc__.split("\n\n")[1].split("``--compare")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_7b", help="a name (llama_tiny, llama_9m ... llama_7b) or a config.json")
    p.add_argument("--optimizer", default=None,
                   help="adamw, galore, fira, lowrank; comma-separated with --compare (default fira; with --compare "
                        "all four)")
    p.add_argument("--rank", type=int, default=None, help="projection rank (default: the model's Fira rank)")
    p.add_argument("--target-modules", default="attn,mlp", help="names of the projected linears (comma-separated)")
    p.add_argument("--proj-type", default="std")
    p.add_argument("--strategy", default=None,
                   help=f"{', '.join(STRATEGIES)}; comma-separated with --compare (default single; with --compare "
                        "zero1,zero2,zero3,fsdp2)")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default 1 for single, else 8)")
    p.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    p.add_argument("--state-dtype", default=None, choices=("fp32", "bf16"))
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--attention", default="sdpa", choices=ATTENTIONS)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--ddp-bucket-view", action="store_true")
    p.add_argument("--zero-reduce-bucket-size", type=int, default=DS_REDUCE_BUCKET_SIZE)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="where the run happens: torch's AdamW is foreach on CUDA, a loop per tensor on CPU")
    p.add_argument("--comm-bucket-bytes", type=float, default=None,
                   help="Fira's exchange budget (default: DeepSpeed's reduce bucket in the gradients' dtype under ZeRO, "
                        "else 64 MiB)")
    p.add_argument("--rank-index", type=int, default=None, help="report this rank (default: the rank with the highest peak)")
    p.add_argument("--compare", action="store_true", help="one table across --optimizer x --strategy lists "
                   "(default adamw,galore,fira x zero1,zero2,zero3,fsdp2)")
    p.add_argument("--sweep-world-size", default=None, metavar="W1,W2,...", nargs="?", const="1,8,64,512,4096",
                   help="one row per world size (default list 1,8,64,512,4096)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (GiB per rank)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="stacked bars per configuration")
    p.add_argument("--measure", action="store_true", help="run real steps and print measured next to estimated")
    p.add_argument("--measure-steps", type=int, default=3)
    p.add_argument("--measure-model", default=None, help="model to measure at (default: --model if it fits, else llama_20m)")
    p.add_argument("--measure-world-size", type=int, default=None, help="ranks to measure with (default min(W, 2) on CPU)")
    return p


def _configs(args: argparse.Namespace) -> list[MemoryConfig]:
    # Defaults: one fira / single row; --compare without a list: every optimizer x every distributed strategy. A
    # list given explicitly (even "single") is used as given.
    optimizer = args.optimizer or (",".join(OPTIMIZERS) if args.compare else "fira")
    strategy = args.strategy or ("zero1,zero2,zero3,fsdp2" if args.compare else "single")
    opts = [o.strip() for o in optimizer.split(",") if o.strip()]
    strats = [s.strip() for s in strategy.split(",") if s.strip()]
    if args.sweep_world_size:
        sizes = [int(w) for w in args.sweep_world_size.split(",")]
    else:
        sizes = [args.world_size]
    base = dict(model=args.model, rank=args.rank, target_modules=tuple(t for t in args.target_modules.split(",") if t),
                proj_type=args.proj_type, precision=args.precision, state_dtype=args.state_dtype,
                micro_batch=args.micro_batch, seq_len=args.seq_len, activation_checkpointing=args.activation_checkpointing,
                attention=args.attention, vocab_size=args.vocab_size, ddp_bucket_view=args.ddp_bucket_view,
                zero_reduce_bucket_size=args.zero_reduce_bucket_size, comm_bucket_bytes=args.comm_bucket_bytes,
                device=args.device)
    out = []
    for w in sizes:
        for s in strats:
            for o in opts:
                ws = 1 if s == "single" else (w if w is not None else 8)
                if s == "single" and ws != w and w not in (None, 1) and len(sizes) > 1:
                    continue
                out.append(MemoryConfig(optimizer=o, strategy=s, world_size=ws, **base))
    # one single-process row per optimizer even in a world-size sweep
    seen, uniq = set(), []
    for c in out:
        key = json.dumps(dataclasses.asdict(c), sort_keys=True)
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        configs = _configs(args)
        results = [estimate(c, rank=args.rank_index) for c in configs]
    except (ValueError, FileNotFoundError) as err:
        print(f"fira-dist memory: {err}", file=sys.stderr)
        return 2
    measured = None
    if args.measure:
        from fira_dist.memory import measure as memory_measure

        measured = [memory_measure.measure_configuration(c, steps=args.measure_steps, model=args.measure_model,
                                                         world_size=args.measure_world_size) for c in configs]
    if args.json:
        payload = {"configurations": results}
        if measured is not None:
            payload["measured"] = measured
        print(json.dumps(payload, indent=1))
    elif measured is not None:
        for m in measured:
            print(format_measurement(m))
            print()
    elif args.markdown:
        print(markdown_table(results, lambda d: f"{d['config']['optimizer']} / {d['config']['strategy']} / "
                                                f"W={d['config']['world_size']}"))
    elif len(results) == 1:
        print(format_single(results[0]))
    else:
        c0 = results[0]["config"]
        title = (f"{c0['model']}, {c0['precision']}, micro-batch {c0['micro_batch']} x seq {c0['seq_len']}, "
                 f"activation checkpointing {'on' if c0['activation_checkpointing'] else 'off'}"
                 + (f", rank {c0['rank']}" if any(d['config']['optimizer'] != 'adamw' for d in results) else ""))
        print(format_table(results, title))
    if args.plot:
        c0 = results[0]["config"]
        plot(results, args.plot, title=f"{c0['model']}: per-rank memory ({c0['precision']}, micro-batch "
             f"{c0['micro_batch']} x {c0['seq_len']})")
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
