"""``fira-dist pretrain --dry-run``: the plan printed with the model on the meta device (no GPU, nothing trained)."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from fira_dist.pretrain.plan import Plan
from fira_dist.pretrain.train_utils import EXIT_OK, UsageError


def dry_run(plan: Plan) -> int:
    """Print the plan: nothing is allocated (model on the meta device), no process group is started."""
    import torch

    from fira_dist import models as M

    t0 = time.perf_counter()
    model = M.build_model(plan.model_config, device="meta", dtype="bf16" if plan.bf16 else "fp32")
    n_params = sum(p.numel() for p in model.parameters())
    low, other = _lowrank_split(model, plan)
    cfg = plan.model_config
    le = plan.launch
    lines = ["fira-dist pretrain --dry-run: the plan (model on the meta device; nothing allocated, no process group)"]
    add = lines.append
    per_node = "" if "dry-run-world-size" in le.launcher else \
        f" ({le.local_world_size} per node, {le.num_nodes} node(s))"
    add(f"launch       {le.launcher}: world size {le.world_size}{per_node}; this process is rank {le.rank}" + (f", rendezvous {le.master_addr}:{le.master_port}"
                                                        if le.world_size > 1 and le.master_addr else ""))
    dev = "cuda" if plan.device_request == "cuda" or (plan.device_request == "auto" and torch.cuda.is_available()) \
        else "cpu"
    strat = plan.strategy + (f" ZeRO-{plan.zero_stage} ({plan.deepspeed_path})" if plan.strategy == "deepspeed" else "")
    add(f"strategy     {strat}; device {dev} ({'nccl' if dev == 'cuda' else 'gloo'}); "
        f"{'bf16 compute, fp32 master weights' if plan.bf16 else 'fp32'}; activation checkpointing "
        f"{'on' if plan.activation_checkpointing else 'off'}; --dist-timeout {plan.dist_timeout:.0f} s")
    add(f"model        {plan.model}: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, heads "
        f"{cfg.num_attention_heads}, layers {cfg.num_hidden_layers}, vocab {cfg.vocab_size} "
        f"(tokenizer {plan.tokenizer_name or 'embedded'}); {n_params / 1e6:,.2f}M parameters")
    if plan.optimizer == "adamw":
        how = "fira_dist.Fira's plain Adam (eps 1e-8, for the resets)" if plan.fira_optimizer else "torch AdamW"
        add(f"optimizer    adamw lr {plan.lr:g}, weight decay {plan.weight_decay:g}: every parameter full rank ({how})")
    elif plan.optimizer == "lowrank":
        add(_lowrank_plan(plan, model, low, n_params))
    else:
        n_low = sum(p.numel() for _, p in low)
        add(f"optimizer    {plan.optimizer} rank {plan.rank}, update_proj_gap {plan.update_proj_gap}, alpha "
            f"{plan.alpha:g}, lr {plan.lr:g}, weight decay {plan.weight_decay:g}, grad clip {plan.grad_clip:g}")
        add(f"low rank     {len(low)} matrices, {n_low / 1e6:,.2f}M parameters ({100 * n_low / n_params:.1f}%), "
            f"target modules {','.join(plan.target_modules)}:")
        from fira_dist.projector import side_for

        kinds: dict[tuple[str, tuple[int, ...]], int] = {}
        for name, p in low:
            key = (_kind_of(name), tuple(p.shape))
            kinds[key] = kinds.get(key, 0) + 1
        for (kind, shape), count in kinds.items():
            side = side_for(shape, "std")
            add(f"               {count:4d} x {kind:<28s} {shape[0]:>6d} x {shape[1]:<6d} ({side} projection, "
                f"state {min(plan.rank, min(shape))} x {max(shape)} x 2 + projector)")
        add(f"full rank    {len(other)} tensors ({sum(p.numel() for _, p in other) / 1e6:,.2f}M parameters: "
            "embeddings, norms, lm_head ...) get plain Adam")
    if plan.momentum_reset_interval is not None:
        K, R = plan.momentum_reset_interval, plan.recovery_steps
        add(f"restarts     every {K} steps ({(plan.max_steps - 1) // K} in this run): every parameter's Adam moments "
            f"and step count zeroed" + ("" if plan.optimizer in ("adamw", "lowrank") else
                                       ", projectors recomputed, limiter restarted")
            + f"; lr x (0.001 + 0.999 j / {R}) on the j-th update after, j < {R}"
            + ("; factors refactorized (B = U sqrt(S), A = sqrt(S) V^T of B A)" if plan.refactorize else ""))
    add(f"batch        micro {plan.micro_batch_size} x seq {plan.seq_len} x grad-accum {plan.grad_accum} x "
        f"{plan.world_size} rank(s) = {plan.global_batch} sequences = {plan.tokens_per_step:,} tokens per step")
    add(f"schedule     {plan.max_steps} steps ({plan.max_steps * plan.tokens_per_step / 1e9:.3g}B tokens), warm-up "
        f"{plan.warmup_steps}, cosine to {plan.min_lr_ratio:g} x lr" + (" (ds_config scheduler)" if plan.ds_scheduler
                                                                         else ""))
    add(f"data         {_data_desc(plan)}")
    add(f"eval/ckpt    eval every {plan.eval_every or '-'} ({plan.eval_batches or 'all'} batches/rank); save every "
        f"{plan.save_every or '-'} (keep {plan.keep_last or 'all'}) in {plan.output_dir}/checkpoints; resume: "
        + (f"from {plan.resume_from}" if plan.resume_from else f"start fresh (--resume {plan.resume})"))
    add("memory       per-rank estimate:")
    add(_indent(_memory_estimate(plan), 13))
    for n in plan.notes:
        add(f"note         {n}")
    if plan.ds_config is not None:
        add("ds_config    " + json.dumps(plan.ds_config, sort_keys=True))
    add(f"checks       OK ({time.perf_counter() - t0:.1f} s)")
    if le.rank == 0:
        print("\n".join(lines), flush=True)
    return EXIT_OK


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _kind_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if not p.isdigit() and p not in ("model", "layers", "weight"))


def _data_desc(plan: Plan) -> str:
    if plan.data:
        from fira_dist.pretrain import data as DATA

        _, files = DATA.resolve_data_files(plan.data)
        ev = f"eval {plan.eval_data}" if plan.eval_data else f"{plan.val_fraction:g} held out for eval"
        return f"{len(files)} local file(s) {plan.data} ({ev})" + (", streaming" if plan.streaming else "")
    if plan.dataset:
        return f"dataset {plan.dataset}" + (", streaming" if plan.streaming else "") + " (not opened in a dry run)"
    return "the embedded English corpus (fira_dist/data)"


def _lowrank_plan(plan: Plan, model: Any, low: list, n_params: int) -> str:
    """The dry run's lines for --optimizer lowrank: which matrices become factors, and the parameter counts."""
    from fira_dist.lowrank import factorized_shapes

    r = plan.rank
    shapes = factorized_shapes({n: tuple(p.shape) for n, p in model.named_parameters()}, r, plan.target_modules)
    n_fact = sum(math.prod(s) for s in shapes.values())
    n_low = sum(p.numel() for _, p in low)
    lines = [f"optimizer    lowrank rank {r}, alpha {plan.alpha:g} (W = {plan.alpha:g}/{r} B A), Adam on every parameter "
             f"(fira_dist.Fira plain Adam, eps 1e-8), lr {plan.lr:g}, weight decay {plan.weight_decay:g}, grad clip "
             f"{plan.grad_clip:g}",
             f"factorized   {len(low)} matrices ({n_low / 1e6:,.2f}M parameters), target modules "
             f"{','.join(plan.target_modules)}, become B (m x {r}) and A ({r} x n): {n_params / 1e6:,.2f}M -> "
             f"{n_fact / 1e6:,.2f}M trainable parameters:"]
    kinds: dict[tuple[str, tuple[int, ...]], int] = {}
    for name, p in low:
        key = (_kind_of(name), tuple(p.shape))
        kinds[key] = kinds.get(key, 0) + 1
    for (kind, (m, n)), count in kinds.items():
        lines.append(f"               {count:4d} x {kind:<28s} {m:>6d} x {n:<6d} -> B {m} x {r} + A {r} x {n}")
    return "\n".join(lines)


