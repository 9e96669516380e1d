"""Measured memory of real training steps, per rank, in the categories of ``memory.estimate``.

Library functions (a training loop can call them for its progress bar and summary):

- ``measured_optimizer_state_bytes(optimizer)``: bytes of the optimizer's actual state tensors on this rank,
  split as the estimate splits them (projectors, moments, scalars). Walks nested state (the flat-partition
  layout keeps per-parameter state inside the flat tensor's entry), counts DTensors by their local shard,
  and unwraps DeepSpeed's ZeRO optimizer to the client optimizer.
- ``model_tensor_bytes(model, engine=None)``: parameters, gradients and master weights this rank holds
  (plain, DDP, FSDP2 DTensor shards, DeepSpeed ZeRO-1/2 flat buffers and partitions, ZeRO-3 partitions).
- ``SavedActivations``: a context manager counting the bytes autograd saves for backward (unique storages,
  parameters excluded).
- ``CpuAllocPeak``: the CPU allocator's live bytes and their peak (torch.profiler memory events: every
  allocation and free of the c10 CPU allocator); ``cuda_peak_bytes()``; ``rss_bytes()`` / ``peak_rss_bytes()``.

``python -m fira_dist.memory.measure --worker ...`` (launched under torchrun for several ranks) trains a few
steps of one configuration and writes each rank's measured figures as JSON; ``measure_configuration``
launches it and pairs each rank's figures with the estimate for that rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from fira_dist.memory.config import MemoryConfig
from fira_dist.memory.estimate import estimate

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
PROJECTOR_KEYS = ("projector",)


# ----------------------------------------------------------------------------------------------- tensors
def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") and type(t).__name__ == "DTensor" else t


def tensor_nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        if t.device.type == "meta" or t.numel() == 0:
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer that owns the state (DeepSpeed's ZeRO wrappers keep it as ``.optimizer``)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    if hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer) \
            and not getattr(optimizer, "state", None):
        optimizer = optimizer.optimizer
    return optimizer


def measured_optimizer_state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes of this rank's optimizer state tensors: projectors, moments (exp_avg, exp_avg_sq), scalars
    (0-d tensors: step, limiter norm), other (any other tensor), optimizer_states (their sum).

    Nested dicts/lists in the state are walked; a DTensor counts its local shard; numel x element size
    (a placeholder with 0 elements counts 0). Works with torch optimizers, ``fira_dist.Fira`` under every
    layout, and DeepSpeed engines' optimizers (unwrapped to the client optimizer).
    """
    opt = _unwrap_optimizer(optimizer)
    out = {"projectors": 0, "moments": 0, "scalars": 0, "other": 0}

    def visit(key: Any, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            n = tensor_nbytes(v)
            if key in PROJECTOR_KEYS:
                out["projectors"] += n
            elif key in MOMENT_KEYS:
                out["moments"] += n
            elif _local(v).dim() == 0:
                out["scalars"] += n
            else:
                out["other"] += n
        elif isinstance(v, dict):
            for k, x in v.items():
                visit(k, x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(key, x)

    for st in opt.state.values():
        visit(None, st)
    out["optimizer_states"] = sum(out.values())
    return out


def model_tensor_bytes(model: torch.nn.Module, engine: Any = None) -> dict[str, int]:
    """params, grads, master_params held by this rank (distinct storages).

    plain / DDP / FSDP2: the parameters' (local) storages and their .grad. DeepSpeed ZeRO-1/2: the
    low-precision flat buffers, the gradient partitions (``averaged_gradients``) and any .grad still held,
    the fp32 partitions. ZeRO-3: each parameter's partition (``ds_tensor``) plus the parameters currently
    whole (persistent ones), the flat gradient partition buffer, the fp32 partitions.
    """
    zo = getattr(engine, "optimizer", None) if engine is not None else None
    params = list(model.parameters())
    if zo is not None and hasattr(zo, "bit16_groups_flat"):
        avg = getattr(zo, "averaged_gradients", {}) or {}
        parts = {(g.data_ptr(), g.numel()): tensor_nbytes(g) for v in (avg.values() if isinstance(avg, dict) else avg)
                 if v for g in v if g is not None}
        # the partition's bytes (a gradient straddling a partition boundary contributes its piece)
        return {"params": storage_bytes(zo.bit16_groups_flat),
                "grads": sum(parts.values()) + storage_bytes([p.grad for p in params]),
                "master_params": storage_bytes(zo.single_partition_of_fp32_groups)}
    if zo is not None and hasattr(zo, "fp32_partitioned_groups_flat"):
        whole = [p.data for p in params if p.data.numel() > 0]
        return {"params": storage_bytes([p.ds_tensor for p in params]) + storage_bytes(whole),
                "grads": storage_bytes([getattr(zo, "grad_partitions_flat_buffer", None)] + [p.grad for p in params]),
                "master_params": storage_bytes(zo.fp32_partitioned_groups_flat)}
    return {"params": storage_bytes(params), "grads": storage_bytes([p.grad for p in params]), "master_params": 0}


class SavedActivations:
    """Bytes autograd saves for backward inside the context (distinct storages, parameters and views of
    parameters excluded). ``bytes`` after exit."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: dict[int, int] = {}
        self._ctx: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad) or t.device.type == "meta":
            return t
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        self._seen[st.data_ptr()] = max(self._seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    def __enter__(self) -> "SavedActivations":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        self.bytes = sum(self._seen.values())


class CpuAllocPeak:
    """Live bytes of the CPU allocator and their peak over the context, from torch.profiler's memory events
    (every allocation and free on CPU is recorded; byte counts are relative to what was live at entry).

    ``mark()`` records a point in the event stream (by allocating and freeing a tensor of a unique odd size);
    after exit ``peak_since_mark`` is the high-water mark from the last mark on and ``live_at_mark`` what was live
    at the mark (their difference: the growth from the mark on) (e.g. the training steps
    without the model's construction). Costs some speed: for measurements.
    """

    _MARK_BYTES = 7_654_321  # an allocation size nothing else makes

    def __init__(self) -> None:
        self._prof: Any = None
        self._marks = 0
        self.peak = 0
        self.end = 0
        self.peak_since_mark: int | None = None
        self.live_at_mark: int | None = None

    def __enter__(self) -> "CpuAllocPeak":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def mark(self) -> None:
        self._marks += 1
        t = torch.empty(self._MARK_BYTES + self._marks, dtype=torch.uint8)
        del t

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        cur = peak = 0
        since: int | None = None
        last_mark = self._MARK_BYTES + self._marks
        for _, nb in events:
            if self._marks and nb == last_mark and since is None:
                since = self.live_at_mark = cur  # the marker itself is not counted
                continue
            if self._marks and nb == -last_mark:  # the marker's free
                continue
            cur += nb
            peak = max(peak, cur)
            if since is not None:
                since = max(since, cur)
        self.peak, self.end, self.peak_since_mark = peak, cur, since


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now (/proc/self/status VmRSS; 0 where there is no /proc)."""
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (/proc/self/status VmHWM, else getrusage's ru_maxrss)."""
    v = _proc_status_bytes("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_bytes(reset: bool = False) -> int:
    """torch.cuda.max_memory_allocated() of the current device (0 without CUDA); reset the peak after reading."""
    if not torch.cuda.is_available():
        return 0
    peak = torch.cuda.max_memory_allocated()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def memory_summary(optimizer: Any = None, model: torch.nn.Module | None = None, engine: Any = None) -> dict[str, int]:
    """One dict for a progress bar / summary: optimizer state bytes, params/grads/master bytes, RSS and
    peak RSS, CUDA peak (when on GPU)."""
    out: dict[str, int] = {"rss": rss_bytes(), "peak_rss": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_peak"] = cuda_peak_bytes()
    if optimizer is not None:
        out.update(measured_optimizer_state_bytes(engine.optimizer if engine is not None else optimizer))
    if model is not None:
        out.update(model_tensor_bytes(model, engine))
    return out


# ----------------------------------------------------------------------------------------------- the worker
def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _build(cfg: MemoryConfig, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """(model to call, the underlying module, optimizer, engine or None) for cfg.strategy."""
    from fira_dist import Fira, param_groups
    from fira_dist.models import build_model, enable_activation_checkpointing, get_model_config

    config = get_model_config(cfg.model, vocab_size=cfg.vocab_size)
    config._attn_implementation = cfg.attention
    dtype = torch.bfloat16 if cfg.precision == "bf16-pure" else torch.float32
    model = build_model(config, device=str(device), dtype=dtype, seed=0)
    if cfg.optimizer == "lowrank":
        from fira_dist.lowrank import factorize

        factorize(model, cfg.target_modules, cfg.rank)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()

    def make_opt(module: Any, **kw: Any) -> Any:
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.0)
        extra = {} if cfg.state_dtype in (None, "fp32") else {"state_dtype": "grad"}
        if cfg.optimizer == "lowrank":  # the factorized model: Fira's plain Adam on every tensor
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            return Fira([{"params": named}], lr=1e-4, eps=1e-8, **extra, **kw)
        groups = param_groups(module, target_modules=cfg.target_modules, rank=cfg.rank, proj_type=cfg.proj_type,
                              algorithm=cfg.optimizer, update_proj_gap=2)
        return Fira(groups, lr=1e-4, **extra, **kw)

    s = cfg.strategy
    if s == "single":
        return model, model, make_opt(model), None
    if s == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, gradient_as_bucket_view=cfg.ddp_bucket_view)
        return ddp, model, make_opt(model), None
    if s == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.precision == "bf16-mixed" else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model, model, make_opt(model), None
    # DeepSpeed ZeRO-1/2/3
    stage = int(s[-1])
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16-mixed"},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": cfg.zero_reduce_bucket_size,
                              "stage3_param_persistence_threshold": cfg.zero3_param_persistence_threshold,
                              "stage3_prefetch_bucket_size": cfg.zero3_prefetch_bucket_size,
                              "sub_group_size": cfg.zero3_sub_group_size},
    }
    if cfg.zero_overlap_comm is not None:
        ds_config["zero_optimization"]["overlap_comm"] = cfg.zero_overlap_comm
    if cfg.optimizer == "adamw":  # DeepSpeed's own AdamW (FusedAdam), as its users run it
        import deepspeed

        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        return engine, model, opt, engine
    from fira_dist import deepspeed as fira_ds  # the "fira" optimizer type and the FlatPartition layout

    ds_config["optimizer"] = {"type": "fira", "params": {
        "lr": 1e-4, "rank": cfg.rank, "target_modules": list(cfg.target_modules), "algorithm": cfg.optimizer,
        "update_proj_gap": 2, "proj_type": cfg.proj_type}}
    engine, opt, _, _ = fira_ds.initialize(model=model, config=ds_config)
    return engine, model, opt, engine


def run_worker(cfg: MemoryConfig, steps: int, seed: int = 0, profile: bool = True) -> dict[str, Any]:
    """Train ``steps`` steps of cfg on this rank (already in a torchrun / single process) and return the
    measured figures (bytes): params, grads, master_params (after backward of the last step),
    optimizer_states and its parts (after the last step), activations_saved (last forward),
    activations_logits, peak_allocated (CPU allocator via the profiler, or CUDA max_memory_allocated),
    peak_rss. The first step allocates the optimizer state; the last step's figures are reported.
    profile=False skips the CPU allocator's peak (the profiler slows steps down); peak_allocated is then None."""
    rank, world = _dist_env()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if cfg.strategy.startswith("zero"):
            import deepspeed

            deepspeed.init_distributed("nccl" if device.type == "cuda" else "gloo")
        else:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out: dict[str, Any] = {"rank": rank, "world_size": world, "device": str(device)}
    gc.collect()  # garbage of an earlier configuration freed while profiling would count as negative bytes
    prof = CpuAllocPeak() if device.type == "cpu" and profile else contextlib.nullcontext()
    with prof:
        torch.manual_seed(seed)
        model_call, module, opt, engine = _build(cfg, device)
        gen = torch.Generator().manual_seed(seed + rank)
        vocab = module.config.vocab_size
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if cfg.precision == "bf16-mixed" and cfg.strategy in ("single", "ddp") else contextlib.nullcontext())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif profile:
            prof.mark()  # the training steps' peak, without the construction's transients (DDP's broadcast...)
        for step in range(steps):
            x = torch.randint(0, vocab, (cfg.micro_batch, cfg.seq_len), generator=gen).to(device)
            saved = SavedActivations()
            with saved, autocast:
                res = model_call(input_ids=x, labels=x)
            loss = res.loss
            logits_bytes = tensor_nbytes(res.logits)
            if engine is not None:
                engine.backward(loss)
            else:
                loss.backward()
            tb = model_tensor_bytes(module, engine)
            del res, loss
            if engine is not None:
                engine.step()
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
        out.update(tb)
        out.update(measured_optimizer_state_bytes(engine.optimizer if engine is not None else opt))
        out["activations_saved"] = saved.bytes
        out["activations_logits"] = logits_bytes
        out["model_params"] = sum(p.numel() for p in module.parameters()) if cfg.strategy != "fsdp2" else None
    del model_call, module, opt, engine, saved
    gc.collect()
    if device.type == "cpu":
        out["peak_allocated"] = prof.peak_since_mark if profile else None
        out["live_before_first_step"] = prof.live_at_mark if profile else None
        out["peak_allocated_with_setup"] = prof.peak if profile else None
    else:
        out["peak_allocated"] = cuda_peak_bytes()
    out["peak_rss"] = peak_rss_bytes()
    return out


def _config_from_dict(raw: dict[str, Any]) -> MemoryConfig:
    raw = dict(raw)
    raw["target_modules"] = tuple(raw.get("target_modules", ("attn", "mlp")))
    return MemoryConfig(**raw)


def worker_main(argv: list[str] | None = None) -> int:
    """Entry of ``python -m fira_dist.memory.measure``: run each configuration of ``--config`` (a JSON object
    or list) in turn in this process (one process group for all), write ``<out>/rank<r>.json`` (a list)."""
    p = argparse.ArgumentParser(prog="python -m fira_dist.memory.measure")
    p.add_argument("--config", required=True, help="a MemoryConfig as a JSON object, or a JSON list of them")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True, help="folder for rank<r>.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher passes it
    a = p.parse_args(argv)
    raw = json.loads(a.config)
    cfgs = [_config_from_dict(c) for c in (raw if isinstance(raw, list) else [raw])]
    results = []
    for cfg in cfgs:
        results.append(run_worker(cfg, a.steps))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, f"rank{results[0]['rank']}.json").write_text(json.dumps(results))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        from fira_dist.processes import exit_without_finalization

        exit_without_finalization(0)  # gloo's threads can abort interpreter finalization
    return 0


# ----------------------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfgs: MemoryConfig | list[MemoryConfig], steps: int = 3, timeout: float = 600,
           retries: int = 2) -> list[list[dict[str, Any]]]:
    """Run the worker on world_size processes (torchrun, one node; gloo on CPU) for each configuration (all
    with the same world size, in one launch) and return, per configuration, each rank's measured figures.
    Raises RuntimeError with the output's tail if a rank fails."""
    cfgs = [cfgs] if isinstance(cfgs, MemoryConfig) else list(cfgs)
    sizes = {c.world_size for c in cfgs}
    if len(sizes) != 1:
        raise ValueError(f"configurations of one launch must share a world size; got {sorted(sizes)}")
    world = sizes.pop()
    cfg_json = json.dumps([dataclasses.asdict(c) for c in cfgs])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    for attempt in range(retries + 1):
        with tempfile.TemporaryDirectory(prefix="fira_mem_") as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                   str(world), "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                   "-m", "fira_dist.memory.measure", "--config", cfg_json, "--steps", str(steps), "--out", tmp]
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
            if proc.returncode == 0:
                per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
                return [[per_rank[r][i] for r in range(world)] for i in range(len(cfgs))]
        if attempt < retries and "ddress already in use" in proc.stdout:
            continue
        raise RuntimeError(f"memory measurement failed ({' '.join(cmd[:8])} ...): exit {proc.returncode}\n"
                           f"{proc.stdout[-6000:]}")
    raise RuntimeError("unreachable")


