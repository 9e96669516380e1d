"""The flags of ``fira-dist pretrain`` and their validation into a :class:`Plan`.

:func:`resolve` checks every flag before anything is started (and the ds_config, data paths, tokenizer,
resume checkpoint): a bad value raises :class:`UsageError` naming the flag, the value and what is accepted
(exit 2). ``ds_merge.py`` merges the flags into a ds_config; ``dry_run.py`` prints the plan with the model on
the meta device.

Exit codes (also written to ``OUTPUT/exit_status.json`` by rank 0, since ``torchrun`` reports 1 for any
failing worker):

    0  done (--max-steps reached)
    1  unexpected error (traceback in the log)
    2  bad flag or config value: the message names the flag, the value and what is accepted
    3  EXIT_REQUEUE: SIGTERM or SIGUSR1 received; every rank finished the same step and a checkpoint was
       written; requeue the job with the same command (``--resume auto``, the default, picks it up)
    4  --max-bad-steps consecutive non-finite steps; a checkpoint of the last good state was written
    5  a collective failed or waited longer than --dist-timeout (a rank died or hangs)

Precedence under ``--strategy deepspeed``: the ds_config wins. Its optimizer block (``"type": "fira"`` with
``params``), batch sizes, ``bf16`` and ``gradient_clipping`` are used as written; the CLI fills in what the
config lacks (an ``optimizer`` block is added from --optimizer/--lr/--rank/... when there is none). An
explicitly given batch flag that disagrees with the config is an error; other disagreeing flags are
ignored with a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

from fira_dist.pretrain import checkpoint as C
from fira_dist.pretrain import distributed as D
from fira_dist.pretrain.ds_merge import merge_ds_config
from fira_dist.pretrain.train_utils import UsageError, flag_error

log = logging.getLogger("fira_dist.pretrain")

STRATEGIES = ("single", "ddp", "fsdp2", "deepspeed")
OPTIMIZERS = ("fira", "galore", "adamw", "lowrank")
LOWRANK_ALPHA, LOWRANK_LR = 32.0, 0.0015  # Glentis et al. 2025's LLaMA-60M low-rank recipe (with rank 128)
FSDP_META_INIT_PARAMS = 1_000_000_000  # --init auto: FSDP2 models above this size are built on the meta device


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of sys.exit, so main() returns 2 with the message
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fira-dist pretrain", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Pretrain a LLaMA (transformers LlamaForCausalLM) with Fira, GaLore, AdamW or low-rank "
                            "factorized weights under one process, DDP, FSDP2 or DeepSpeed.",
                epilog=__doc__[__doc__.index("Exit codes"):])
    g = p.add_argument_group("model and strategy")
    g.add_argument("--model", default="llama_60m",
                   help="a table name (llama_tiny, llama_demo, llama_9m ... llama_7b; '60m' works too) or a transformers "
                        "config.json (GaLore's configs/llama_*.json work). Default llama_60m")
    g.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="single (one process), ddp, fsdp2 (fully_shard per decoder layer), deepspeed (needs "
                        "--deepspeed). Default: single for one process, ddp for several")
    g.add_argument("--deepspeed", metavar="PATH", help="ds_config JSON for --strategy deepspeed (it wins; see below)")
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 compute with fp32 master weights and optimizer state (autocast for single/ddp, "
                        "MixedPrecisionPolicy for fsdp2, the ds_config's bf16 block for deepspeed)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers in backward")
    g.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu (gloo)")
    g.add_argument("--init", choices=("auto", "full", "meta"), default="auto",
                   help="fsdp2 only: build the full model on every rank then shard it (full), or shard on the meta "
                        "device and initialise the shards (meta; needed for big models). auto: meta above 1B params")

    g = p.add_argument_group("optimizer (defaults: the model's Fira hyper-parameters, fira_dist.models)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="default fira. lowrank: every target nn.Linear becomes trainable factors B (m x r), A (r x n) "
                        "used as (alpha / r) B A (fira_dist.lowrank; Glentis et al. 2025), everything trained with "
                        "Adam (fira_dist.Fira's plain Adam, eps 1e-8); defaults --alpha 32, --lr 0.0015")
    g.add_argument("--rank", type=int, help="Fira/GaLore projection rank; lowrank: the factors' rank (<= the "
                                            "smallest matrix dimension)")
    g.add_argument("--update-proj-gap", type=int, help="steps between projector (SVD) refreshes")
    g.add_argument("--alpha", type=float, help="scale of the low-rank update (GaLore's 'scale'); lowrank: W = (alpha "
                                               "/ rank) B A (default 32)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this (0: off; default: the "
                                                     "model's, 0 below 3B)")
    g.add_argument("--target-modules", help="comma-separated substrings of nn.Linear module names that get the "
                                            "low-rank treatment (default attn,mlp)")
    g.add_argument("--momentum-reset-interval", type=int, metavar="K",
                   help="every K steps zero every parameter's Adam moments and step count (bias correction starts "
                        "over; Fira/GaLore projectors are recomputed and the limiter restarts) and ramp the learning "
                        "rate back from 0.001x over --recovery-steps; with --optimizer lowrank the factors are also "
                        "refactorized (B = U sqrt(S), A = sqrt(S) V^T of B A) at those steps: low-rank training with "
                        "restarts. Any optimizer (adamw then runs as fira_dist.Fira's plain Adam, eps 1e-8). Glentis "
                        "et al. 2025: 500 at 60M, 200 at 1B. Default: never")
    g.add_argument("--recovery-steps", type=int, metavar="R",
                   help="with --momentum-reset-interval: the j-th update after a reset runs at (0.001 + 0.999 j / R) "
                        "x the scheduled lr, j < R (default min(10, K - 1); 0: no ramp)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 10%% of --max-steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine ends at this fraction of --lr (0.1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: the model's num_training_steps)")

    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=int, help="sequences per rank per micro-step (default 8)")
    g.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--total-batch-size", type=int,
                   help="sequences per optimizer step over all ranks; sets --grad-accum (exclusive with it)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's, 256 for the papers')")

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="GLOB", help="local text files: a file, folder or glob of .txt/.json/.jsonl/"
                                                  ".parquet/.csv (optionally .gz ...)")
    g.add_argument("--eval-data", metavar="GLOB", help="held-out files for --data (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=float, default=0.01,
                   help="with --data and no --eval-data: share of documents held out for eval (0.01)")
    g.add_argument("--dataset", metavar="NAME", help="Hugging Face dataset name (allenai/c4 as in the paper; needs the "
                                                     "hub) or a save_to_disk folder. Neither --data nor --dataset: "
                                                     "the embedded English corpus")
    g.add_argument("--dataset-config", help="dataset config (default 'en' for allenai/c4)")
    g.add_argument("--streaming", action="store_true", help="stream --dataset/--data (documents dealt to ranks)")
    g.add_argument("--text-field", default="text", help="column with the text (default text)")
    g.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="tokenizer name (t5-base as in the paper; needs the hub or a cache), folder or tokenizer.json. "
                        "Default: the embedded 8192-token tokenizer (offline)")
    g.add_argument("--max-documents", type=int, help="use only the first N documents (quick tests)")
    g.add_argument("--seed", type=int, default=0, help="model init and data order (0)")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps, at step 0 and at the end (0: never; "
                                                  "default 1000)")
    g.add_argument("--eval-batches", type=int, default=20, help="micro-batches per rank per evaluation (20; 0: all)")
    g.add_argument("--log-every", type=int, default=10, help="log a line every N steps when stderr is no terminal")
    g.add_argument("--output-dir", default="runs/pretrain", help="metrics.jsonl, tensorboard/, checkpoints/, "
                                                               "summary.json, exit_status.json")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps and at the end (0: only on preemption "
                                                  "or bad steps; default 1000)")
    g.add_argument("--keep-last", type=int, default=2, help="keep the N newest checkpoints (0: all; default 2)")
    g.add_argument("--resume", default="auto", help="auto (the latest complete checkpoint in OUTPUT/checkpoints, "
                                                    "if any), none, or a checkpoint folder")
    g.add_argument("--no-tensorboard", action="store_true", help="metrics to metrics.jsonl only")

    g = p.add_argument_group("reliability")
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop (exit 4) after N consecutive non-finite steps (each is skipped; default 5)")
    g.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a collective may wait before the job fails with exit 5 (default 1800)")
    g.add_argument("--dry-run", action="store_true",
                   help="validate flags, config and launch environment, build the model on the meta device and print "
                        "the plan (world size, per-rank memory estimate, low-rank matrices); allocates nothing")
    g.add_argument("--dry-run-world-size", type=int, help="plan for this many ranks instead of the launch environment's")

    g = p.add_argument_group("fault injection (tests; rank 0 unless said)")
    g.add_argument("--inject-nan-at", default="", metavar="STEPS", help="comma-separated steps (1-based) whose loss "
                                                                        "is made NaN on rank 0")
    g.add_argument("--inject-signal-at", type=int, metavar="STEP", help="rank 0 sends itself SIGUSR1 during this step")
    g.add_argument("--inject-hang-at", type=int, metavar="STEP", help="the last rank stops taking part in collectives in this "
                                                                        "step (until signalled): tests --dist-timeout")

    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("--log-level", default="INFO", help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Plan:
    """Every setting of a run, validated and with defaults resolved."""

    model: str
    model_config: Any  # transformers.LlamaConfig
    spec_name: str | None
    strategy: str
    deepspeed_path: str | None
    ds_config: dict | None
    zero_stage: int | None
    bf16: bool
    activation_checkpointing: bool
    attn_implementation: str
    device_request: str
    init: str
    optimizer: str
    rank: int
    update_proj_gap: int
    momentum_reset_interval: int | None
    recovery_steps: int
    alpha: float
    lr: float
    weight_decay: float
    grad_clip: float
    target_modules: tuple[str, ...]
    warmup_steps: int
    min_lr_ratio: float
    max_steps: int
    ds_scheduler: bool
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    data: str | None
    eval_data: str | None
    val_fraction: float | None
    dataset: str | None
    dataset_config: str | None
    streaming: bool
    text_field: str
    tokenizer_name: str | None
    tokenizer: Any
    max_documents: int | None
    seed: int
    eval_every: int
    eval_batches: int
    log_every: int
    output_dir: str
    save_every: int
    keep_last: int
    resume: str
    resume_from: Path | None
    tensorboard: bool
    max_bad_steps: int
    dist_timeout: float
    dry_run: bool
    launch: D.LaunchEnv
    inject_nan_at: frozenset[int]
    inject_signal_at: int | None
    inject_hang_at: int | None
    notes: list[str]

    @property
    def refactorize(self) -> bool:
        """Low-rank training with restarts: refactorize the factors at every momentum reset."""
        return self.optimizer == "lowrank" and self.momentum_reset_interval is not None

    @property
    def fira_optimizer(self) -> bool:
        """Whether the run's optimizer is fira_dist.Fira (everything but adamw without resets)."""
        return self.optimizer != "adamw" or self.momentum_reset_interval is not None

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def summary_args(self) -> dict[str, Any]:
        skip = {"model_config", "tokenizer", "ds_config", "launch", "notes", "resume_from"}
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip and not k.startswith("inject")}
        out["target_modules"] = list(self.target_modules)
        return out