def _memory_estimate(plan: Plan) -> str:
    from fira_dist.memory import MemoryConfig, estimate
    from fira_dist.memory.report import format_single

    strategy = plan.strategy if plan.strategy != "deepspeed" else (
        "ddp" if plan.zero_stage == 0 else f"zero{plan.zero_stage}")
    logging.getLogger("fira_dist.optimizer").setLevel(logging.WARNING)  # its per-matrix listing is the plan's
    try:
        cfg = MemoryConfig(model=plan.spec_name or "llama_60m", optimizer=plan.optimizer, rank=plan.rank,
                           target_modules=plan.target_modules, strategy=strategy,
                           world_size=plan.world_size, precision="bf16-mixed" if plan.bf16 else "fp32",
                           micro_batch=plan.micro_batch_size, seq_len=plan.seq_len,
                           activation_checkpointing=plan.activation_checkpointing,
                           attention=plan.attn_implementation, vocab_size=plan.model_config.vocab_size)
        if plan.spec_name is None:
            return "(fira_dist.memory estimates table models only; --model is a config file)"
        return format_single(estimate(cfg))
    except Exception as e:  # the estimator is another module: report, do not fail the dry run
        return f"(fira_dist.memory could not estimate this configuration: {type(e).__name__}: {e})"


def _lowrank_split(model, plan: Plan):
    """(name, param) of the matrices the low-rank group gets, and of the rest (same rule as param_groups)."""
    import torch

    picked = set()
    if plan.optimizer != "adamw":
        for mname, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(t in mname for t in plan.target_modules):
                picked.add(f"{mname}.weight")
        if not picked:
            names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:4]
            raise UsageError(f"--target-modules={','.join(plan.target_modules)!r} matched no nn.Linear module; names "
                             f"look like {names}")
    low = [(n, p) for n, p in model.named_parameters() if n in picked]
    other = [(n, p) for n, p in model.named_parameters() if n not in picked]
    return low, other