def measure_configuration(cfg: MemoryConfig, steps: int = 3, model: str | None = None,
                          world_size: int | None = None) -> dict[str, Any]:
    """Measure cfg at a size that fits this machine and pair it with the estimate of the same configuration.

    model: the model to train (default cfg.model when its estimated peak fits in half of this machine's
    free memory (GPU, or CPU RAM / ranks) and it has at most 150M parameters on CPU, else llama_20m).
    world_size: ranks (default min(cfg.world_size, GPUs) on GPU, min(cfg.world_size, 2) on CPU).
    """
    if world_size is None:
        avail = torch.cuda.device_count() if torch.cuda.is_available() else 2
        world_size = 1 if cfg.strategy == "single" else max(2 if cfg.strategy != "single" else 1, min(cfg.world_size, avail))
    mcfg = cfg.replace(world_size=world_size, device="cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        model = cfg.model
        est = estimate(mcfg)
        free = (torch.cuda.mem_get_info()[0] if torch.cuda.is_available()
                else _available_ram() // max(world_size, 1))
        if est["peak"] > free // 2 or (not torch.cuda.is_available() and est["model_params"] > 150e6):
            model = "llama_20m"
    mcfg = mcfg.replace(model=model)
    est0 = estimate(mcfg, rank=0)
    mcfg = MemoryConfig(**{**est0["config"], "target_modules": tuple(est0["config"]["target_modules"])})
    if world_size == 1:
        measured = [run_worker(mcfg, steps)]
    else:
        measured = launch(mcfg, steps)[0]
    ranks = [{"rank": r, "estimated": estimate(mcfg, rank=r), "measured": m} for r, m in enumerate(measured)]
    return {"requested": dataclasses.asdict(cfg), "config": dataclasses.asdict(mcfg), "steps": steps, "ranks": ranks}


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


if __name__ == "__main__":
    sys.exit(worker_main())
