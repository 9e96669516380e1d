"""DeepSpeed layouts: ZeRO-1/2 and ZeRO-3 flat partitions, and ZeRO-0 (replicated gradients).

Under ZeRO-1/2 (and DeepSpeed's BF16_Optimizer: bf16 + ZeRO-1 + fp32 gradient accumulation) the client
optimizer sees ONE flat fp32 tensor per param group, holding this rank's contiguous slice of the group's
parameters laid end to end; under ZeRO-3 one flat tensor per sub-group, holding this rank's slice of EACH
parameter in it. ``bind`` reads the partition tables of DeepSpeed's optimizer wrapper, so every rank knows
which element ranges every rank holds (``plan.zero12_pieces``, ZeRO-3's ceil(numel / W) ranges); nothing here
communicates to build a plan. DeepSpeed calls ``step()`` once per flat tensor; each call:

- Non-matrix parameters (and parameters of groups without ``rank``): elementwise Adam on the piece each rank
  holds (bitwise what one process computes on the whole tensor).
- ZeRO-1/2, locality first (``plan.zero12_plan``): a matrix that lies inside one rank's partition is updated by
  that rank, in place in its flat partition, by the single-process code (``single.whole_matrix_step_``): no
  communication, bitwise equal to one process; its projector, moments and limiter norm live there. A matrix
  that straddles a partition boundary is owned by its largest holder: the other holders send it their gradient
  and fp32 weight pieces point to point, straight from their flat partitions, the owner rebuilds the matrix,
  steps it and sends the updated pieces straight back into the holders' partitions, in rounds that keep each
  owner's rebuilt buffers (8 bytes per element) within ``comm_bucket_bytes`` (a larger matrix alone).
- ZeRO-3: every matrix is cut over all ranks; Fira runs on the slices where they lie (``layouts.sliced``): only
  low-rank tensors, per-row scales and projector pieces move, in chunks bounded by the budget; refresh steps
  gather a due gradient to its SVD owner in bounded rounds (exact) or sketch it in place (randomized).
- Before that, one all-reduce of one int32 per parameter (NaN/Inf anywhere, so every rank skips the same ones;
  the squared row norms of a local Fira matrix, which its step needs anyway, serve as its check).

Bytes per step() call, per rank (``expected_comm_bytes``; fp32): 4 x parameters (the flags) plus, ZeRO-1/2,
``plan.zero12_comm_bytes`` (8 per element held of a straddler owned elsewhere, 4 per element of an owned
straddler held elsewhere; matrices inside one partition 0), ZeRO-3 the sliced layout's formula
(``plan.sliced_chunk_comm_bytes`` per chunk, plus the refresh's).

Under ZeRO-0 (the engine all-reduces whole gradients; with bf16 DeepSpeed hands over fp32 copies of each
parameter) a greedy LPT owner map covers every parameter, Adam ones included: each owner updates its tensors and
the owners' values reach every rank in bounded all-gather rounds (``replicated.share_owned_values``).

State: see ``flat_state.py`` (per-unit state inside the flat tensor's entry, checkpoints, older layouts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from fira_dist.algorithm import LowRankState, adam_update_, gradient_norms_sq, uses_gradient_norms
from fira_dist.comm import Comm
from fira_dist.config import GroupOptions
from fira_dist.layouts import plan as P
from fira_dist.layouts.flat_state import META, UNITS, FlatState
from fira_dist.layouts.replicated import share_owned_values
from fira_dist.layouts.single import step_tasks_, whole_matrix_step_
from fira_dist.layouts.sketch import refresh_randomized
from fira_dist.layouts.sliced import SlicedMatrix, Work, check_supported, refresh_exact, step_chunk, uses_sketch
from fira_dist.optimizer import Task
from fira_dist.projector import OVERSAMPLE, POWER_ITERS, effective_rank, side_for

Piece = P.Piece


@dataclasses.dataclass
class Unit:
    """One model parameter as the layout sees it."""

    name: str
    shape: tuple[int, ...]
    group: int  # index into the optimizer's param_groups
    pieces: list[Piece]  # partitioned: disjoint, covering [0, numel); replicated: empty
    low_rank: bool = False
    side: str = ""
    owner: int = -1  # ZeRO-1/2 matrices, ZeRO-0 every unit: the rank that updates it; ZeRO-3: the SVD owner
    straddles: bool = False  # ZeRO-1/2: a matrix held by more than one rank
    mat: SlicedMatrix | None = None  # ZeRO-3 matrices

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def piece_of(self, rank: int) -> Piece | None:
        for pc in self.pieces:
            if pc.rank == rank and pc.length > 0:
                return pc
        return None


@dataclasses.dataclass
class Bucket:
    """What one flat tensor holds (a ZeRO-1/2 group or a ZeRO-3 sub-group), the same index on every rank."""

    index: int
    flat: torch.Tensor  # this rank's fp32 flat partition
    units: list[Unit]
    rounds: tuple[tuple[int, ...], ...] = ()  # ZeRO-1/2: unit indices of the straddlers per exchange round
    zplan: P.Zero12Plan | None = None  # ZeRO-1/2: the plan over the bucket's matrices (in unit order)


class FlatPartition(FlatState):
    """The DeepSpeed layout. Built unbound (``Fira(..., layout=FlatPartition)``); ``bind(engine)`` reads
    DeepSpeed's partition tables once the engine has wrapped the optimizer (``fira_dist.deepspeed`` does it)."""

    def __init__(self, opt: Any, process_group: Any = None):
        self.opt = opt
        self.mode: str | None = None  # "partitioned" | "replicated"
        self.stage: int | None = None
        self.comm = Comm(None) if not dist.is_initialized() else Comm(process_group)
        self.checkpoint_comm = self.comm
        self.engine_step = 0
        self.buckets: dict[int, Bucket] = {}  # id(flat) -> bucket
        self.units: dict[int, Unit] = {}  # replicated: id(param) -> unit
        self._round: set[int] = set()
        self._checked: set[int] = set()
        self.skipped: dict[str, int] = {}
        self._gather_hook = None
        self._just_loaded = False
        self.svd_count = 0
        self.sketch_count = 0

    # ------------------------------------------------------------------ binding
    def bind(self, engine: Any) -> "FlatPartition":
        """Read the partition tables of ``engine.optimizer`` (the wrapper DeepSpeed put around ``self.opt``)."""
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        wrapper = engine.optimizer
        names = {id(p): n for p, n in engine.param_names.items()}
        self.stage = int(engine.zero_optimization_stage())
        if not self.opt.comm_bucket_bytes_explicit:  # DeepSpeed's own reduce bucket, in the gradients' dtype
            itemsize = 2 if (engine.bfloat16_enabled() or engine.fp16_enabled()) else 4
            self.opt.comm_bucket_bytes = int(engine.zero_reduce_bucket_size()) * itemsize
        if isinstance(wrapper, DeepSpeedZeroOptimizer):
            groups = {id(g) for g in wrapper.real_dp_process_group}
            if len(groups) != 1:
                raise ValueError("fira: ZeRO param groups with different data-parallel groups (MoE) are not supported")
            self.comm = Comm(wrapper.real_dp_process_group[0])
            self._bind_zero12(wrapper, names)
        elif isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
            groups = {id(g) for g in wrapper.sub_group_process_groups}
            if len(groups) != 1:
                raise ValueError("fira: ZeRO-3 sub-groups with different partition groups are not supported")
            self.comm = Comm(wrapper.sub_group_process_groups[0])
            self._bind_zero3(wrapper, names)
        elif type(wrapper).__name__ == "BF16_Optimizer":
            self.comm = Comm(wrapper.real_dp_process_group[0])
            self._bind_bf16(wrapper, names)
        elif wrapper is self.opt or type(wrapper).__name__ in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
            self.comm = Comm(engine.seq_data_parallel_group)
            self._bind_replicated(wrapper, names)
        else:
            raise TypeError(f"fira: DeepSpeed wrapped the optimizer in {type(wrapper).__name__}, which fira_dist does not "
                            "know how to read; supported: ZeRO stages 0-3 (fp32, bf16), BF16_Optimizer")
        self.checkpoint_comm = Comm(self.comm.group)
        return self

    def _make_unit(self, name: str, shape: tuple[int, ...], gi: int, pieces: list[Piece]) -> Unit:
        o = self.opt.group_options(gi)
        low = o.low_rank and len(shape) == 2
        if o.low_rank and len(shape) != 2:
            self.opt.warn_once(f"nd:{name}", f"{name} has shape {shape} in a group with 'rank': only 2-D weights "
                               "are projected; it gets plain Adam")
        side = side_for(shape, o.proj_type.value) if low else ""
        return Unit(name, tuple(int(s) for s in shape), gi, pieces, low, side)

    def _bind_zero12(self, z: Any, names: dict[int, str]) -> None:
        W = self.comm.world_size
        for i, params in enumerate(z.round_robin_bit16_groups):
            ps = int(z.partition_size[i])
            units = []
            for j, (p, off) in enumerate(zip(params, z.round_robin_bit16_offsets[i])):
                shape = tuple(z.round_robin_bit16_meta[i][j].shape)
                pieces = P.contiguous_pieces(int(off), math.prod(shape), ps, W)
                units.append(self._make_unit(names.get(id(p), f"group {i} param {j}"), shape, i, pieces))
            self._add_bucket(i, z.single_partition_of_fp32_groups[i], units)  # DeepSpeed keeps the group order

    def _bind_bf16(self, z: Any, names: dict[int, str]) -> None:
        W = self.comm.world_size
        for i, params in enumerate(z.bf16_groups):
            ps = z.bf16_groups_flat[i].numel() // W
            units, off = [], 0
            for j, p in enumerate(params):
                pieces = P.contiguous_pieces(off, p.numel(), ps, W)
                units.append(self._make_unit(names.get(id(p), f"group {i} param {j}"), tuple(p.shape), i, pieces))
                off += p.numel()
            self._add_bucket(i, z.fp32_groups_flat_partition[i], units)

    def _bind_zero3(self, z: Any, names: dict[int, str]) -> None:
        W, me = self.comm.world_size, self.comm.rank
        for s, params in enumerate(z.fp16_groups):
            flat = z.fp32_partitioned_groups_flat[s]
            gi = int(z.sub_group_to_group_id[s])
            units, base = [], 0
            for j, p in enumerate(params):
                pn, n = int(p.partition_numel()), int(p.ds_numel)
                ranges = [(min(q * pn, n), min((q + 1) * pn, n)) for q in range(W)]
                pieces = [Piece(q, lo, hi - lo, base + (lo - q * pn if q == me else 0)) for q, (lo, hi) in
                          enumerate(ranges) if hi > lo]
                u = self._make_unit(names.get(id(p), f"sub-group {s} param {j}"), tuple(p.ds_shape), gi, pieces)
                if u.low_rank:
                    o = self.opt.group_options(gi)
                    check_supported(u.name, o, u.side, u.shape, "ZeRO-3")
                    shape = P.SliceShape(u.shape, effective_rank(u.shape, o.rank), u.side,
                                         o.algorithm.value == "fira", tuple(ranges))
                    u.mat = SlicedMatrix(u.name, o, shape, -1, me)
                units.append(u)
                base += pn
            if flat.numel() != base:
                raise AssertionError(f"ZeRO-3 sub-group {s}: flat partition has {flat.numel()} elements, expected {base}")
            self._add_bucket(s, flat, units)

    def _add_bucket(self, index: int, flat: torch.Tensor, units: list[Unit]) -> None:
        self.buckets[id(flat)] = Bucket(index, flat, units)
        self.mode = "partitioned"
        if self.stage == 3:  # SVD owners: greedy LPT on m n min(m, n) over every matrix bound so far
            mats = [u for b in self.buckets.values() for u in b.units if u.mat is not None]
            for u, o in zip(mats, P.assign_owners([P.svd_cost(u.shape) for u in mats], self.comm.world_size)):
                u.owner = u.mat.owner = o
            return
        b = self.buckets[id(flat)]
        mats = [k for k, u in enumerate(units) if u.low_rank]
        zplan = P.zero12_plan([units[k].pieces for k in mats], self.opt.comm_bucket_bytes)
        for k, o in zip(mats, zplan.owners):
            units[k].owner = o
        for j in zplan.straddlers:
            units[mats[j]].straddles = True
        b.rounds = tuple(tuple(mats[j] for j in rnd) for rnd in zplan.rounds)
        b.zplan = zplan

    def _bind_replicated(self, wrapper: Any, names: dict[int, str]) -> None:
        """ZeRO-0: whole tensors on every rank; every tensor (matrix or not) gets one owner."""
        self.mode = "replicated"
        if wrapper is not self.opt:  # fp32 copies of the model's low-precision parameters
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    names[id(hp)] = names.get(id(lp), "")
        units, costs = [], []
        for gi, g in enumerate(self.opt.param_groups):
            for j, p in enumerate(g["params"]):
                u = self._make_unit(names.get(id(p)) or f"param {j} of group {gi} {tuple(p.shape)}", tuple(p.shape),
                                    gi, [])
                self.units[id(p)] = u
                units.append(u)
                o = self.opt.group_options(gi)
                costs.append(P.lowrank_state_numel(u.shape, o.rank, u.side) + 1 if u.low_rank else 2 * u.numel + 1)
        for u, o in zip(units, P.assign_owners(costs, self.comm.world_size)):
            u.owner = o
        if self._gather_hook is None:
            self._gather_hook = self.opt.register_state_dict_post_hook(self._gather_state_dict)

    # ------------------------------------------------------------------ layout interface
    def logical_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        u = self.units.get(id(p))
        return u.shape if u is not None else tuple(p.shape)

    def tasks(self) -> list[Task]:
        if self.mode is None:
            # DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 with bf16/fp16) runs one step() with all-zero gradients
            # while it wraps the optimizer, to create Adam's state. For Fira that step is not a training step (it
            # would decay the weights and shift the projector schedule): it is skipped.
            grads = [p.grad for g in self.opt.param_groups for p in g["params"]]
            if all(g is None or not bool(g.any()) for g in grads):
                return []
            raise RuntimeError("fira: this Fira's DeepSpeed layout is not bound to an engine; build it with "
                               "fira_dist.deepspeed.initialize(...) or call fira_dist.deepspeed.register() first")
        out = []
        for gi, g in enumerate(self.opt.param_groups):
            if not g["params"]:
                continue
            o = GroupOptions.from_group(g, where=f"param_groups[{gi}]")
            for p in g["params"]:
                if self.mode == "partitioned":
                    if id(p) not in self.buckets:
                        raise RuntimeError("fira: the optimizer holds a tensor that is not one of DeepSpeed's flat "
                                           "partitions read at bind time")
                    if p.grad is None:
                        raise RuntimeError("fira: a ZeRO flat partition has no gradient at step()")
                    out.append(Task(p, p.grad, o, f"flat partition {self.buckets[id(p)].index}", tuple(p.shape)))
                elif p.grad is not None:
                    u = self.units[id(p)]
                    out.append(Task(p, p.grad, o, u.name, u.shape))
        return out

    def step(self, tasks: list[Task]) -> None:
        if self.mode is None:
            return  # the zero-gradient initialization step of an unbound layout (see tasks())
        if self.mode == "replicated":
            self._step_replicated(tasks)
            self.engine_step += 1
            self.comm.end_step()
            return
        for t in tasks:
            b = self.buckets[id(t.param)]
            self._check_loaded(b, t.opts)
            if self.stage == 3:
                self._step_zero3(b, t)
            else:
                self._step_zero12(b, t)
            self._round.add(id(t.param))
        if len(self._round) == len(self.buckets):  # every group / sub-group stepped: one engine step done
            self._round.clear()
            self.engine_step += 1
            self.comm.end_step()
            for b in self.buckets.values():
                if META in self.opt.state.get(b.flat, {}):
                    self.opt.state[b.flat][META]["engine_step"] = self.engine_step

    def comm_stats(self) -> dict[str, Any]:
        return {**self.comm.stats(), "checkpoint_bytes": self.checkpoint_comm.total_bytes}

    # ------------------------------------------------------------------ partitioned step
    def _is_local(self, u: Unit) -> bool:
        """A ZeRO-1/2 matrix inside this rank's partition: updated here, in place."""
        return u.low_rank and self.stage != 3 and not u.straddles and u.owner == self.comm.rank

    def _flags(self, b: Bucket, grad: torch.Tensor, o: GroupOptions) -> tuple[list[bool], dict[int, torch.Tensor]]:
        """Per unit: does its gradient have NaN/Inf anywhere (on any rank)? One host sync and one all_reduce of
        int32s. Also returns, for local Fira matrices, the per-row/column ||G||^2 their step needs (computed as
        one process does, it doubles as their check)."""
        if not self.opt.skip_nonfinite:
            return [False] * len(b.units), {}
        me = self.comm.rank
        known: dict[int, torch.Tensor] = {}
        probe_idx, views = [], []
        for k, u in enumerate(b.units):
            pc = u.piece_of(me)
            if pc is None:
                continue
            view = grad[pc.offset:pc.offset + pc.length]
            if self._is_local(u) and uses_gradient_norms(o, u.side, u.shape):
                known[k] = gradient_norms_sq(view.view(u.shape), u.side, self.opt.state_dtype(o, grad.dtype))
            else:
                probe_idx.append(k)
                views.append(view)
        sums = dict(zip(probe_idx, torch._foreach_norm(views) if views else []))
        sums.update({k: g.sum() for k, g in known.items()})
        order = sorted(sums)
        flags = torch.zeros(len(b.units), dtype=torch.int32)
        if order:
            finite = torch.isfinite(torch.stack([sums[k].float().cpu() for k in order])).tolist()
            for k, ok in zip(order, finite):
                flags[k] = int(not ok)
        self.comm.all_reduce(flags)
        return [bool(f) for f in flags.tolist()], known

    def _note_nonfinite(self, name: str) -> None:
        self.skipped[name] = self.skipped.get(name, 0) + 1
        self.opt.warn_once(f"nf:{name}", f"gradient of {name} has NaN/Inf: its update is skipped (state untouched) "
                           f"at step {self.engine_step}; warning once")

    def _adam_pieces(self, b: Bucket, o: GroupOptions, grad: torch.Tensor, bad: list[bool], states: dict) -> None:
        me = self.comm.rank
        for k, u in enumerate(b.units):
            pc = u.piece_of(me)
            if u.low_rank or pc is None:
                continue
            if bad[k]:
                self._note_nonfinite(u.name)
                continue
            st = self._unit_state(states, u, o, b.flat.device, pc.length)
            st["step"] += 1
            sl = slice(pc.offset, pc.offset + pc.length)
            adam_update_(b.flat[sl], grad[sl], st["exp_avg"], st["exp_avg_sq"], o, int(st["step"]))

    def _step_zero12(self, b: Bucket, task: Task) -> None:
        flat, grad, o = b.flat, task.grad, task.opts
        states = self._bucket_state(b)
        bad, g_sqs = self._flags(b, grad, o)
        self._adam_pieces(b, o, grad, bad, states)
        for k, u in enumerate(b.units):  # matrices inside this rank's partition: in place, as one process
            if not self._is_local(u):
                continue
            if bad[k]:
                self._note_nonfinite(u.name)
                continue
            pc = u.piece_of(self.comm.rank)
            G, T = grad[pc.offset:pc.offset + pc.length].view(u.shape), flat[pc.offset:pc.offset + pc.length].view(u.shape)
            whole_matrix_step_(self.opt, Task(T, G, o, u.name, u.shape), self._unit_state(states, u, o, flat.device, 0),
                               G, T, g_sqs.get(k))
        for rnd in b.rounds:
            self._exchange_round(b, o, [k for k in rnd if not bad[k]], states)
        for k in (k for rnd in b.rounds for k in rnd if bad[k] and b.units[k].owner == self.comm.rank):
            self._note_nonfinite(b.units[k].name)

    def _exchange_round(self, b: Bucket, o: GroupOptions, ks: list[int], states: dict) -> None:
        """Straddlers of one round: holders' gradient and weight pieces to the owner (point to point, straight from
        the flat partitions), the owner's whole-matrix step, the updated pieces straight back."""
        me, flat, grad = self.comm.rank, b.flat, b.flat.grad
        sends, recvs, rebuilt = [], [], {}
        for k in ks:
            u = b.units[k]
            if u.owner == me:
                G = torch.empty(u.numel, dtype=flat.dtype, device=flat.device)
                T = torch.empty_like(G)
                for pc in u.pieces:
                    if pc.rank == me:
                        G[pc.start:pc.start + pc.length].copy_(grad[pc.offset:pc.offset + pc.length])
                        T[pc.start:pc.start + pc.length].copy_(flat[pc.offset:pc.offset + pc.length])
                    else:
                        recvs += [(G[pc.start:pc.start + pc.length], pc.rank), (T[pc.start:pc.start + pc.length], pc.rank)]
                rebuilt[k] = (G, T)
            elif (pc := u.piece_of(me)) is not None:
                sends += [(grad[pc.offset:pc.offset + pc.length], u.owner), (flat[pc.offset:pc.offset + pc.length], u.owner)]
        self.comm.exchange(sends, recvs)
        sends, recvs = [], []
        for k in ks:
            u = b.units[k]
            if u.owner == me:
                G, T = rebuilt.pop(k)
                g2, t2 = G.view(u.shape), T.view(u.shape)
                whole_matrix_step_(self.opt, Task(t2, g2, o, u.name, u.shape), self._unit_state(states, u, o, flat.device, 0),
                                   g2, t2)
                for pc in u.pieces:
                    if pc.rank == me:
                        flat[pc.offset:pc.offset + pc.length].copy_(T[pc.start:pc.start + pc.length])
                    else:
                        sends.append((T[pc.start:pc.start + pc.length], pc.rank))
            elif (pc := u.piece_of(me)) is not None:
                recvs.append((flat[pc.offset:pc.offset + pc.length], u.owner))
        self.comm.exchange(sends, recvs)

    def _step_zero3(self, b: Bucket, task: Task) -> None:
        grad, o = task.grad, task.opts
        me = self.comm.rank
        states = self._bucket_state(b)
        bad, _ = self._flags(b, grad, o)
        self._adam_pieces(b, o, grad, bad, states)
        live = []
        for k, u in enumerate(b.units):
            if not u.low_rank:
                continue
            if bad[k]:
                self._note_nonfinite(u.name)
                continue
            live.append(u)
        works = {u.name: self._work(b, u, o, states, grad) for u in live}
        due = [works[u.name] for u in live if works[u.name].t % o.update_proj_gap == 0]
        exact = [w for w in due if not uses_sketch(w.mat)]
        sketched = [w for w in due if uses_sketch(w.mat)]
        go = dict(zip([w.mat.name for w in exact + sketched],
                      refresh_exact(self.opt, self.comm, exact, self.opt.comm_bucket_bytes)
                      + refresh_randomized(self.opt, self.comm, sketched)))
        self.svd_count += sum(w.mat.owner == me for w in exact)
        self.sketch_count += len(sketched)
        step = []
        for u in live:
            if not go.get(u.name, True):
                continue
            w = works[u.name]
            st = states[u.name]
            st["step"] += 1
            w.t = int(st["step"])
            step.append(w)
        for chunk in P.sliced_chunks([w.mat.plan for w in step], self.opt.comm_bucket_bytes):
            step_chunk(self.comm, [step[j] for j in chunk])

    def _work(self, b: Bucket, u: Unit, o: GroupOptions, states: dict, grad: torch.Tensor) -> Work:
        st = self._unit_state(states, u, o, b.flat.device, 0)
        u.mat.opts = o
        pc = u.piece_of(self.comm.rank)
        sl = slice(pc.offset, pc.offset + pc.length) if pc is not None else slice(0, 0)
        lrs = LowRankState(st["projector"], st["exp_avg"], st["exp_avg_sq"], st["limiter_norm"])
        return Work(u.mat, lrs, grad[sl], b.flat[sl], int(st["step"]))

    # ------------------------------------------------------------------ replicated step (ZeRO-0)
    def _step_replicated(self, tasks: list[Task]) -> None:
        me, W = self.comm.rank, self.comm.world_size
        if self._just_loaded:  # the checkpoint holds every rank's state: keep only what this rank owns
            self._just_loaded = False
            steps = [int(st["step"]) for st in self.opt.state.values() if "step" in st]
            # a momentum reset zeroes the step counters: the engine-step count Fira.load_state_dict restored wins
            self.engine_step = max([self.engine_step, *steps])
            for p in [p for p in self.opt.state if id(p) in self.units and self.units[id(p)].owner != me]:
                del self.opt.state[p]
        mine = [t for t in tasks if self.units[id(t.param)].owner == me]
        step_tasks_(self.opt, mine, lambda t: self._note_nonfinite(t.name))
        if W == 1 or not tasks:
            return
        by_rank: list[list[torch.Tensor]] = [[] for _ in range(W)]
        for t in tasks:
            by_rank[self.units[id(t.param)].owner].append(t.param.detach().view(-1))
        share_owned_values(self.comm, by_rank, self.opt.comm_bucket_bytes, tasks[0].param.dtype, tasks[0].param.device)

    # ------------------------------------------------------------------ formulas and measurements
    def expected_comm_bytes(self) -> int:
        """Bytes per engine step by the module docstring's formula, from the plan and the state's step counters
        (assumes finite gradients and successful SVDs; every parameter has a gradient)."""
        W, me = self.comm.world_size, self.comm.rank
        if W == 1:
            return 0
        budget = self.opt.comm_bucket_bytes
        if self.mode == "replicated":
            lengths = [0] * W
            for u in self.units.values():
                lengths[u.owner] += u.numel
            return P.gather_rounds(lengths, 4, budget).comm_bytes
        total = 0
        for b in self.buckets.values():
            total += 4 * len(b.units) if self.opt.skip_nonfinite else 0
            mats = [u for u in b.units if u.low_rank]
            if self.stage != 3:
                total += P.zero12_comm_bytes(b.zplan, [u.pieces for u in mats], me)
                continue
            states = self.opt.state.get(b.flat, {}).get(UNITS, {})
            steps = {u.name: int(states[u.name]["step"]) if u.name in states else 0 for u in mats}
            due = [u for u in mats if steps[u.name] % u.mat.opts.update_proj_gap == 0]
            exact = [u.mat for u in due if not uses_sketch(u.mat)]
            rounds = P.exact_refresh_rounds([m.plan for m in exact], [m.owner for m in exact], budget)
            total += P.exact_refresh_comm_bytes([m.plan for m in exact], [m.owner for m in exact], rounds, me)
            total += P.sketch_comm_bytes([u.mat.plan for u in due if uses_sketch(u.mat)], OVERSAMPLE, POWER_ITERS)
            shapes = [u.mat.plan for u in mats]
            total += sum(P.sliced_chunk_comm_bytes([shapes[j] for j in c]) for c in P.sliced_chunks(shapes, budget))
        return total

    def owners(self) -> dict[str, int]:
        """Per matrix: the rank that updates it (ZeRO-0: every tensor; ZeRO-1/2: its owner) or, under ZeRO-3 (state
        sliced over all ranks), the rank that computes its exact SVDs."""
        if self.mode == "replicated":
            return {u.name: u.owner for u in self.units.values()}
        return {u.name: u.owner for b in self.buckets.values() for u in b.units if u.low_rank}

    def straddlers(self) -> list[str]:
        """ZeRO-1/2: the matrices held by more than one rank (the only ones that move)."""
        return [u.name for b in self.buckets.values() for u in b.units if u.straddles]
