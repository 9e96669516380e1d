"""Per-rank memory of a training configuration, estimated: any size, nothing allocated (llama_7b: about a second).

``estimate(MemoryConfig(model="llama_7b", optimizer="fira", strategy="zero2", world_size=64))`` gives one rank's
bytes of parameters, gradients, master weights, optimizer states (projectors and moments apart), activations,
communication buffers, the optimizer step's temporaries and the peak, plus the optimizer's and the framework's
bytes per step. Where the numbers come from (nothing here is a hand-kept table of model sizes):

- Shapes: the real ``LlamaForCausalLM`` on the meta device and the real param groups (``memory.model``).
- The optimizer (state, exchange buffers, temporaries, traffic): the layouts' own plans (``memory.optimizer``
  runs ``fira_dist.layouts.plan``), so the estimate cannot drift from the code.
- Parameters, gradients and master weights: the framework's own sizing rules (DeepSpeed's flat-buffer
  alignment, ZeRO-3's per-parameter padding and persistence threshold, FSDP2's padded dim-0 shards, DDP's
  gradient buckets), each quoted where it is used.
- Activations: ``memory.model.activation_bytes``, checked exactly against ``saved_tensors_hooks``.

The optimizer-state, parameter, gradient, master-weight and saved-activation figures are exact for what the
tests cover; buffers, transients and "peak" (the high-water mark of one step, see ``peak_bytes``) are estimates,
checked against the CPU allocator's high-water mark (docs/memory.md, benchmarks/memory_vs_adamw.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fira_dist.layouts.plan import zero12_partition
from fira_dist.memory.config import MemoryConfig, comm_budget, dtypes, rank_of
from fira_dist.memory.model import ModelInfo, activation_bytes, model_defaults, model_info
from fira_dist.memory.optimizer import (ADAMW_IMPL, flat_partitions, framework_comm_bytes, optimizer_buffers,
                                        optimizer_comm_bytes, optimizer_state, plan_for, zero3_partition_numel)


def fsdp2_padded_rows(dim0: int, world_size: int) -> int:
    """Rows every rank allocates for a dim-0 FSDP2 shard (padded to ceil(dim0 / W), _fsdp_param.py)."""
    return -(-dim0 // world_size)


def estimate(cfg: MemoryConfig, rank: int | None = None, info: ModelInfo | None = None) -> dict[str, Any]:
    """Per-rank bytes of one configuration. No tensor is allocated; llama_7b takes about a second.

    rank: which rank (0..W-1); None gives the rank with the highest peak. ``info`` may be passed (e.g.
    ``model_info_from_module(model)`` from a training loop) to skip building the meta model.

    Keys (bytes per rank):
      params, grads, master_params: see ``_estimate_rank``; grads is the gradient storage handed to the
        optimizer step (DeepSpeed: this rank's low-precision partition).
      optimizer_states = optimizer_projectors + optimizer_moments + optimizer_scalars (0-d step counters
        and limiter norms): exactly the optimizer's state tensors on this rank.
      activations = activations_saved (kept for backward) + activations_logits (the logits the model
        returns) + activations_transient (the largest short-lived buffer: loss in fp32, or one recomputed
        layer under activation checkpointing).
      comm_buffers = comm_persistent + max(comm_backward, comm_step): buckets and gather buffers.
      grads_backward_transient (ZeRO-1's full gradients before the reduce), optimizer_step_transient
        (temporaries of the optimizer step, including an SVD at a projector refresh); under FSDP2
        grads_backward_transient is the root's unsharded gradients at the end of backward.
      peak: see ``peak_bytes``.
    Also: rank, config (with defaults filled in), model_params, lowrank_matrices, notes.
    """
    if info is None:
        info = model_info(cfg.model, cfg.optimizer, cfg.rank or model_defaults(cfg.model)[0] or 128,
                          cfg.target_modules, cfg.vocab_size)
    if cfg.rank is None:
        cfg = cfg.replace(rank=info.default_rank)
    if cfg.seq_len is None:
        cfg = cfg.replace(seq_len=info.default_seq_len)
    if rank is not None:
        if not 0 <= rank < cfg.world_size:
            raise ValueError(f"rank={rank!r} is not accepted; expected 0 <= rank < world_size={cfg.world_size}")
        return _estimate_rank(info, cfg, rank)
    results = [_estimate_rank(info, cfg, r) for r in _candidate_ranks(info, cfg)]
    return max(results, key=lambda d: (d["peak"], -d["rank"]))


def estimate_all_ranks(cfg: MemoryConfig, info: ModelInfo | None = None) -> list[dict[str, Any]]:
    """``estimate`` for every rank (for small world sizes: tests, measurements)."""
    first = estimate(cfg, rank=0, info=info)
    cfg = MemoryConfig(**first["config"])
    info = info or model_info(cfg.model, cfg.optimizer, cfg.rank, cfg.target_modules, cfg.vocab_size)
    return [first] + [estimate(cfg, rank=r, info=info) for r in range(1, cfg.world_size)]


def _candidate_ranks(info: ModelInfo, cfg: MemoryConfig) -> list[int]:
    """Ranks whose figures can differ most: the first and last (padding, empty FSDP2 chunks) and, under the
    owner-computes layouts, the rank with the most owned state (from the same owner map)."""
    W = cfg.world_size
    if W <= 4:
        return list(range(W))
    cand = {0, W - 1}
    if cfg.optimizer != "adamw" and cfg.strategy != "single":
        lp = plan_for(info, cfg, rank_of(cfg, info.default_rank))
        owners = lp.owners if lp.owners else lp.svd_owner
        for weight in ("numel", "svd"):  # the rank holding the most matrix elements, and the one with the largest SVD
            loads = [0] * W
            for i, o in owners.items():
                if o >= 0 and info.params[i].low_rank:
                    n = info.params[i].numel
                    loads[o] = loads[o] + n if weight == "numel" else max(loads[o], n)
            cand.add(max(range(W), key=lambda o: (loads[o], -o)))
    return sorted(cand)


def _estimate_rank(info: ModelInfo, cfg: MemoryConfig, r: int) -> dict[str, Any]:
    """Rank r's figures. Rules per strategy (N model elements, W ranks; element sizes from ``config.dtypes``):

    single/ddp: params N w, grads N g; DDP's reducer buckets hold another N g unless gradient_as_bucket_view.
    zero1/2 (stage_1_and_2.py): every rank keeps the whole flat low-precision buffer of each param group
      (padded, ``zero12_partition``), its fp32 master partition, its low-precision gradient partition;
      ZeRO-1 keeps all full gradients until the end of backward; the step makes an fp32 copy of one group's
      gradient partition; the reduce bucket is reduce_bucket_size elements.
    zero3 (stage3.py, partition_parameters.py): each parameter's partition (padded to W), small parameters
      (< param_persistence_threshold) also whole; fp32 master and gradient partitions; gathered layers
      (prefetch bucket + the current one) and the reduce bucket.
    fsdp2: dim-0 shards padded to ceil(dim0 / W) rows; during forward/backward the root module's
      unsharded weights (embeddings, lm_head: not resharded after forward), the current and the prefetched
      layer's, and lm_head's unsharded gradient; at the end of backward the root's unsharded gradients and
      their fp32 reduce-scatter input (bf16-mixed).
    """
    dt = dtypes(cfg)
    W, s, N = cfg.world_size, cfg.strategy, info.numel
    notes: list[str] = []
    grads_bwd_transient = 0  # gradient storage that exists only around the end of backward
    grads_at_bwd_start = 0  # gradient storage that already exists when backward starts
    step_extra = 0  # gradient copies made inside the optimizer step (DeepSpeed's fp32 partition)
    comm_persistent = comm_backward = 0
    if s in ("single", "ddp"):
        params, grads, master = N * dt["w"], N * dt["g"], 0
        if s == "ddp" and not cfg.ddp_bucket_view:
            comm_persistent += N * dt["g"]
            notes.append("DDP's gradient buckets hold a second copy of all gradients (gradient_as_bucket_view=False)")
    elif s in ("zero1", "zero2"):
        parts = [zero12_partition([info.params[i].numel for i in g], W) for g in info.groups]
        params = sum(a for a, _ in parts) * dt["w"]
        master = sum(p for _, p in parts) * dt["m"]
        grads = sum(p for _, p in parts) * dt["g"]
        grads_at_bwd_start = grads if s == "zero2" else 0
        step_extra = max(p for _, p in parts) * 4
        if s == "zero1":
            grads_bwd_transient = N * dt["g"]
            notes.append("ZeRO-1 holds every full gradient until the end of backward, then reduces to the partition")
        overlap = cfg.zero_overlap_comm if cfg.zero_overlap_comm is not None else False
        # the bucket is allocated at its full configured size (torch.empty(reduce_bucket_size)), however small the model
        comm_backward += cfg.zero_reduce_bucket_size * dt["g"] * (2 if overlap else 1)
    elif s == "zero3":
        part = sum(zero3_partition_numel(p.numel, W) for p in info.params)
        persistent = sum(p.numel for p in info.params if p.numel < cfg.zero3_param_persistence_threshold)
        params = (part + persistent) * dt["w"]
        master = part * dt["m"]
        grads = part * dt["g"]
        grads_at_bwd_start = grads
        step_extra = max(flat_partitions(info, cfg)) * 4
        unit = _largest_unit(info)
        gathered = min(N, max(cfg.zero3_prefetch_bucket_size, unit) + unit)
        comm_backward += gathered * dt["w"] + cfg.zero_reduce_bucket_size * dt["g"]
        if persistent:
            notes.append(f"ZeRO-3 keeps {persistent} elements of small parameters (< param_persistence_threshold "
                         f"{cfg.zero3_param_persistence_threshold}) whole on every rank")
    else:  # fsdp2
        rows = sum(fsdp2_padded_rows(p.shape[0], W) * (p.numel // p.shape[0]) for p in info.params)
        params, grads, master = rows * dt["w"], rows * dt["g"], 0
        compute = 2 if cfg.precision == "bf16-mixed" else dt["w"]
        reduce_copy = 4 if cfg.precision == "bf16-mixed" else 0  # reduce_dtype=fp32 copy of the bf16 gradients
        root = sum(p.numel for p in info.params if not p.unit)  # embeddings, final norm, lm_head
        root_max = max((p.numel for p in info.params if not p.unit), default=0)
        layer = max((n for u, n in _unit_sizes(info).items() if u), default=0)
        # forward/backward: the root's unsharded weights (kept for backward), the current and the prefetched
        # layer's, lm_head's unsharded gradient (produced first, reduced with the root's at the end), and early in
        # backward, while nearly all activations are alive, one layer's unsharded gradients and their reduce-scatter
        # input (measured with the CPU allocator's events on llama_bench: benchmarks/memory_vs_adamw.py --measure)
        # (and the prefetched layer's all-gather output, alive until it is copied out into its parameters)
        comm_backward += (root + 3 * layer + root_max) * compute + layer * (compute + reduce_copy)
        # end of backward: the root's unsharded gradients and their reduce-scatter input
        grads_bwd_transient = (root + layer) * (compute + reduce_copy)
        if cfg.precision == "bf16-mixed":
            notes.append("FSDP2 bf16-mixed: the fp32 shards are the master weights (master_params 0)")
    rank = rank_of(cfg, info.default_rank)
    st = optimizer_state(info, cfg, r, rank)
    states = st["projectors"] + st["moments"] + st["scalars"]
    buf = optimizer_buffers(info, cfg, r, rank)
    comm_step, step_transient = buf["exchange"], buf["workspace"]
    act = activation_bytes(info, cfg.micro_batch, cfg.seq_len, dt["act"], cfg.attention, cfg.activation_checkpointing)
    if cfg.optimizer == "lowrank" and not cfg.activation_checkpointing:
        # each factorized linear also keeps x A_T (tokens x r) for B's gradient (exact: tests/test_memory.py)
        factors = sum(1 for p in info.params if p.name.endswith(".A_T"))
        extra = factors * cfg.micro_batch * cfg.seq_len * rank_of(cfg, info.default_rank) * (4 if dt["act"] == "fp32" else 2)
        act = {**act, "saved": act["saved"] + extra}
    act_transient = max(act["loss_transient"], act["layer"])
    out = {
        "params": params, "grads": grads, "master_params": master, "optimizer_states": states,
        "activations": act["saved"] + act["logits"] + act_transient,
        "comm_buffers": comm_persistent + max(comm_backward, comm_step),
        "optimizer_projectors": st["projectors"], "optimizer_moments": st["moments"],
        "optimizer_scalars": st["scalars"],
        "activations_saved": act["saved"], "activations_logits": act["logits"],
        "activations_transient": act_transient, "activations_weight_casts": act["weight_casts"],
        "comm_persistent": comm_persistent, "comm_backward": comm_backward, "comm_step": comm_step,
        "grads_backward_transient": grads_bwd_transient, "grads_at_backward_start": grads_at_bwd_start,
        "optimizer_step_transient": step_transient + step_extra,
    }
    out["peak"] = peak_bytes(out)
    out["peak_breakdown"] = peak_breakdown(out)
    out["rank"] = r
    out["config"] = dataclasses.asdict(cfg)
    out["model_params"] = N
    out["lowrank_matrices"] = len(info.lowrank()) if cfg.optimizer != "adamw" else 0
    out["notes"] = notes
    out["adamw_impl"] = ADAMW_IMPL[s] if cfg.optimizer == "adamw" else None
    out["comm_bucket_bytes"] = comm_budget(cfg) if cfg.optimizer != "adamw" else None
    out["optimizer_comm_bytes"] = optimizer_comm_bytes(info, cfg, r, rank)
    out["framework_comm_bytes"] = framework_comm_bytes(info, cfg)
    return out


def _unit_sizes(info: ModelInfo) -> dict[str, int]:
    units: dict[str, int] = {}
    for p in info.params:
        units[p.unit] = units.get(p.unit, 0) + p.numel
    return units


def _largest_unit(info: ModelInfo) -> int:
    return max(_unit_sizes(info).values())


def peak_breakdown(d: dict[str, int]) -> dict[str, int]:
    """What is alive at the peak (see ``_peak``), by component; the values sum to ``d["peak"]``."""
    persistent = d["params"] + d["master_params"] + d["optimizer_states"] + d["comm_persistent"]
    fwd = d["activations"] + d["grads_at_backward_start"] + d["comm_backward"]
    bwd_end = d["grads_backward_transient"] + d["comm_backward"]
    opt_step = d["optimizer_step_transient"] + d["comm_step"]
    out = {"params": d["params"], "master_params": d["master_params"],
           "optimizer_projectors": d["optimizer_projectors"], "optimizer_moments": d["optimizer_moments"],
           "optimizer_scalars": d["optimizer_scalars"], "grads": 0, "activations": 0, "comm_buffers": d["comm_persistent"],
           "temporaries": 0}
    if fwd >= d["grads"] + max(bwd_end, opt_step):
        out["phase"] = "forward/backward"
        out.update(grads=d["grads_at_backward_start"], activations=d["activations"])
        out["comm_buffers"] += d["comm_backward"]
    elif bwd_end >= opt_step:
        out["phase"] = "end of backward"
        out.update(grads=d["grads"], temporaries=d["grads_backward_transient"])
        out["comm_buffers"] += d["comm_backward"]
    else:
        out["phase"] = "optimizer step"
        out.update(grads=d["grads"], temporaries=d["optimizer_step_transient"])
        out["comm_buffers"] += d["comm_step"]
    assert sum(v for k, v in out.items() if k != "phase") == persistent + max(fwd, d["grads"] + max(bwd_end, opt_step))
    return out


def peak_bytes(d: dict[str, int]) -> int:
    """High-water mark of one step: what persists, plus the larger of two phases.

    persistent = params + master_params + optimizer_states + comm_persistent
    forward/backward (at the end of forward): activations + grads_at_backward_start + comm_backward
    end of backward / optimizer step: grads + max(grads_backward_transient + comm_backward,
                                                  optimizer_step_transient + comm_step)
    (Activations are freed as gradients are produced, so their sum is not counted.)
    """
    persistent = d["params"] + d["master_params"] + d["optimizer_states"] + d["comm_persistent"]
    fwd = d["activations"] + d["grads_at_backward_start"] + d["comm_backward"]
    step = d["grads"] + max(d["grads_backward_transient"] + d["comm_backward"],
                            d["optimizer_step_transient"] + d["comm_step"])
    return persistent + max(fwd, step)
