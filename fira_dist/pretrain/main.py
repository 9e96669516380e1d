"""``fira-dist pretrain`` (also ``python -m fira_dist.pretrain``): pretrain a LLaMA with Fira, GaLore, AdamW or
low-rank factorized weights (``--optimizer lowrank``; with ``--momentum-reset-interval`` also restarts).

    # one process, the embedded corpus and tokenizer (no network)
    fira-dist pretrain --model llama_tiny --max-steps 50 --output-dir runs/tiny
    # 8 GPUs, DeepSpeed ZeRO-2, optimizer from the ds_config's "optimizer": {"type": "fira", ...} block
    torchrun --nproc-per-node 8 -m fira_dist.pretrain --model llama_1b --strategy deepspeed \
        --deepspeed ds_configs/zero2_bf16.json --dataset allenai/c4 --streaming --tokenizer t5-base
    # what would run, without a GPU (model on the meta device)
    fira-dist pretrain --model llama_7b --strategy fsdp2 --dry-run --dry-run-world-size 64

This file is the training loop (``Trainer.run``): for each optimizer step, ``--grad-accum`` micro-batches
forward/backward (gradient sync on the last one only); one all-reduce of
[loss, non-finite flag, stop flag, squared gradient norm] so that every rank takes the same decision;
skip the update when the step is non-finite, else clip (``--grad-clip``) and step with the warm-up +
cosine learning rate (times the optimizer's recovery ramp after a momentum reset); for low-rank training with
restarts, refactorize the factors after every step that completes a reset interval; log; evaluate every ``--eval-every`` steps; checkpoint every ``--save-every`` steps;
on SIGTERM/SIGUSR1 checkpoint and exit 3. Flags, their validation, exit codes and the dry run: plan.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fira_dist.pretrain import checkpoint as C
from fira_dist.pretrain import distributed as D
from fira_dist.pretrain.dry_run import dry_run
from fira_dist.pretrain.plan import FSDP_META_INIT_PARAMS, Plan, UsageError, build_parser, resolve
from fira_dist.pretrain.train_utils import (
    EXIT_BAD_STEPS, EXIT_DIST_FAILURE, EXIT_ERROR, EXIT_OK, EXIT_REQUEUE, EXIT_USAGE, Metrics, Progress,
    lr_factor, memory_reading, memory_short, setup_logging,
)

__all__ = ["main", "Trainer", "build_parser", "resolve", "dry_run", "Plan", "UsageError"]

log = logging.getLogger("fira_dist.pretrain")


# ----------------------------------------------------------------------------------------------- training
class Trainer:
    """One training run of a :class:`Plan` on this rank (see the module docstring for the loop)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.rank = plan.launch.rank
        self.world = plan.launch.world_size
        self.stop_signal: int | None = None
        self.step = 0
        self.counters = {"tokens": 0, "skipped_steps": 0, "bad_in_a_row": 0}
        self.last_saved_step = -1
        self.history: list[dict[str, Any]] = []  # this run's train records (rank 0)
        self.evals: list[dict[str, Any]] = []

    # -- set-up
    def setup(self) -> None:
        import torch

        plan = self.plan
        self.device = D.pick_device(plan.device_request, plan.launch)
        D.init_process_group(plan.launch, self.device, plan.dist_timeout, deepspeed=plan.strategy == "deepspeed")
        # every rank resolved --resume itself; rank 0's answer counts (a lagging shared filesystem must not
        # let ranks start from different checkpoints)
        chosen = D.broadcast_object(str(plan.resume_from) if plan.resume_from else None)
        if chosen != (str(plan.resume_from) if plan.resume_from else None):
            log.warning("rank %d saw resume point %s, rank 0 chose %s: using rank 0's", self.rank,
                        plan.resume_from, chosen)
        plan.resume_from = Path(chosen) if chosen else None
        torch.manual_seed(plan.seed)
        self._install_signal_handlers()
        self.ckpt = C.CheckpointManager(Path(plan.output_dir) / "checkpoints", plan.keep_last, self.rank, self.world)
        self._build_model_and_optimizer()
        self._build_data()
        start = None
        if plan.resume_from is not None:
            start = self._load(plan.resume_from)
        self.metrics = Metrics(plan.output_dir, enabled=self.rank == 0, resume_step=start, tensorboard=plan.tensorboard)

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            if self.stop_signal is None:
                log.warning("received %s: finishing the current step, then checkpoint and exit %d",
                            signal.Signals(signum).name, EXIT_REQUEUE)
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _build_model_and_optimizer(self) -> None:
        import torch

        from fira_dist import models as M

        plan = self.plan
        n_params = M.count_params(plan.model_config)
        meta = plan.strategy == "fsdp2" and (plan.init == "meta" or (plan.init == "auto" and
                                                                      n_params > FSDP_META_INIT_PARAMS))
        model = M.build_model(plan.model_config, device="meta" if meta else "cpu", dtype=torch.float32,
                              seed=plan.seed, attn_implementation=plan.attn_implementation)
        if plan.activation_checkpointing:
            M.enable_activation_checkpointing(model)
        model.config.use_cache = False
        if plan.optimizer == "lowrank":  # before any wrapper (FSDP2, DDP, DeepSpeed) sees the parameters
            from fira_dist import lowrank

            lowrank.factorize(model, plan.target_modules, rank=plan.rank, alpha=plan.alpha)
        self.n_params = n_params
        self.engine = None
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) \
            if plan.bf16 and plan.strategy in ("single", "ddp") else contextlib.nullcontext
        if plan.strategy == "deepspeed":
            self._build_deepspeed(model)
            return
        if plan.strategy == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
                if plan.bf16 else {}
            for layer in model.model.layers:
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
            if meta:
                model.to_empty(device=self.device)
                torch.manual_seed(plan.seed)
                with torch.no_grad():
                    model.apply(model._init_weights)
                    if plan.optimizer == "lowrank":
                        from fira_dist import lowrank

                        lowrank.reset_factors_(model)
            self.fwd = model
        else:
            model.to(self.device)
            self.fwd = model
            if plan.strategy == "ddp":
                self.fwd = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.model = model
        self.optimizer = self._make_optimizer(model)
        self.base_lrs = [g["lr"] for g in self.param_groups]

    def _make_optimizer(self, model):
        import torch

        import fira_dist

        from fira_dist.pretrain.ds_merge import ADAM_EPS

        plan = self.plan
        resets = {} if plan.momentum_reset_interval is None else {
            "momentum_reset_interval": plan.momentum_reset_interval, "recovery_steps": plan.recovery_steps}
        if plan.optimizer in ("adamw", "lowrank") and plan.fira_optimizer:  # Adam with resets / on the factors
            return fira_dist.Fira([{"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}],
                                  lr=plan.lr, eps=ADAM_EPS, weight_decay=plan.weight_decay, **resets)
        if plan.optimizer == "adamw":
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=plan.lr,
                                     weight_decay=plan.weight_decay)
        extra = {"algorithm": "galore"} if plan.optimizer == "galore" else {}
        try:
            groups = fira_dist.param_groups(model, target_modules=plan.target_modules, rank=plan.rank,
                                            update_proj_gap=plan.update_proj_gap, alpha=plan.alpha, **extra)
        except ValueError as e:
            raise UsageError(f"--target-modules={','.join(plan.target_modules)!r}: {e}") from None
        return fira_dist.Fira(groups, lr=plan.lr, weight_decay=plan.weight_decay, **resets)

    def _build_deepspeed(self, model) -> None:
        import torch

        from fira_dist import deepspeed as FDS

        plan = self.plan
        for name in ("deepspeed", "DeepSpeed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        engine, optimizer, _, _ = FDS.initialize(model=model, config=plan.ds_config,
                                                 model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.engine, self.model, self.fwd = engine, engine.module, engine
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in self.param_groups]
        self.device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)

    def _build_data(self) -> None:
        import torch.distributed as dist

        from fira_dist.pretrain import data as DATA

        plan = self.plan
        common = dict(seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size, rank=self.rank,
                      world_size=self.world, text_field=plan.text_field, max_documents=plan.max_documents)
        src: dict[str, Any] = {}
        if plan.data:
            src = {"data": {"train": plan.data, "validation": plan.eval_data} if plan.eval_data else plan.data,
                   "validation_fraction": plan.val_fraction}
        elif plan.dataset:
            src = {"dataset": plan.dataset, "dataset_config": plan.dataset_config}
        barrier = dist.barrier if D.is_dist() else None
        try:
            self.train_loader = DATA.get_batches(plan.tokenizer, streaming=plan.streaming, seed=plan.seed,
                                                 barrier=barrier, **src, **common)
            self.eval_loader = None
            if plan.eval_every:
                self.eval_loader = DATA.get_eval_batches(plan.tokenizer, streaming=plan.streaming, barrier=barrier,
                                                         **src, **common)
        except (OSError, RuntimeError, ValueError) as e:
            flag = "--data" if plan.data else "--dataset" if plan.dataset else "the embedded corpus"
            raise UsageError(f"{flag}: cannot build the data loaders: {e}") from None
        self.train_iter = iter(self.train_loader)

    # -- checkpoints
    def _manifest(self, reason: str) -> dict[str, Any]:
        plan = self.plan
        return {"reason": reason, "strategy": plan.strategy, "zero_stage": plan.zero_stage,
                "optimizer": plan.optimizer, "seq_len": plan.seq_len,
                "model": {"name": plan.model, "config": plan.model_config.to_dict()},
                "data": D.all_gather_object(self.train_loader.state_dict()),
                "counters": dict(self.counters), "args": plan.summary_args()}

    def save(self, reason: str) -> Path | None:
        if self.last_saved_step == self.step:
            return self.ckpt_path
        manifest = self._manifest(reason)  # collective (data states)
        if self.engine is not None:
            writer = lambda folder: C.deepspeed_save(folder, self.engine)  # noqa: E731
        else:
            writer = lambda folder: C.dcp_save(folder / "dcp", self.model, self.optimizer)  # noqa: E731
        self.ckpt_path = self.ckpt.save(self.step, writer, manifest)
        self.last_saved_step = self.step
        return self.ckpt_path

    def _load(self, folder: Path) -> int:
        t0 = time.perf_counter()
        m = C.read_manifest(folder)
        if m.get("world_size") != self.world and self.engine is None:  # DeepSpeed: the plan's note says what happens
            log.warning("checkpoint %s was written by %d ranks, this job has %d: model and optimizer state are "
                        "resharded (DCP), the data position continues in the global order", folder,
                        m.get("world_size"), self.world)
        if self.engine is not None:
            C.deepspeed_load(folder, self.engine)
        else:
            C.dcp_load(folder / "dcp", self.model, self.optimizer)
        self.train_loader.load_state_dict(m["data"])
        self.train_iter = iter(self.train_loader)
        self.ckpt.load_rank_state(folder)
        self.step = int(m["step"])
        self.counters.update({k: v for k, v in m.get("counters", {}).items() if k in self.counters})
        self.counters["bad_in_a_row"] = 0
        self.last_saved_step, self.ckpt_path = self.step, folder
        log.info("resumed from %s at step %d (%.1f s)", folder, self.step, time.perf_counter() - t0)
        return self.step

    # -- one step
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Looked up each time: load_state_dict replaces the optimizer's group dicts."""
        return (self.engine.optimizer if self.engine is not None else self.optimizer).param_groups

    @property
    def fira(self):
        """The fira_dist.Fira this run steps (under DeepSpeed the engine's client optimizer), or None."""
        import fira_dist

        opt = self.engine.basic_optimizer if self.engine is not None else self.optimizer
        return opt if isinstance(opt, fira_dist.Fira) else None

    def _set_lr(self, step: int) -> float:
        plan = self.plan
        if plan.ds_scheduler:
            return float(self.param_groups[0]["lr"])
        f = lr_factor(step, plan.warmup_steps, plan.max_steps, plan.min_lr_ratio)
        for g, base in zip(self.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.base_lrs[0] * f

    def _micro_step(self, batch: dict, last: bool, inject_nan: bool):
        plan = self.plan
        x = batch["input_ids"].to(self.device, non_blocking=True)
        y = batch["labels"].to(self.device, non_blocking=True)
        if self.engine is not None:
            loss = self.engine(input_ids=x, labels=y).loss
            if inject_nan:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            return loss.detach().float()
        if plan.strategy == "fsdp2":
            self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        elif plan.strategy == "ddp" and not last:
            sync = self.fwd.no_sync()
        else:
            sync = contextlib.nullcontext()
        with sync:
            with self.autocast():
                loss = self.fwd(input_ids=x, labels=y).loss
            if inject_nan:
                loss = loss * float("nan")
            (loss / plan.grad_accum).backward()
        return loss.detach().float()

    def _local_grad_sq(self):
        """Sum of squares of the gradients this rank holds (its shards under FSDP2), as a float64 tensor."""
        import torch

        grads = []
        for p in self.model.parameters():
            if p.grad is not None:
                g = p.grad
                grads.append(g.to_local() if hasattr(g, "to_local") else g)
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        norms = torch._foreach_norm(grads, 2.0)
        return torch.stack([n.double() for n in norms]).pow(2).sum()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over --grad-accum micro-batches (collective). Returns the step's record."""
        import torch
        import torch.distributed as dist

        plan = self.plan
        n = self.step + 1  # the step being computed, 1-based
        if plan.inject_signal_at == n and self.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        if plan.inject_hang_at == n and self.rank == self.world - 1:
            log.warning("--inject-hang-at %d: rank %d hangs (no collective) until it gets a signal", n, self.rank)
            while self.stop_signal is None:  # stuck for its peers; a launcher's SIGTERM ends it (fast tests)
                time.sleep(0.2)
            os._exit(EXIT_ERROR)
        t0 = time.perf_counter()
        lr = self._set_lr(self.step) * (self.fira.lr_factor() if self.fira is not None else 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(plan.grad_accum):
            batch = next(self.train_iter)
            loss_sum += self._micro_step(batch, last=i == plan.grad_accum - 1,
                                         inject_nan=n in plan.inject_nan_at and self.rank == 0)
        if self.engine is not None:
            grad_sq = torch.zeros((), dtype=torch.float64, device=self.device)
            nonfinite = (~torch.isfinite(loss_sum)).double()
        else:
            grad_sq = self._local_grad_sq()
            nonfinite = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_sq)).double()
        stop = torch.tensor(float(self.stop_signal is not None), dtype=torch.float64, device=self.device)
        vec = torch.stack([torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0), nonfinite, stop,
                           torch.nan_to_num(grad_sq, nan=0.0, posinf=0.0)])
        if D.is_dist():
            dist.all_reduce(vec)  # the one per-step collective of the loop: every rank decides alike
        loss_total, bad_count, stop_count, grad_sq_total = vec.tolist()
        bad = bad_count > 0
        if self.engine is not None:
            bad = bad or not self.engine.was_step_applied()
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None and not bad else None
        else:
            replicated = plan.strategy in ("single", "ddp")
            grad_norm = math.sqrt(grad_sq_total / (self.world if replicated else 1)) if not bad else None
            if bad:
                self.optimizer.zero_grad(set_to_none=True)  # skip: optimizer state untouched
            else:
                if plan.grad_clip > 0 and grad_norm > plan.grad_clip:
                    coef = plan.grad_clip / (grad_norm + 1e-6)
                    grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                    torch._foreach_mul_(grads, coef)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if not bad and plan.refactorize and self.fira.momentum_reset_due():
            from fira_dist import lowrank

            stats = lowrank.refactorize(self.model, engine=self.engine)  # the optimizer resets its moments next
            log.info("step %d: refactorized %d factor pairs (%.2f s); momentum reset at the next step", self.step + 1,
                     stats["matrices"], stats["seconds"])
        self.step += 1
        if bad:
            self.counters["skipped_steps"] += 1
            self.counters["bad_in_a_row"] += 1
            log.warning("step %d: non-finite loss or gradients on %d rank(s): update skipped (%d in a row, "
                        "--max-bad-steps %d)", self.step, max(1, int(bad_count)), self.counters["bad_in_a_row"],
                        plan.max_bad_steps)
        else:
            self.counters["bad_in_a_row"] = 0
        tokens = plan.tokens_per_step
        self.counters["tokens"] += tokens
        dt = time.perf_counter() - t0
        loss = loss_total / (plan.grad_accum * self.world) if not bad else float("nan")
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": bad,
                "tokens": self.counters["tokens"], "step_time": dt, "tokens_per_s": tokens / dt,
                "stop": stop_count > 0}

    # -- evaluation
    def evaluate(self) -> dict[str, Any]:
        """Mean token loss and perplexity on --eval-batches micro-batches per rank (collective)."""
        import torch
        import torch.distributed as dist

        plan = self.plan
        t0 = time.perf_counter()
        try:
            it = iter(self.eval_loader)
            batches = list(itertools.islice(it, plan.eval_batches) if plan.eval_batches else it)
        except RuntimeError as e:  # a streaming rank whose share of the held-out documents is too small
            log.warning("rank %d has no evaluation batch (%s)", self.rank, e)
            batches = []
        n = torch.tensor(float(len(batches)), dtype=torch.float64, device=self.device)
        if D.is_dist():
            dist.all_reduce(n, op=dist.ReduceOp.MIN)  # streaming shares may differ; FSDP needs equal forwards
        batches = batches[:int(n.item())]
        was_training = self.model.training
        self.fwd.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for b in batches:
                x = b["input_ids"].to(self.device)
                with self.autocast():
                    out = self.fwd(input_ids=x, labels=b["labels"].to(self.device))
                k = x.shape[0] * (x.shape[1] - 1)
                tot += torch.stack([out.loss.double() * k, torch.tensor(float(k), dtype=torch.float64,
                                                                         device=self.device)])
        if D.is_dist():
            dist.all_reduce(tot)
        if was_training:
            self.fwd.train()
        loss = (tot[0] / tot[1]).item() if tot[1] > 0 else float("nan")
        if tot[1] == 0 and self.rank == 0:
            log.warning("evaluation at step %d had no batches on some rank: give more held-out data (--eval-data, "
                        "--val-fraction) or fewer ranks", self.step)
        return {"step": self.step, "kind": "eval", "eval_loss": loss,
                "eval_ppl": math.exp(loss) if loss < 700 else float("inf"), "eval_tokens": int(tot[1].item()),
                "eval_time": time.perf_counter() - t0}

    def _eval_and_log(self, progress: Progress) -> None:
        rec = self.evaluate()
        self.evals.append(rec)
        self.metrics.write(rec)
        progress.write(f"eval at step {rec['step']}: loss {rec['eval_loss']:.4f}, perplexity {rec['eval_ppl']:.2f} "
                       f"({rec['eval_tokens']:,} tokens, {rec['eval_time']:.1f} s)")

    # -- the loop
    def run(self) -> int:
        plan = self.plan
        self.start_step = self.step
        log.info("training %s (%.2fM params) with %s under %s x %d: steps %d -> %d, %d tokens/step", plan.model,
                 self.n_params / 1e6, plan.optimizer, plan.strategy, self.world, self.step, plan.max_steps,
                 plan.tokens_per_step)
        if self.rank == 0:
            for note in plan.notes:
                log.warning("%s", note)
        progress = Progress(self.rank == 0, plan.max_steps, self.step, plan.log_every)
        self.t_start = time.perf_counter()
        code, reason = EXIT_OK, "done"
        try:
            if plan.eval_every and self.step == 0:
                self._eval_and_log(progress)
            while self.step < plan.max_steps:
                rec = self.train_step()
                mem = memory_reading(self.device)
                rec.update({k: round(v, 1) for k, v in mem.items()})
                stop = rec.pop("stop")
                if self.rank == 0:
                    self.history.append(rec)
                self.metrics.write(rec)
                progress.update(self.step, rec["loss"], rec["lr"], rec["grad_norm"], rec["tokens_per_s"],
                                memory_short(mem), rec["skipped"])
                if self.counters["bad_in_a_row"] >= plan.max_bad_steps:
                    self.save("bad_steps")
                    log.error("%d consecutive steps had non-finite loss or gradients (--max-bad-steps %d): stopping. "
                              "The model and optimizer state are those after the last good step (step %d); "
                              "checkpoint %s. Lower --lr, raise --warmup-steps, set --grad-clip, or inspect the "
                              "data at these steps.", self.counters["bad_in_a_row"], plan.max_bad_steps,
                              self.step - self.counters["bad_in_a_row"], self.ckpt_path)
                    code, reason = EXIT_BAD_STEPS, "bad_steps"
                    break
                last = self.step == plan.max_steps
                if plan.eval_every and (self.step % plan.eval_every == 0 or last):
                    self._eval_and_log(progress)
                if plan.save_every and (self.step % plan.save_every == 0 or last):
                    self.save("final" if last else "periodic")
                if stop:
                    self.save("preempted")
                    log.warning("stopping at step %d after a signal: checkpoint %s; exit %d (requeue and run the "
                                "same command to resume)", self.step, self.ckpt_path, EXIT_REQUEUE)
                    code, reason = EXIT_REQUEUE, "preempted"
                    break
        finally:
            progress.close()
        self.finish(code, reason)
        return code

    def finish(self, code: int, reason: str) -> None:
        mem = D.all_gather_object(memory_reading(self.device))
        self.metrics.close()
        if self.rank != 0:
            return
        summary = self._summary(mem, code, reason)
        with open(Path(self.plan.output_dir) / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        write_exit_status(self.plan.output_dir, code, reason, self.step,
                          str(self.ckpt_path) if self.last_saved_step >= 0 else None)
        print(format_summary(summary), flush=True)

    def _summary(self, mem: list[dict[str, float]], code: int, reason: str) -> dict[str, Any]:
        plan = self.plan
        good = [r for r in self.history if not r["skipped"]]
        timed = self.history[1:] if len(self.history) > 1 else self.history
        tps = sum(plan.tokens_per_step for _ in timed) / max(1e-9, sum(r["step_time"] for r in timed)) \
            if timed else 0.0
        last = good[-min(10, len(good)):] if good else []
        return {
            "model": plan.model, "params": self.n_params, "strategy": plan.strategy, "zero_stage": plan.zero_stage,
            "world_size": self.world, "backend": _backend(), "optimizer": plan.optimizer, "rank": plan.rank,
            "bf16": plan.bf16, "momentum_reset_interval": plan.momentum_reset_interval,
            "recovery_steps": plan.recovery_steps,
            "exit_code": code, "reason": reason, "start_step": self.start_step, "end_step": self.step,
            "max_steps": plan.max_steps, "tokens_per_step": plan.tokens_per_step, "tokens": self.counters["tokens"],
            "skipped_steps": self.counters["skipped_steps"],
            "loss_first": good[0]["loss"] if good else None,
            "loss_last": sum(r["loss"] for r in last) / len(last) if last else None, "loss_last_n": len(last),
            "eval_first": self.evals[0] if self.evals else None, "eval_last": self.evals[-1] if self.evals else None,
            "tokens_per_s": tps, "wall_s": time.perf_counter() - self.t_start,
            "memory_per_rank": mem, "checkpoint": str(self.ckpt_path) if self.last_saved_step >= 0 else None,
            "losses": [r["loss"] for r in self.history],
        }


def _backend() -> str | None:
    """The default process group's backend: "nccl", "gloo", or per device ("cpu:gloo,cuda:nccl") for the group
    that fully_shard starts by itself in a one-process run; None without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend())
    return str(dist.get_backend_config()) if backend == "undefined" else backend


def format_summary(s: dict[str, Any]) -> str:
    strat = s["strategy"] + (f" ZeRO-{s['zero_stage']}" if s["strategy"] == "deepspeed" else "")
    opt = s["optimizer"] + (f" (rank {s['rank']})" if s["optimizer"] != "adamw" else "")
    if s.get("momentum_reset_interval"):
        opt += f", momentum reset every {s['momentum_reset_interval']} steps"
    lines = ["", "=" * 24 + " fira-dist pretrain summary " + "=" * 24,
             f"model        {s['model']} ({s['params'] / 1e6:.2f}M params), {opt}, {strat} x {s['world_size']} "
             f"rank(s), {'bf16' if s['bf16'] else 'fp32'}",
             f"steps        {s['start_step']} -> {s['end_step']} of {s['max_steps']} ({s['skipped_steps']} skipped "
             f"in total), {s['tokens']:,} tokens seen, {s['wall_s']:.0f} s this run"]
    if s["loss_first"] is not None:
        lines.append(f"train loss   {s['loss_first']:.4f} (first step of this run) -> {s['loss_last']:.4f} (mean of "
                     f"the last {s['loss_last_n']} steps)")
    if s["eval_first"] is not None:
        a, b = s["eval_first"], s["eval_last"]
        lines.append(f"eval         perplexity {a['eval_ppl']:.2f} (loss {a['eval_loss']:.4f}) at step {a['step']} -> "
                     f"{b['eval_ppl']:.2f} (loss {b['eval_loss']:.4f}) at step {b['step']}")
    lines.append(f"throughput   {s['tokens_per_s']:,.0f} tokens/s (all ranks, first step excluded)")
    mem = ", ".join(f"rank {i}: {m.get('cuda_peak_mb', m['peak_rss_mb']):,.0f} MiB" for i, m in
                    enumerate(s["memory_per_rank"]))
    kind = "GPU peak allocated" if "cuda_peak_mb" in s["memory_per_rank"][0] else "peak RSS"
    lines.append(f"memory       {kind} per rank: {mem}")
    lines.append(f"checkpoint   {s['checkpoint'] or '-'}")
    lines.append(f"exit         {s['exit_code']} ({s['reason']})")
    lines.append("=" * 76)
    return "\n".join(lines)


def write_exit_status(output_dir: str, code: int, reason: str, step: int | None, checkpoint: str | None) -> None:
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(output_dir) / ".exit_status.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"exit_code": code, "reason": reason, "step": step, "checkpoint": checkpoint,
                       "time": time.time()}, f)
        os.replace(tmp, Path(output_dir) / "exit_status.json")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- entry point
def _explicit_flags(argv: Sequence[str]) -> set[str]:
    out = set()
    for a in argv:
        if a.startswith("--"):
            out.add(a[2:].split("=", 1)[0])
    return out


def _is_dist_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in ("Timed out", "timed out", "Timeout", "Connection closed by peer",
                                   "Connection reset by peer", "gloo", "NCCL", "ProcessGroup"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fira-dist pretrain``; the exit code. A process that joined a process group leaves through
    ``os._exit`` after destroying it (see ``distributed.exit_without_finalization``)."""
    joined: list[bool] = []
    code = _main(argv, joined)
    if joined:
        D.exit_without_finalization(code)
    return code


def _main(argv: Sequence[str] | None, joined: list[bool]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        launch = D.discover(mpi_rendezvous="--dry-run" not in argv)
    except ValueError as e:
        print(f"fira-dist pretrain: error: launch environment: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"fira-dist pretrain: error: {e}\n(see fira-dist pretrain --help)", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(launch.rank, args.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if launch.rank != 0 or not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()  # readable logs: no tokenizing bars from every rank
    try:
        plan = resolve(args, _explicit_flags(argv), launch)
        if plan.dry_run:
            return dry_run(plan)
    except UsageError as e:
        if launch.rank == 0:
            print(f"fira-dist pretrain: error: {e}", file=sys.stderr)
            if not args.dry_run:  # torchrun reports 1: the launch scripts read the 2 from exit_status.json
                write_exit_status(args.output_dir, EXIT_USAGE, f"usage: {e}", None, None)
        return EXIT_USAGE
    trainer = Trainer(plan)
    try:
        trainer.setup()
        return trainer.run()
    except UsageError as e:
        log.error("%s", e)
        if launch.rank == 0:
            write_exit_status(plan.output_dir, EXIT_USAGE, f"usage: {e}", trainer.step, None)
        return EXIT_USAGE
    except Exception as e:
        if D.is_dist() and _is_dist_failure(e):
            log.error("a collective failed or waited longer than --dist-timeout=%g s (%s: %s); a rank died or hangs: "
                      "stopping with exit %d", plan.dist_timeout, type(e).__name__, e, EXIT_DIST_FAILURE)
            if launch.rank == 0:
                write_exit_status(plan.output_dir, EXIT_DIST_FAILURE, "dist_failure", trainer.step, None)
            os._exit(EXIT_DIST_FAILURE)  # the process group is broken: do not wait in its teardown
        log.exception("pretrain failed at step %d", trainer.step)
        if launch.rank == 0:
            write_exit_status(plan.output_dir, EXIT_ERROR, f"{type(e).__name__}: {e}", trainer.step, None)
        return EXIT_ERROR
    finally:
        if D.is_dist():
            joined.append(True)
            with contextlib.suppress(Exception):
                D.destroy()


if __name__ == "__main__":
    sys.exit(main())
