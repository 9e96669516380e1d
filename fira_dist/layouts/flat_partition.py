"""DeepSpeed layouts: ZeRO-1/2/3 flat partitions, and ZeRO-0 (replicated gradients), owner-computes.

Under ZeRO-1/2 (and DeepSpeed's BF16_Optimizer: bf16 + ZeRO-1 + fp32 gradient accumulation) the client
optimizer sees ONE flat fp32 tensor per param group, holding this rank's contiguous slice of the group's
parameters laid end to end; under ZeRO-3 one flat tensor per sub-group, holding this rank's slice of EACH
parameter in it. Partition boundaries fall in the
middle of rows, so Fira's per-matrix math cannot run on what a rank holds. This layout:

1. reads the partition tables of DeepSpeed's optimizer wrapper (offsets, partition sizes), so every rank
   knows, for every parameter, which element ranges every rank holds (no communication);
2. gives each low-rank matrix one owner (greedy LPT on optimizer-state size, with the ranks' elementwise
   Adam state as the starting loads, so max state per rank <= total / W + the largest matrix's state);
3. per step() call (DeepSpeed makes one per group or sub-group): ONE all_to_all sends each matrix's
   gradient and fp32 master-weight pieces to its owner, the owner rebuilds the whole (m, n) gradient and
   weight and runs ``single.whole_matrix_step_`` (the same code, on the same numbers, as one process), and
   ONE all_to_all sends the updated weight pieces back into each holder's flat partition;
4. gives non-matrix parameters (and parameters of groups without ``rank``) elementwise Adam on the piece
   each rank holds (bitwise what one process computes on the whole tensor).

Bytes per step() call (fp32): a rank sends 8 bytes (gradient + weight) per element it holds of matrices that
other ranks own, and 4 bytes (updated weight) per element of its own matrices that other ranks hold; with
matrices spread evenly that is about 12 x (W-1)/W x (the group's matrix elements / W) per rank, plus one
all_reduce of one int32 per parameter (the non-finite check, so that every rank skips the same parameters).

Under ZeRO-0 (the engine all-reduces whole gradients; with bf16 DeepSpeed hands over fp32 copies of each
parameter) the same owner map covers every parameter, Adam ones included: each owner updates its tensors
and one all_gather of the owners' updated values brings every rank up to date.

State. Partitioned: ``opt.state[flat] = {"fira_units": {param name: state}, "fira_layout": {...}}`` where a
matrix's state (projector, exp_avg, exp_avg_sq, limiter_norm, step) is on its owner only and an Adam
parameter's state covers the piece this rank holds. DeepSpeed saves each rank's ``optimizer.state_dict()``
in its own ``zero_pp_rank_*`` file, so checkpoints carry it as is. Replicated: ``opt.state[param]`` as
the single-process layout, on the owner only; ``state_dict()`` gathers every rank's part (a collective:
DeepSpeed calls it on every rank) because DeepSpeed writes ZeRO-0 optimizer state from rank 0 alone, and
after ``load_state_dict`` each rank drops what it does not own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from fira_dist.algorithm import adam_update_
from fira_dist.comm import Comm
from fira_dist.config import GroupOptions
from fira_dist.layouts.owners import assign_owners, lowrank_state_numel
from fira_dist.layouts.single import SingleProcess, step_tasks_, whole_matrix_step_
from fira_dist.optimizer import Task
from fira_dist.projector import lowrank_shape, projector_shape, side_for

UNITS = "fira_units"
META = "fira_layout"


@dataclasses.dataclass(frozen=True)
class Piece:
    """Elements [start, start + length) of a parameter's flattened tensor, at ``offset`` in ``rank``'s flat."""

    rank: int
    start: int
    length: int
    offset: int


@dataclasses.dataclass
class Unit:
    """One model parameter as the layout sees it."""

    name: str
    shape: tuple[int, ...]
    group: int  # index into the optimizer's param_groups
    pieces: list[Piece]  # partitioned: disjoint, covering [0, numel); replicated: empty
    low_rank: bool = False
    side: str = ""
    owner: int = -1  # matrices (and, replicated, every unit); -1: elementwise on pieces

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
    # Static exchange plan for the matrices (filled by _plan): see FlatPartition._exchange.
    send: list[list[tuple[int, Piece]]] = dataclasses.field(default_factory=list)  # to owner d: my pieces
    recv: list[list[tuple[int, Piece]]] = dataclasses.field(default_factory=list)  # from holder s: its pieces
    any_remote: bool = False


def _pieces_contiguous(start_of_rank, numel: int, world: int, offset_of_rank) -> list[Piece]:
    out = []
    for q in range(world):
        lo, hi = start_of_rank(q)
        lo, hi = max(lo, 0), min(hi, numel)
        if hi > lo:
            out.append(Piece(q, lo, hi - lo, offset_of_rank(q, lo)))
    return out


class FlatPartition:
    """The DeepSpeed layout. Built unbound (``Fira(..., layout=FlatPartition)``); ``bind(engine)`` reads
    DeepSpeed's partition tables once the engine has wrapped the optimizer (``fira_dist.deepspeed`` does it)."""

    def __init__(self, opt: Any, process_group: Any = None):
        self.opt = opt
        self.mode: str | None = None  # "partitioned" | "replicated"
        self.stage: int | None = None
        self.comm = Comm(None) if not dist.is_initialized() else Comm(process_group)
        self.engine_step = 0
        self.buckets: dict[int, Bucket] = {}  # id(flat) -> bucket
        self.units: dict[int, Unit] = {}  # replicated: id(param) -> unit
        self.names: dict[int, str] = {}
        self._round: set[int] = set()
        self._checked: set[int] = set()
        self.skipped: dict[str, int] = {}
        self._gather_hook = None
        self._just_loaded = False

    # ------------------------------------------------------------------ binding
    def bind(self, engine: Any) -> "FlatPartition":
        """Read the partition tables of ``engine.optimizer`` (the wrapper DeepSpeed put around ``self.opt``)."""
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        wrapper = engine.optimizer
        names = {id(p): n for p, n in engine.param_names.items()}
        self.stage = int(engine.zero_optimization_stage())
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
        return self

    def _group_of(self, flat: torch.Tensor, param_groups: list[dict[str, Any]]) -> int:
        for gi, g in enumerate(param_groups):
            if any(p is flat for p in g["params"]):
                return gi
        raise AssertionError("flat partition not found in the optimizer's param groups")

    def _make_unit(self, name: str, shape: tuple[int, ...], gi: int, pieces: list[Piece]) -> Unit:
        o = self.opt.group_options(gi)
        low = o.low_rank and len(shape) == 2
        if o.low_rank and len(shape) != 2:
            self.opt.warn_once(f"nd:{name}", f"{name} has shape {shape} in a group with 'rank': only 2-D weights "
                               "are projected; it gets plain Adam")
        side = side_for(shape, o.proj_type.value) if low else ""
        return Unit(name, tuple(int(s) for s in shape), gi, pieces, low, side)

    def _bind_zero12(self, z: Any, names: dict[int, str]) -> None:
        W, r = self.comm.world_size, self.comm.rank
        for i, params in enumerate(z.round_robin_bit16_groups):
            flat = z.single_partition_of_fp32_groups[i]
            ps = int(z.partition_size[i])
            gi = i  # DeepSpeed keeps the optimizer's group order
            units = []
            for j, (p, off) in enumerate(zip(params, z.round_robin_bit16_offsets[i])):
                shape = tuple(z.round_robin_bit16_meta[i][j].shape)
                n = math.prod(shape)
                pieces = _pieces_contiguous(lambda q: (q * ps - off, (q + 1) * ps - off), n, W,
                                            lambda q, lo: off + lo - q * ps)
                units.append(self._make_unit(names.get(id(p), f"group {i} param {j}"), shape, gi, pieces))
            self._add_bucket(i, flat, units)
        self._finish_partitioned()

    def _bind_bf16(self, z: Any, names: dict[int, str]) -> None:
        W = self.comm.world_size
        for i, params in enumerate(z.bf16_groups):
            flat = z.fp32_groups_flat_partition[i]
            ps = z.bf16_groups_flat[i].numel() // W
            units, off = [], 0
            for j, p in enumerate(params):
                shape, n = tuple(p.shape), p.numel()
                pieces = _pieces_contiguous(lambda q, off=off: (q * ps - off, (q + 1) * ps - off), n, W,
                                            lambda q, lo, off=off: off + lo - q * ps)
                units.append(self._make_unit(names.get(id(p), f"group {i} param {j}"), shape, i, pieces))
                off += n
            self._add_bucket(i, flat, units)
        self._finish_partitioned()

    def _bind_zero3(self, z: Any, names: dict[int, str]) -> None:
        W = self.comm.world_size
        for s, params in enumerate(z.fp16_groups):
            flat = z.fp32_partitioned_groups_flat[s]
            gi = int(z.sub_group_to_group_id[s])
            units, base = [], 0
            for j, p in enumerate(params):
                pn = int(p.partition_numel())
                shape = tuple(p.ds_shape)
                n = int(p.ds_numel)
                pieces = _pieces_contiguous(lambda q, pn=pn: (q * pn, (q + 1) * pn), n, W,
                                            lambda q, lo, pn=pn, base=base: base + lo - q * pn)
                units.append(self._make_unit(names.get(id(p), f"sub-group {s} param {j}"), shape, gi, pieces))
                base += pn
            if flat.numel() != base:
                raise AssertionError(f"ZeRO-3 sub-group {s}: flat partition has {flat.numel()} elements, expected {base}")
            self._add_bucket(s, flat, units)
        self._finish_partitioned()

    def _add_bucket(self, index: int, flat: torch.Tensor, units: list[Unit]) -> None:
        self.buckets[id(flat)] = Bucket(index, flat, units)

    def _finish_partitioned(self) -> None:
        """Owner map (LPT on state elements, Adam pieces as initial loads) and the static exchange plans."""
        self.mode = "partitioned"
        W, me = self.comm.world_size, self.comm.rank
        loads = [0.0] * W
        matrices: list[Unit] = []
        for b in self.buckets.values():
            for u in b.units:
                if u.low_rank:
                    matrices.append(u)
                else:
                    for pc in u.pieces:
                        loads[pc.rank] += 2 * pc.length + 1
        costs = [self._matrix_cost(u) for u in matrices]
        for u, o in zip(matrices, assign_owners(costs, W, initial_loads=loads)):
            u.owner = o
        for b in self.buckets.values():
            b.send = [[] for _ in range(W)]
            b.recv = [[] for _ in range(W)]
            for k, u in enumerate(b.units):
                if not u.low_rank:
                    continue
                for pc in u.pieces:
                    if pc.rank == u.owner or pc.length == 0:
                        continue
                    b.any_remote = True
                    if pc.rank == me:
                        b.send[u.owner].append((k, pc))
                    if u.owner == me:
                        b.recv[pc.rank].append((k, pc))

    def _matrix_cost(self, u: Unit) -> int:
        o = self.opt.group_options(u.group)
        return lowrank_state_numel(u.shape, o.rank, u.side) + 1  # + step

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
                costs.append(self._matrix_cost(u) if u.low_rank else 2 * u.numel + 1)
        for u, o in zip(units, assign_owners(costs, self.comm.world_size)):
            u.owner = o
        if self._gather_hook is None:
            self._gather_hook = self.opt.register_state_dict_post_hook(self._gather_state_dict)

    # ------------------------------------------------------------------ layout interface
    def logical_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        u = self.units.get(id(p))
        return u.shape if u is not None else tuple(p.shape)

    def expected_state_shapes(self) -> dict[torch.Tensor, dict[str, tuple[int, ...]]]:
        if self.mode == "replicated":
            return SingleProcess(self.opt).expected_state_shapes()
        return {}  # partitioned: nested per-unit state, checked at the first step after loading (_check_loaded)

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
            self._step_bucket(b, t)
            self._round.add(id(t.param))
        if len(self._round) == len(self.buckets):  # every group / sub-group stepped: one engine step done
            self._round.clear()
            self.engine_step += 1
            self.comm.end_step()
            for b in self.buckets.values():
                if META in self.opt.state.get(b.flat, {}):
                    self.opt.state[b.flat][META]["engine_step"] = self.engine_step

    def comm_stats(self) -> dict[str, Any]:
        return self.comm.stats()

    # ------------------------------------------------------------------ partitioned step
    def _bucket_state(self, b: Bucket) -> dict[str, dict[str, Any]]:
        st = self.opt.state[b.flat]
        if UNITS not in st:
            st[UNITS] = {}
            st[META] = self._meta()
        return st[UNITS]

    def _meta(self) -> dict[str, Any]:
        return {"world_size": self.comm.world_size, "rank": self.comm.rank, "zero_stage": self.stage}

    def _unit_state(self, states: dict, u: Unit, o: GroupOptions, dev: torch.device, numel: int) -> dict[str, Any]:
        st = states.get(u.name)
        if st is None:
            dt = self.opt.state_dtype(o, torch.float32)
            st = {"step": torch.tensor(0.0)}
            if u.low_rank:
                st["projector"] = torch.zeros(projector_shape(u.shape, o.rank, u.side), dtype=dt, device=dev)
                st["exp_avg"] = torch.zeros(lowrank_shape(u.shape, o.rank, u.side), dtype=dt, device=dev)
                st["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=dev)
            else:
                st["exp_avg"] = torch.zeros(numel, dtype=dt, device=dev)
            st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            states[u.name] = st
        return st

    def _nonfinite(self, b: Bucket, grad: torch.Tensor) -> list[bool]:
        """Per unit: does its gradient have NaN/Inf anywhere (on any rank)? One all_reduce of ints."""
        if not self.opt.skip_nonfinite:
            return [False] * len(b.units)
        bad = ~torch.isfinite(grad)
        me = self.comm.rank
        flags = torch.zeros(len(b.units), dtype=torch.int32)
        for k, u in enumerate(b.units):
            pc = u.piece_of(me)
            if pc is not None and bool(bad[pc.offset:pc.offset + pc.length].any()):
                flags[k] = 1
        self.comm.all_reduce(flags)
        return [bool(f) for f in flags.tolist()]

    def _note_nonfinite(self, name: str) -> None:
        self.skipped[name] = self.skipped.get(name, 0) + 1
        self.opt.warn_once(f"nf:{name}", f"gradient of {name} has NaN/Inf: its update is skipped (state untouched) "
                           f"at step {self.engine_step}; warning once")

    def _step_bucket(self, b: Bucket, task: Task) -> None:
        flat, grad, o = b.flat, task.grad, task.opts
        me = self.comm.rank
        states = self._bucket_state(b)
        bad = self._nonfinite(b, grad)
        # 1. elementwise Adam on the pieces this rank holds
        for k, u in enumerate(b.units):
            if u.low_rank:
                continue
            pc = u.piece_of(me)
            if pc is None:
                continue
            if bad[k]:
                self._note_nonfinite(u.name)
                continue
            st = self._unit_state(states, u, o, flat.device, pc.length)
            st["step"] += 1
            sl = slice(pc.offset, pc.offset + pc.length)
            adam_update_(flat[sl], grad[sl], st["exp_avg"], st["exp_avg_sq"], o, int(st["step"]))
        # 2. matrices: pieces to owners, whole-matrix step there, updated pieces back
        self._exchange(b, o, flat, grad, bad, states)

    def _exchange(self, b: Bucket, o: GroupOptions, flat: torch.Tensor, grad: torch.Tensor, bad: list[bool],
                  states: dict) -> None:
        W, me = self.comm.world_size, self.comm.rank
        dev, dt = flat.device, flat.dtype
        owned = [k for k, u in enumerate(b.units) if u.low_rank and u.owner == me]
        if not b.any_remote and not owned:
            return
        # Gradient and weight pieces to the owners: [g, w] per piece, destinations in rank order.
        G: dict[int, torch.Tensor] = {}
        P: dict[int, torch.Tensor] = {}
        for k in owned:
            u = b.units[k]
            G[k] = torch.empty(u.numel, dtype=dt, device=dev)
            P[k] = torch.empty(u.numel, dtype=dt, device=dev)
            pc = u.piece_of(me)
            if pc is not None:
                G[k][pc.start:pc.start + pc.length] = grad[pc.offset:pc.offset + pc.length]
                P[k][pc.start:pc.start + pc.length] = flat[pc.offset:pc.offset + pc.length]
        if b.any_remote:
            in_splits = [2 * sum(pc.length for _, pc in b.send[d]) for d in range(W)]
            out_splits = [2 * sum(pc.length for _, pc in b.recv[s]) for s in range(W)]
            parts = []
            for d in range(W):
                for _, pc in b.send[d]:
                    parts += [grad[pc.offset:pc.offset + pc.length], flat[pc.offset:pc.offset + pc.length]]
            send = torch.cat(parts) if parts else torch.empty(0, dtype=dt, device=dev)
            recv = torch.empty(sum(out_splits), dtype=dt, device=dev)
            self.comm.all_to_all_single(recv, send, out_splits, in_splits)
            pos = 0
            for s in range(W):
                for k, pc in b.recv[s]:
                    G[k][pc.start:pc.start + pc.length] = recv[pos:pos + pc.length]
                    P[k][pc.start:pc.start + pc.length] = recv[pos + pc.length:pos + 2 * pc.length]
                    pos += 2 * pc.length
        # The whole-matrix step on the owner: the same function, on the same numbers, as one process.
        for k in owned:
            u = b.units[k]
            if bad[k]:
                self._note_nonfinite(u.name)
                continue
            st = self._unit_state(states, u, o, dev, 0)
            g2, p2 = G[k].view(u.shape), P[k].view(u.shape)
            whole_matrix_step_(self.opt, Task(p2, g2, o, u.name, u.shape), st, g2, p2)
            pc = u.piece_of(me)
            if pc is not None:
                flat[pc.offset:pc.offset + pc.length] = P[k][pc.start:pc.start + pc.length]
        if b.any_remote:
            # Updated weight pieces back to their holders (the reverse plan).
            parts = [P[k][pc.start:pc.start + pc.length] for s in range(W) for k, pc in b.recv[s]]
            send = torch.cat(parts) if parts else torch.empty(0, dtype=dt, device=dev)
            in_splits = [sum(pc.length for _, pc in b.recv[s]) for s in range(W)]
            out_splits = [sum(pc.length for _, pc in b.send[d]) for d in range(W)]
            recv = torch.empty(sum(out_splits), dtype=dt, device=dev)
            self.comm.all_to_all_single(recv, send, out_splits, in_splits)
            pos = 0
            for d in range(W):
                for _, pc in b.send[d]:
                    flat[pc.offset:pc.offset + pc.length] = recv[pos:pos + pc.length]
                    pos += pc.length

    def _check_loaded(self, b: Bucket, o: GroupOptions) -> None:
        """Once per bucket: state that came from a checkpoint must fit this owner map and these partitions."""
        if id(b.flat) in self._checked:
            return
        self._checked.add(id(b.flat))
        st = self.opt.state.get(b.flat)
        if not st:
            return
        extra = set(st) - {UNITS, META}
        if extra or UNITS not in st:
            raise ValueError(f"fira: optimizer state of ZeRO flat partition {b.index} has keys {sorted(st)}; expected "
                             f"{UNITS!r} and {META!r} (a checkpoint of another optimizer?)")
        meta = dict(st.get(META, {}))
        saved_step = meta.pop("engine_step", None)
        if meta != self._meta():
            raise ValueError(f"fira: the checkpoint's optimizer state was written with {meta}, this run is "
                             f"{self._meta()}; Fira state under ZeRO can only be loaded at the same data-parallel world "
                             "size and ZeRO stage (load with load_optimizer_states=False to keep the weights only)")
        if saved_step is not None and not self._round:
            self.engine_step = int(saved_step)  # resume the engine-step count with the state
        me = self.comm.rank
        want = {}
        for u in b.units:
            if u.low_rank and u.owner == me:
                want[u.name] = {"projector": projector_shape(u.shape, o.rank, u.side),
                                "exp_avg": lowrank_shape(u.shape, o.rank, u.side)}
            elif not u.low_rank and u.piece_of(me) is not None:
                want[u.name] = {"exp_avg": (u.piece_of(me).length,)}
        for name, ust in st[UNITS].items():
            if name not in want:
                raise ValueError(f"fira: the checkpoint holds optimizer state for {name} on rank {me}, which this run "
                                 "does not assign to it (different model, rank or param groups?)")
            for key, shape in want[name].items():
                if key in ust and tuple(ust[key].shape) != tuple(shape):
                    raise ValueError(f"fira: optimizer state {key!r} of {name} has shape {tuple(ust[key].shape)}, "
                                     f"expected {tuple(shape)} (different rank, proj_type or model?)")
            for key, val in list(ust.items()):
                if isinstance(val, torch.Tensor) and key != "step" and val.device != b.flat.device:
                    ust[key] = val.to(b.flat.device)

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
        if W == 1:
            return
        # Every owner's updated tensors to every rank: one all_gather of flat buffers padded to the longest.
        by_rank: list[list[Task]] = [[] for _ in range(W)]
        for t in tasks:
            by_rank[self.units[id(t.param)].owner].append(t)
        sizes = [sum(t.param.numel() for t in ts) for ts in by_rank]
        longest = max(sizes)
        if longest == 0:
            return
        dt, dev = tasks[0].param.dtype, tasks[0].param.device
        buf = torch.zeros(longest, dtype=dt, device=dev)
        if mine:
            torch.cat([t.param.detach().reshape(-1) for t in mine], out=buf[:sizes[me]])
        out = torch.empty(W * longest, dtype=dt, device=dev)
        self.comm.all_gather_into_tensor(out, buf)
        for q in range(W):
            if q == me:
                continue
            pos = q * longest
            for t in by_rank[q]:
                n = t.param.numel()
                t.param.detach().view(-1).copy_(out[pos:pos + n])
                pos += n

    def _gather_state_dict(self, opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """state_dict() post-hook (replicated): every rank's owned state in one dict. A collective."""
        if self.mode != "replicated" or self.comm.world_size == 1 or not dist.is_initialized():
            return state_dict
        parts: list[Any] = [None] * self.comm.world_size
        local = {k: {kk: (vv.cpu() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()}
                 for k, v in state_dict["state"].items()}
        dist.all_gather_object(parts, local, group=self.comm.group)
        merged: dict[Any, Any] = {}
        for part in parts:
            merged.update(part)
        state_dict["state"] = dict(sorted(merged.items()))
        return state_dict

    def after_load_state_dict(self) -> None:
        """Called by Fira.load_state_dict: loaded state is checked (and, replicated, pruned) at the next step."""
        self._just_loaded = True
        self._checked.clear()

    # ------------------------------------------------------------------ measurements
    def state_bytes(self) -> int:
        """Bytes of Fira state tensors held by this rank (all buckets / parameters)."""
        def size(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, dict):
                return sum(size(v) for v in x.values())
            return 0
        return sum(size(v) for v in self.opt.state.values())

    def unit_state_bytes(self) -> dict[str, int]:
        """Per parameter name: bytes of the state this rank holds for it."""
        out: dict[str, int] = {}
        for key, v in self.opt.state.items():
            if self.mode == "partitioned":
                for name, ust in v.get(UNITS, {}).items():
                    out[name] = out.get(name, 0) + sum(t.numel() * t.element_size() for t in ust.values()
                                                       if isinstance(t, torch.Tensor))
            else:
                u = self.units.get(id(key))
                if u is not None:
                    out[u.name] = sum(t.numel() * t.element_size() for t in v.values() if isinstance(t, torch.Tensor))
        return out

    def projectors(self) -> dict[str, torch.Tensor]:
        """Per matrix this rank owns: its current projector (a copy, on CPU)."""
        out = {}
        for key, v in self.opt.state.items():
            if self.mode == "partitioned":
                for name, ust in v.get(UNITS, {}).items():
                    if "projector" in ust:
                        out[name] = ust["projector"].detach().cpu().clone()
            elif "projector" in v and id(key) in self.units:
                out[self.units[id(key)].name] = v["projector"].detach().cpu().clone()
        return out

    def owners(self) -> dict[str, int]:
        """Owner rank per matrix (partitioned) or per tensor (replicated)."""
        if self.mode == "replicated":
            return {u.name: u.owner for u in self.units.values()}
        return {u.name: u.owner for b in self.buckets.values() for u in b.units if u.low_rank}
