"""Small pieces of the training loop: the learning-rate schedule, metrics (JSONL + TensorBoard), memory
readings and the rank-0 progress display. Nothing here communicates."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

# Exit codes of ``fira-dist pretrain`` (the Slurm scripts requeue on EXIT_REQUEUE).
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected error (traceback in the log)
EXIT_USAGE = 2  # a bad flag / config value (message names it); nothing was started
EXIT_REQUEUE = 3  # preempted (SIGTERM / SIGUSR1): a checkpoint was written; requeue and run with --resume auto
EXIT_BAD_STEPS = 4  # --max-bad-steps consecutive non-finite steps: checkpoint of the last good state written
EXIT_DIST_FAILURE = 5  # a collective failed or timed out (--dist-timeout): a rank died or hangs


class UsageError(ValueError):
    """A bad flag or config value; the message names it, its value and what is accepted (exit EXIT_USAGE)."""


def flag_error(name: str, value: Any, accepted: str) -> UsageError:
    """The error for a bad ``--name`` value."""
    return UsageError(f"--{name}={value!r} is not accepted; expected {accepted}")


# ----------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer update ``step`` (0-based).

    GaLore's / Fira's ``get_cosine_schedule_with_min_lr_lambda``: linear warm-up ``step / warmup_steps``
    (so update 0 has lr 0, as in their runs), then cosine from 1 down to ``min_lr_ratio`` at ``max_steps``.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(1.0, progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------- memory
def _proc_status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out


def memory_reading(device=None) -> dict[str, float]:
    """This process's memory in MiB: ``rss`` and ``peak_rss`` (/proc/self/status VmRSS, VmHWM), and on CUDA
    ``cuda_alloc`` / ``cuda_peak`` (torch.cuda.memory_allocated / max_memory_allocated)."""
    st = _proc_status()
    out = {"rss_mb": st.get("VmRSS", 0) / 2**20, "peak_rss_mb": st.get("VmHWM", 0) / 2**20}
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        out["cuda_alloc_mb"] = torch.cuda.memory_allocated(device) / 2**20
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def memory_short(m: dict[str, float]) -> str:
    if "cuda_peak_mb" in m:
        return f"{m['cuda_alloc_mb']:.0f}/{m['cuda_peak_mb']:.0f}MB gpu"
    return f"{m['rss_mb']:.0f}MB rss"


# ----------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Rank 0's metrics: one JSON object a line in ``OUTPUT/metrics.jsonl`` and TensorBoard scalars in
    ``OUTPUT/tensorboard``. On resume from step S (``resume_step``), records of a previous attempt with step > S
    are dropped (JSONL rewritten, TensorBoard purged after S); on a fresh start (None) all of them, so each
    step appears once. Other ranks get a no-op."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._f = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    if resume_step is not None and rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        self._f = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # events of a previous attempt after the resume point (all of them on a fresh start) are purged
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                         purge_step=0 if resume_step is None else resume_step + 1)
            except Exception as e:  # tensorboard missing or broken: JSONL still has everything
                log.warning("TensorBoard disabled (%s: %s); metrics go to %s only", type(e).__name__, e, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")  # strict JSON: NaN/inf (a skipped step's loss) as null
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if key in ("step", "time", "kind") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                self._tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """The records of ``OUTPUT/metrics.jsonl`` (for tests and the demo summary)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """Rank 0's display: a tqdm bar (loss, tokens/s, memory) when stderr is a terminal, else one log line
    every ``log_every`` steps (so that logs of batch jobs stay readable)."""

    def __init__(self, enabled: bool, total: int, initial: int, log_every: int):
        self.enabled, self.log_every, self.total = enabled, max(1, log_every), total
        self.bar = None
        if enabled and sys.stderr.isatty() and os.environ.get("FIRA_DIST_NO_TQDM") != "1":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="pretrain", unit="step", mininterval=1.0,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, loss: float, lr: float, grad_norm: float | None, tok_s: float, mem: str,
               skipped: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tok_s:,.0f} tok/s | {mem}" + (" | SKIPPED" if skipped else ""),
                                     refresh=False)
        elif step % self.log_every == 0 or step == self.total or skipped:
            gn = f"{grad_norm:.3g}" if grad_norm is not None else "-"
            log.info("step %d/%d | loss %.4f | lr %.3e | grad norm %s | %s tok/s | %s%s", step, self.total, loss, lr,
                     gn, f"{tok_s:,.0f}", mem, " | SKIPPED (non-finite)" if skipped else "")

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at ``level``, other ranks warnings and errors only; each line carries the rank."""
    lvl = getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(lvl)
    for noisy in ("datasets", "transformers", "torch.distributed", "DeepSpeed", "deepspeed", "filelock",
                  "urllib3", "httpx", "fsspec"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