_flag = flag_error


def _need(cond: bool, name: str, value: Any, accepted: str) -> None:
    if not cond:
        raise _flag(name, value, accepted)


def _int_at_least(args, name: str, lo: int) -> None:
    v = getattr(args, name.replace("-", "_"))
    if v is not None:
        _need(v >= lo, name, v, f"an integer >= {lo}")


def resolve(args: argparse.Namespace, explicit: set[str], launch: D.LaunchEnv) -> Plan:
    """Validate every flag (and the ds_config, data paths, tokenizer, resume checkpoint) and fill defaults.
    Raises UsageError naming the flag, the value and what is accepted. Allocates nothing big."""
    from fira_dist.pretrain import data as DATA
    from fira_dist import models as M

    notes: list[str] = []
    # -- plain ranges first (cheap, independent)
    for name, lo in (("rank", 1), ("update-proj-gap", 1), ("max-steps", 1), ("micro-batch-size", 1),
                     ("grad-accum", 1), ("total-batch-size", 1), ("seq-len", 2), ("eval-every", 0),
                     ("eval-batches", 0), ("log-every", 1), ("save-every", 0), ("keep-last", 0), ("seed", 0),
                     ("max-bad-steps", 1), ("warmup-steps", 0), ("max-documents", 1), ("dry-run-world-size", 1),
                     ("momentum-reset-interval", 1), ("recovery-steps", 0)):
        _int_at_least(args, name, lo)
    for name, lo_open in (("alpha", True), ("lr", True), ("weight-decay", False), ("grad-clip", False),
                          ("dist-timeout", True)):
        v = getattr(args, name.replace("-", "_"))
        if v is not None:
            ok = math.isfinite(v) and (v > 0 if lo_open else v >= 0)
            _need(ok, name, v, "a finite number " + ("> 0" if lo_open else ">= 0"))
    _need(0.0 <= args.min_lr_ratio <= 1.0, "min-lr-ratio", args.min_lr_ratio, "a number in [0, 1]")
    _need(0.0 <= args.val_fraction < 1.0, "val-fraction", args.val_fraction, "a number in [0, 1)")
    if args.total_batch_size is not None and args.grad_accum is not None:
        raise UsageError(f"--total-batch-size={args.total_batch_size} and --grad-accum={args.grad_accum} are not "
                         "accepted together; give one (--total-batch-size sets --grad-accum)")

    # -- launch environment and strategy
    if args.dry_run_world_size is not None:
        if not args.dry_run:
            raise UsageError("--dry-run-world-size is only accepted with --dry-run")
        launch = dataclasses.replace(launch, world_size=args.dry_run_world_size,
                                     local_world_size=min(launch.local_world_size, args.dry_run_world_size),
                                     rank=0, launcher=f"{launch.launcher} (--dry-run-world-size)")
    strategy = args.strategy or ("deepspeed" if args.deepspeed else "single" if launch.world_size == 1 else "ddp")
    if strategy == "single" and launch.world_size > 1:
        raise UsageError(f"--strategy=single is not accepted with {launch.world_size} processes (launcher "
                         f"{launch.launcher}); expected ddp, fsdp2 or deepspeed, or launch one process")
    if strategy == "deepspeed" and not args.deepspeed:
        raise UsageError("--strategy=deepspeed needs --deepspeed PATH (a ds_config JSON, e.g. ds_configs/demo_zero2.json)")
    if args.deepspeed and strategy != "deepspeed":
        raise UsageError(f"--deepspeed={args.deepspeed!r} is only accepted with --strategy deepspeed (got "
                         f"--strategy={strategy})")
    if args.init != "auto" and strategy != "fsdp2":
        raise UsageError(f"--init={args.init!r} is only accepted with --strategy fsdp2 (got --strategy={strategy})")
    if strategy in ("ddp", "fsdp2", "deepspeed") and launch.world_size == 1:
        notes.append(f"--strategy {strategy} with one process")

    # -- tokenizer and model
    try:
        tokenizer = DATA.load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer={args.tokenizer!r} could not be loaded: {e}") from None
    try:
        config = M.get_model_config(args.model, tokenizer=tokenizer)
    except Exception as e:  # also transformers' own checks of a config.json (TypeError, StrictDataclass...Error)
        why = " ".join(str(e).split())
        if not isinstance(e, (ValueError, OSError)):
            why = f"{type(e).__name__}: {why}"
        raise UsageError(f"--model={args.model!r} is not accepted: {why}") from None
    spec = None
    looks_like_path = os.sep in args.model or args.model.endswith(".json") or os.path.exists(args.model)
    if not looks_like_path:
        spec = M.get_spec(args.model)
    hp = spec.fira if spec else M.MODEL_CONFIGS["llama_60m"].fira
    if spec is None:
        notes.append(f"--model {args.model} is a config file: optimizer defaults are llama_60m's")

    optimizer = args.optimizer or "fira"
    lowrank = optimizer == "lowrank"
    rank = args.rank or min(hp.rank, config.hidden_size)
    update_proj_gap = args.update_proj_gap or hp.update_proj_gap
    alpha = args.alpha if args.alpha is not None else (LOWRANK_ALPHA if lowrank else hp.alpha)
    lr = args.lr if args.lr is not None else (LOWRANK_LR if lowrank else hp.lr)
    reset_interval = args.momentum_reset_interval
    recovery_steps = args.recovery_steps
    if recovery_steps is None:
        recovery_steps = 10 if reset_interval is None else min(10, reset_interval - 1)
    if args.recovery_steps is not None and reset_interval is None:
        raise UsageError(f"--recovery-steps={args.recovery_steps} is only accepted with --momentum-reset-interval K")
    if reset_interval is not None:
        _need(recovery_steps < reset_interval, "recovery-steps", recovery_steps,
              f"an integer in [0, --momentum-reset-interval - 1 = {reset_interval - 1}] (the ramp ends before the "
              "next reset)")
    weight_decay = args.weight_decay if args.weight_decay is not None else hp.weight_decay
    grad_clip = args.grad_clip if args.grad_clip is not None else hp.grad_clipping
    max_steps = args.max_steps or hp.num_training_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else max_steps // 10
    _need(warmup <= max_steps, "warmup-steps", warmup, f"an integer in [0, --max-steps={max_steps}]")
    seq_len = args.seq_len or min(hp.seq_len, config.max_position_embeddings)
    _need(seq_len <= config.max_position_embeddings, "seq-len", seq_len,
          f"an integer in [2, {config.max_position_embeddings}] (the model's max_position_embeddings)")
    target_modules = tuple(t.strip() for t in (args.target_modules or "attn,mlp").split(",") if t.strip())
    _need(bool(target_modules), "target-modules", args.target_modules, "comma-separated module-name substrings, "
                                                                       "e.g. attn,mlp")
    if optimizer == "adamw":
        for name in ("rank", "update-proj-gap", "alpha", "target-modules"):
            if name in explicit:
                notes.append(f"--{name} is ignored with --optimizer adamw")
    if lowrank:
        if "update-proj-gap" in explicit:
            notes.append("--update-proj-gap is ignored with --optimizer lowrank (no projector)")
        _check_lowrank_rank(config, target_modules, rank)
    mbs = args.micro_batch_size or 8
    grad_accum = args.grad_accum or 1
    bf16 = bool(args.bf16)

    # -- DeepSpeed: the ds_config wins, the CLI fills in
    ds_config, zero_stage, ds_scheduler = None, None, False
    if strategy == "deepspeed":
        (ds_config, zero_stage, ds_scheduler, optimizer, lr, weight_decay, rank, update_proj_gap, alpha, grad_clip,
         mbs, grad_accum, bf16, target_modules, reset_interval, recovery_steps) = merge_ds_config(
            args, explicit, launch, notes, optimizer=optimizer, lr=lr, weight_decay=weight_decay, rank=rank,
            update_proj_gap=update_proj_gap, alpha=alpha, grad_clip=grad_clip, mbs=mbs, grad_accum=grad_accum,
            bf16=bf16, target_modules=target_modules, total=args.total_batch_size, reset_interval=reset_interval,
            recovery_steps=recovery_steps)
    elif args.total_batch_size is not None:
        per = mbs * launch.world_size
        if args.total_batch_size % per:
            raise UsageError(f"--total-batch-size={args.total_batch_size} is not accepted; expected a multiple of "
                             f"--micro-batch-size x world size = {mbs} x {launch.world_size} = {per}")
        grad_accum = args.total_batch_size // per

    # -- data
    if args.data and args.dataset:
        raise UsageError(f"--data={args.data!r} and --dataset={args.dataset!r} are not accepted together; give one")
    if args.eval_data and not args.data:
        raise UsageError(f"--eval-data={args.eval_data!r} is only accepted with --data")
    for name in ("data", "eval_data"):
        v = getattr(args, name)
        if v:
            try:
                DATA.resolve_data_files(v)
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(f"--{name.replace('_', '-')}={v!r} is not accepted: {e}") from None
    if args.dataset and os.sep in args.dataset and not os.path.isdir(args.dataset) and not args.dataset.count("/") == 1:
        raise UsageError(f"--dataset={args.dataset!r} is not accepted: no such folder, and not a hub name (owner/name)")
    val_fraction = args.val_fraction if (args.data and not args.eval_data) else None
    eval_every = args.eval_every if args.eval_every is not None else 1000
    if val_fraction == 0.0:
        val_fraction = None
        if eval_every:
            raise UsageError("--val-fraction=0 with --data and no --eval-data leaves nothing to evaluate; give "
                             "--eval-data, a --val-fraction in (0, 1), or --eval-every 0")

    # -- output and resume
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True) if not args.dry_run else None
    except OSError as e:
        raise UsageError(f"--output-dir={args.output_dir!r} cannot be created: {e}") from None
    if not args.dry_run and not os.access(out, os.W_OK):
        raise UsageError(f"--output-dir={args.output_dir!r} is not writable")
    if args.resume not in ("auto", "none") and not Path(args.resume).exists():
        raise UsageError(f"--resume={args.resume!r} is not accepted; expected auto, none or an existing checkpoint folder")
    try:
        resume_from = C.resolve_resume(args.resume, out / "checkpoints")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if resume_from is not None:
        note = _check_resume_compat(resume_from, strategy, optimizer, config, launch.world_size, seq_len, args.resume,
                                    zero_stage, ds_config)
        if note:
            notes.append(note)

    nan_at: set[int] = set()
    if args.inject_nan_at:
        try:
            nan_at = {int(s) for s in args.inject_nan_at.split(",") if s.strip()}
        except ValueError:
            raise _flag("inject-nan-at", args.inject_nan_at, "comma-separated step numbers") from None

    return Plan(
        model=args.model, model_config=config, spec_name=spec.name if spec else None, strategy=strategy,
        deepspeed_path=args.deepspeed, ds_config=ds_config, zero_stage=zero_stage, bf16=bf16,
        activation_checkpointing=args.activation_checkpointing, attn_implementation=args.attn_implementation,
        device_request=args.device, init=args.init, optimizer=optimizer, rank=rank, update_proj_gap=update_proj_gap,
        momentum_reset_interval=reset_interval, recovery_steps=recovery_steps,
        alpha=alpha, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, target_modules=target_modules,
        warmup_steps=warmup, min_lr_ratio=args.min_lr_ratio, max_steps=max_steps, ds_scheduler=ds_scheduler,
        micro_batch_size=mbs, grad_accum=grad_accum, seq_len=seq_len, data=args.data, eval_data=args.eval_data,
        val_fraction=val_fraction, dataset=args.dataset, dataset_config=args.dataset_config,
        streaming=args.streaming, text_field=args.text_field, tokenizer_name=args.tokenizer, tokenizer=tokenizer,
        max_documents=args.max_documents, seed=args.seed, eval_every=eval_every, eval_batches=args.eval_batches,
        log_every=args.log_every, output_dir=str(out),
        save_every=args.save_every if args.save_every is not None else 1000, keep_last=args.keep_last,
        resume=args.resume, resume_from=resume_from, tensorboard=not args.no_tensorboard,
        max_bad_steps=args.max_bad_steps, dist_timeout=args.dist_timeout, dry_run=args.dry_run, launch=launch,
        inject_nan_at=frozenset(nan_at), inject_signal_at=args.inject_signal_at, inject_hang_at=args.inject_hang_at,
        notes=notes)


