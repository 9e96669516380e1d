"""``fira-dist demo`` (``make demo``): pretrain a small LLaMA with Fira under DeepSpeed ZeRO-2, 2 processes.

No network, no GPU: the model is ``llama_demo`` (4.9M parameters with the embedded 8192-token tokenizer),
the data the embedded English corpus (fira_dist/data), the config ``ds_configs/demo_zero2.json``
(``"optimizer": {"type": "fira", ...}``, ZeRO stage 2, fp32). It launches the job itself with
``python -m torch.distributed.run --nproc-per-node 2`` and ``DS_ACCELERATOR=cpu`` (gloo), i.e. the same
``fira-dist pretrain`` command a cluster job runs, and ends with the job's summary: loss before and after,
eval perplexity before and after, per-rank peak memory, tokens/s.

    fira-dist demo                      # 100 steps, a few minutes on 2 CPU cores
    fira-dist demo --steps 10           # a quick look
    fira-dist demo -- --bf16            # anything after -- goes to fira-dist pretrain

The first DeepSpeed run in a fresh environment also compiles DeepSpeed's CPU communication op (g++,
about 40 s; cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DEMO_CONFIG = {  # the same as ds_configs/demo_zero2.json, for installs without the repository's ds_configs/
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "bf16": {"enabled": False},
    "gradient_clipping": 0.0,
    "optimizer": {"type": "fira", "params": {"lr": 0.01, "rank": 48, "update_proj_gap": 50, "alpha": 0.25,
                                             "weight_decay": 0.0, "target_modules": ["attn", "mlp"]}},
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config_path(output_dir: Path) -> Path:
    """ds_configs/demo_zero2.json of the repository, or a copy of DEMO_CONFIG written into ``output_dir``."""
    repo = Path(__file__).resolve().parents[1] / "ds_configs" / "demo_zero2.json"
    if repo.is_file():
        return repo
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "demo_zero2.json"
    path.write_text(json.dumps(DEMO_CONFIG, indent=1))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fira-dist demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (100)")
    p.add_argument("--nproc", type=int, default=2, help="processes (2)")
    p.add_argument("--output-dir", default="runs/demo", help="where metrics, checkpoints and summary.json go "
                                                             "(runs/demo; emptied first)")
    p.add_argument("--model", default="llama_demo")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("extra", nargs="*", help="after --: more fira-dist pretrain flags")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.nproc < 1:
        print(f"fira-dist demo: error: --steps={args.steps} and --nproc={args.nproc} must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo's own folder: every demo starts from step 0
    out.mkdir(parents=True)
    eval_every = max(1, args.steps // 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(args.nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "fira_dist.pretrain",
           "--model", args.model, "--strategy", "deepspeed", "--deepspeed", str(ds_config_path(out)),
           "--max-steps", str(args.steps), "--warmup-steps", str(max(1, args.steps // 10)),
           "--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len),
           "--eval-every", str(eval_every), "--eval-batches", "4", "--save-every", str(args.steps),
           "--keep-last", "1", "--log-every", "10", "--output-dir", str(out), "--resume", "none", *args.extra]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs ships with the package
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    print(f"fira-dist demo: {args.model} with Fira under DeepSpeed ZeRO-2, {args.nproc} processes on CPU, "
          f"{args.steps} steps, the embedded corpus\n  {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    wall = time.perf_counter() - t0
    summary = out / "summary.json"
    if rc != 0 or not summary.exists():
        print(f"fira-dist demo: the training job failed (exit {rc}) after {wall:.0f} s; see the log above",
              file=sys.stderr)
        return rc or 1
    s = json.loads(summary.read_text())
    ev0, ev1 = s.get("eval_first") or {}, s.get("eval_last") or {}
    print(f"fira-dist demo: done in {wall:.0f} s (launch and set-up included): loss {s['loss_first']:.3f} -> "
          f"{s['loss_last']:.3f}, eval perplexity {ev0.get('eval_ppl', float('nan')):.1f} -> "
          f"{ev1.get('eval_ppl', float('nan')):.1f}, {s['tokens_per_s']:,.0f} tokens/s; metrics in "
          f"{out / 'metrics.jsonl'} (TensorBoard: {out / 'tensorboard'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
