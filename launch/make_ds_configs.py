#!/usr/bin/env python
"""Write ds_configs/llama_<size>_zero<stage>.json from the paper table (reproducible; do not hand-edit them).

The Fira numbers (lr, rank, update_proj_gap, alpha, gradient clipping, seq len 256, total batch 512) come
from ``fira_dist.models.MODEL_CONFIGS`` (``source="paper"``: the Fira paper and its
``pre_training_c4/scripts/llama_*.sh``), so there is one place that holds them. This file adds only what the
paper does not fix for DeepSpeed: the per-GPU micro batch and the ZeRO block of each stage.

    python launch/make_ds_configs.py            # (re)write the 15 files
    python launch/make_ds_configs.py --check    # exit 1 and name the files that differ (used by the tests)
    python launch/make_ds_configs.py --out DIR  # write somewhere else

Batch: ``train_batch_size`` is the paper's 512 sequences per optimizer step and
``train_micro_batch_size_per_gpu`` the per-GPU micro batch; ``gradient_accumulation_steps`` is left out on
purpose, so DeepSpeed derives it as 512 / (micro x world size) and the same file serves 1, 2, 4, 8 (and,
for 7B, up to 64) GPUs. ds_configs/README.md documents every key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "ds_configs"

# Sizes with published Fira hyper-parameters, and the per-GPU micro batch of each: 64 sequences of 256
# tokens for 60M-1B (the paper's 8-GPU scripts use 64 for 350M and 1B; 60M/130M fit 256 on one A100, 64 is
# what 8 GPUs x 64 = 512 needs), 8 for 7B (Fira's llama_7b.sh: --batch_size 8 on 8 A100s; 8 nodes x 8 GPUs
# x 8 = 512, one micro step per update).
SIZES: dict[str, int] = {"llama_60m": 64, "llama_130m": 64, "llama_350m": 64, "llama_1b": 64, "llama_7b": 8}
STAGES = (1, 2, 3)

_BUCKET = 500_000_000  # elements per reduce / all-gather bucket (DeepSpeed's default 5e8)


def zero_block(stage: int) -> dict:
    """``zero_optimization`` for one stage: DeepSpeed's defaults spelled out, no offload (Fira rejects it)."""
    if stage in (1, 2):
        return {
            "stage": stage,
            "contiguous_gradients": True,
            "overlap_comm": stage == 2,
            "reduce_scatter": True,
            "reduce_bucket_size": _BUCKET,
            "allgather_bucket_size": _BUCKET,
        }
    if stage == 3:
        return {
            "stage": 3,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "reduce_bucket_size": _BUCKET,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    raise ValueError(f"ZeRO stage {stage!r} is not accepted; expected one of {STAGES}")


def make_config(name: str, stage: int) -> dict:
    """The ds_config of model ``name`` (a key of SIZES) under ZeRO ``stage``."""
    from fira_dist.models import get_spec

    spec = get_spec(name)
    hp = spec.fira
    if hp.source != "paper":
        raise ValueError(f"{name}: its Fira hyper-parameters are source={hp.source!r}, not 'paper'")
    micro = SIZES[name]
    if hp.total_batch_size % micro:
        raise ValueError(f"{name}: micro batch {micro} does not divide the total batch {hp.total_batch_size}")
    return {
        "train_batch_size": hp.total_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_clipping": hp.grad_clipping,
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": True},
        "zero_optimization": zero_block(stage),
        "zero_allow_untested_optimizer": True,
        "optimizer": {
            "type": "fira",
            "params": {
                "lr": hp.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-6,
                "weight_decay": hp.weight_decay,
                "rank": hp.rank,
                "update_proj_gap": hp.update_proj_gap,
                "alpha": hp.alpha,
                "proj_type": "std",
                "target_modules": ["attn", "mlp"],
            },
        },
    }


def render(cfg: dict) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def all_configs() -> dict[str, str]:
    """File name -> file text, for every size and stage."""
    return {f"{name}_zero{stage}.json": render(make_config(name, stage)) for name in SIZES for stage in STAGES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ds_configs/)")
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on any difference")
    args = p.parse_args(argv)
    files = all_configs()
    if args.check:
        bad = [f for f, text in files.items()
               if not (args.out / f).is_file() or (args.out / f).read_text() != text]
        for f in bad:
            print(f"{args.out / f}: missing or out of date (run python launch/make_ds_configs.py)", file=sys.stderr)
        if not bad:
            print(f"{len(files)} ds_configs in {args.out} are up to date")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for f, text in files.items():
        (args.out / f).write_text(text)
    print(f"wrote {len(files)} files to {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