def _check_lowrank_rank(config: Any, target_modules: tuple[str, ...], rank: int) -> None:
    """--rank must fit every matrix --optimizer lowrank factorizes (checked on the meta-device model)."""
    from fira_dist.lowrank import factorized_shapes
    from fira_dist import models as M

    model = M.build_model(config, device="meta")
    try:
        factorized_shapes({n: tuple(p.shape) for n, p in model.named_parameters()}, rank, target_modules)
    except ValueError as e:
        raise UsageError(f"--rank={rank} / --target-modules={','.join(target_modules)!r} with --optimizer lowrank: "
                         f"{e}") from None


def _check_resume_compat(path: Path, strategy: str, optimizer: str, config: Any, world: int, seq_len: int,
                         flag: str, zero_stage: int | None = None, ds_config: dict | None = None) -> str | None:
    """Refuse a checkpoint this run cannot continue from, naming why; returns a note when it is resharded."""
    m = C.read_manifest(path) or {}
    saved_ds = m.get("strategy") == "deepspeed"
    if saved_ds != (strategy == "deepspeed"):
        raise UsageError(f"--resume={flag!r}: checkpoint {path} was written by --strategy {m.get('strategy')} and "
                         f"cannot be loaded by --strategy {strategy} (DeepSpeed checkpoints load under deepspeed only, "
                         "DCP ones under single/ddp/fsdp2); use --resume none or another --output-dir")
    note = None
    saved = (m.get("world_size"), m.get("zero_stage", zero_stage))
    if saved_ds and saved != (world, zero_stage):
        opt = (ds_config or {}).get("optimizer") or {}
        fira = isinstance(opt, dict) and str(opt.get("type", "")).lower() == "fira"
        what = (f"DeepSpeed checkpoint {path} was written by {saved[0]} ranks under ZeRO-{saved[1]}, this job has "
                f"{world} under ZeRO-{zero_stage}")
        if saved[1] == 0 and zero_stage == 0:
            note = f"{what}: a ZeRO-0 checkpoint holds the whole optimizer state and loads at any world size"
        elif fira and saved[1] in (1, 2, 3) and zero_stage in (1, 2, 3):
            note = (f"{what}: Fira's state and the fp32 master weights are resharded through a universal checkpoint "
                    f"written beside it ({path}/{C.DS_TAG}_universal, fira_dist.ds_universal)")
        else:
            raise UsageError(
                f"--resume={flag!r}: {what}. DeepSpeed loads ZeRO-1/2/3 optimizer state at the world size and stage "
                "that wrote it; fira_dist reshards it between ZeRO stages 1-3 for the \"fira\" optimizer only, and "
                "ZeRO-0 checkpoints load at any world size under ZeRO-0. Expected "
                f"{saved[0]} ranks under ZeRO-{saved[1]}, or --resume none / another --output-dir")
    data = m.get("data") or [{}]
    if data[0].get("kind") == "streaming" and m.get("world_size") != world:
        raise UsageError(f"--resume={flag!r}: checkpoint {path} holds per-rank positions in a streamed dataset for "
                         f"{m.get('world_size')} ranks, this job has {world}; expected the same world size (or "
                         "non-streaming data, whose position is global)")
    if m.get("optimizer") != optimizer:
        raise UsageError(f"--resume={flag!r}: checkpoint {path} holds --optimizer {m.get('optimizer')} state, this run "
                         f"uses --optimizer {optimizer}")
    saved_cfg = (m.get("model") or {}).get("config", {})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key in saved_cfg and saved_cfg[key] != getattr(config, key):
            raise UsageError(f"--resume={flag!r}: checkpoint {path} has {key}={saved_cfg[key]}, --model gives "
                             f"{getattr(config, key)}; expected the same model (and tokenizer)")
    if m.get("seq_len") not in (None, seq_len):
        raise UsageError(f"--resume={flag!r}: checkpoint {path} was trained with --seq-len {m.get('seq_len')}, "
                         f"this run has {seq_len}")
    return note
