"""Replicated gradients (DDP, DeepSpeed ZeRO-0): owner-computes.

Every rank holds every parameter and the same, already averaged, gradient G. A deterministic owner map
(``owners.assign_owners``: greedy LPT on optimizer-state bytes, computed from shapes alone, identical on
every rank) gives each parameter one owner. Only the owner holds the parameter's optimizer state
(projector, moments, limiter norm; Adam moments for non-matrix parameters), computes its SVD at refresh
steps, and computes its update, with exactly the code of the single-process layout
(``single.whole_matrix_step_`` / ``single.adam_step_``) on exactly the same G, so every parameter ends
bitwise equal to a one-process run on the same gradient. The updated values then reach every rank in
ONE ``all_gather_into_tensor`` per step (one per parameter dtype), each rank contributing the values of
the parameters it owns.

Communication per step and per rank (``Comm`` counts all_gather output bytes)::

    bytes_per_step = sum over parameter dtypes d of  W * max_r L_r(d) * itemsize(d)
    L_r(d)         = sum of numel(p) over parameters p of dtype d with requires_grad, owned by rank r

(The gather is padded to the largest rank's share.) Every parameter with ``requires_grad`` is in the
gather whether or not it has a gradient this step: a parameter without one is sent unchanged, so ranks
never need to agree on which gradients exist. Nothing else is communicated during a step.

State layout and checkpoints. In memory, ``optimizer.state[p]`` has the same keys on every rank; on the
owner they are the working tensors, elsewhere 0-element placeholders (with the right dtype). Every rank
having state for every parameter also keeps ``torch.distributed.checkpoint.state_dict`` from running its
zero-lr initialisation step on some ranks only. ``optimizer.state_dict()`` is therefore COLLECTIVE under
this layout (call it on every rank, as with FSDP): it returns tensors of ndim >= 1 as DTensors sharded
``Shard(0)`` over a 1-D mesh of the process group (each owner's state is scattered by one broadcast per
rank), and 0-d tensors (step, limiter norm) as plain tensors equal on every rank. That is what
``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` + ``dcp.save`` need, and a
checkpoint saved at one world size loads at another: ``load_state_dict`` (collective too) reassembles
each tensor on its owner under the new owner map. ``load_state_dict`` also accepts plain full tensors,
e.g. a single-process state dict; no collective is issued for those. Checkpoint traffic is counted on a
separate ``Comm`` (``checkpoint_comm``) so that per-step figures stay exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fira_dist.comm import Comm
from fira_dist.config import GroupOptions
from fira_dist.layouts.owners import assign_owners, lowrank_state_numel
from fira_dist.layouts.single import SingleProcess, adam_step_, whole_matrix_step_
from fira_dist.projector import lowrank_shape, projector_shape, side_for

LOW_RANK_KEYS = ("step", "projector", "exp_avg", "exp_avg_sq", "limiter_norm")
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
STATE_BYTES_KEYS = ("projector", "exp_avg", "exp_avg_sq", "limiter_norm")  # what state_bytes() counts


@dataclasses.dataclass
class Entry:
    """One parameter in the owner map."""

    param: torch.Tensor
    name: str
    opts: GroupOptions
    shape: tuple[int, ...]
    low_rank: bool
    side: str | None
    owner: int
    shapes: dict[str, tuple[int, ...]]  # full shape of each state tensor
    dtype: torch.dtype  # the state dtype (moments, projector) a fresh state gets


def row_range(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """torch.chunk / DTensor ``Shard`` semantics: rank r holds rows [r c, min((r + 1) c, rows)), c = ceil(rows / W)."""
    c = -(-rows // world_size) if rows else 0
    start = min(rank * c, rows)
    return start, min(start + c, rows)


def process_group_of(process_group: Any) -> Any:
    """A ProcessGroup (or None for the world) from a ProcessGroup or a 1-D DeviceMesh."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        return process_group
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(f"process_group is a {process_group.ndim}-D DeviceMesh; expected a 1-D mesh or a ProcessGroup")
        return process_group.get_group()
    return process_group


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class Replicated(SingleProcess):
    """Owner-computes over replicated gradients; see the module docstring for state, comm and checkpoints."""

    def __init__(self, opt: Any, process_group: Any = None):
        super().__init__(opt)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("layout='replicated' needs an initialized torch.distributed process group "
                             "(torch.distributed.init_process_group)")
        self.group = process_group_of(process_group)
        self.comm = Comm(self.group)
        self.checkpoint_comm = Comm(self.group)  # state_dict / load_state_dict traffic, kept out of step figures
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.svd_count = 0  # SVDs computed on this rank
        self.svd_flops = 0  # and their cost, m n min(m, n) each
        self.entries: list[Entry] = []
        self._signature: tuple = ()
        self._mesh = None
        self._ensure_plan()
        opt.register_state_dict_post_hook(lambda o, sd: self._state_dict_post_hook(sd))

    # ------------------------------------------------------------------ owner map
    def _params(self) -> list[tuple[int, int, torch.Tensor]]:
        return [(gi, i, p) for gi, g in enumerate(self.opt.param_groups) for i, p in enumerate(g["params"])]

    def _ensure_plan(self) -> None:
        """(Re)build the owner map when the parameters or their options changed; move any state along."""
        sig = tuple((id(p), p.requires_grad, tuple(p.shape), p.dtype, self.opt.param_groups[gi].get("rank"),
                     self.opt.param_groups[gi].get("proj_type")) for gi, _, p in self._params())
        if sig == self._signature:
            return
        moving = self._export_state() if self.entries and any(len(self.opt.state[e.param]) for e in self.entries) else None
        entries, costs = [], []
        for gi, i, p in self._params():
            if not p.requires_grad:
                continue
            o = self.opt.group_options(gi)
            shape = tuple(p.shape)
            low = o.low_rank and len(shape) == 2
            dtype = self.opt.state_dtype(o, p.dtype)
            if low:
                side = side_for(shape, o.proj_type.value)
                lr = lowrank_shape(shape, o.rank, side)
                shapes = {"step": (), "projector": projector_shape(shape, o.rank, side), "exp_avg": lr,
                          "exp_avg_sq": lr, "limiter_norm": ()}
                cost = lowrank_state_numel(shape, o.rank, side) * dtype.itemsize
            else:
                side = None
                shapes = {"step": (), "exp_avg": shape, "exp_avg_sq": shape}
                cost = 2 * p.numel() * dtype.itemsize
            entries.append(Entry(p, self.opt.param_name(self.opt.param_groups[gi], i, p), o, shape, low, side, -1,
                                 shapes, dtype))
            costs.append(cost)
        # Matrices first (so SVD work is balanced too), then elementwise-Adam tensors onto the lightest ranks.
        # Per-rank state <= total / W + the largest single tensor's state either way (greedy LPT).
        mats = [i for i, e in enumerate(entries) if e.low_rank]
        rest = [i for i, e in enumerate(entries) if not e.low_rank]
        loads = [0.0] * self.world_size
        for idx in (mats, rest):
            for i, r in zip(idx, assign_owners([costs[i] for i in idx], self.world_size, initial_loads=loads)):
                entries[i].owner = r
                loads[r] += costs[i]
        self.entries, self._signature = entries, sig
        self._by_param = {id(e.param): e for e in entries}
        if moving is not None:
            self._import_state(moving)
        self._ensure_state()

    def owner_of(self, p: torch.Tensor) -> int:
        return self._by_param[id(p)].owner

    # ------------------------------------------------------------------ state
    def _fresh_state(self, e: Entry) -> dict[str, torch.Tensor]:
        dev = e.param.device
        if e.owner != self.rank:  # placeholders: same keys, right dtype, no storage
            return {k: torch.empty(0, dtype=self._key_dtype(e, k), device="cpu" if k == "step" else dev)
                    for k in e.shapes}
        st = {k: torch.zeros(s, dtype=self._key_dtype(e, k), device="cpu" if k == "step" else dev)
              for k, s in e.shapes.items()}
        return st

    @staticmethod
    def _key_dtype(e: Entry, key: str) -> torch.dtype:
        return torch.float32 if key in ("step", "limiter_norm") else e.dtype

    def _ensure_state(self) -> None:
        """Every rank has state with the same keys for every parameter (placeholders where not owner)."""
        for e in self.entries:
            st = self.opt.state[e.param]
            if not all(k in st for k in e.shapes):
                st.clear()
                st.update(self._fresh_state(e))

    def state_bytes(self) -> int:
        """Bytes of projectors, moments and limiter norms held by this rank (step counters excluded)."""
        return sum(t.numel() * t.element_size() for e in self.entries for k, t in self.opt.state[e.param].items()
                   if k in STATE_BYTES_KEYS)

    def entry_state_bytes(self, e: Entry) -> int:
        """Bytes of one parameter's projector, moments and limiter norm (full size, wherever it lives)."""
        return sum(_numel(e.shapes[k]) * self._key_dtype(e, k).itemsize for k in STATE_BYTES_KEYS if k in e.shapes)

    def state_bytes_total(self) -> int:
        return sum(self.entry_state_bytes(e) for e in self.entries)

    def state_bytes_max(self) -> int:
        return max((self.entry_state_bytes(e) for e in self.entries), default=0)

    # ------------------------------------------------------------------ step
    def step(self, tasks: list[Any]) -> None:
        """Owner computes (SVD at refresh steps, update), then one all-gather of the owned parameters' values."""
        self._ensure_plan()
        by_param = {}
        for t in tasks:
            if id(t.param) not in self._by_param:
                raise ValueError(f"{t.name} has a gradient but requires_grad=False: the replicated layout only "
                                 "updates parameters with requires_grad=True")
            by_param[id(t.param)] = t
        mine = [by_param[id(e.param)] for e in self.entries if e.owner == self.rank and id(e.param) in by_param]
        for task, ok in zip(mine, self.opt.finite_mask([t.grad for t in mine])):
            if not ok:
                self.note_nonfinite(task)
                continue
            st = self.opt.state[task.param]
            if task.low_rank:
                if int(st["step"]) % task.opts.update_proj_gap == 0:
                    self.svd_count += 1
                    self.svd_flops += svd_flops(task.shape)
                whole_matrix_step_(self.opt, task, st, task.grad, task.param)
            else:
                adam_step_(self.opt, task, task.grad, task.param, task.param)
        self._share_values()
        self.comm.end_step()

    def _buckets(self) -> dict[torch.dtype, list[list[Entry]]]:
        """Per parameter dtype, each rank's owned entries (in plan order)."""
        out: dict[torch.dtype, list[list[Entry]]] = {}
        for e in self.entries:
            out.setdefault(e.param.dtype, [[] for _ in range(self.world_size)])[e.owner].append(e)
        return out

    def _share_values(self) -> None:
        for dtype, per_rank in self._buckets().items():
            sizes = [sum(e.param.numel() for e in es) for es in per_rank]
            L = max(sizes)
            if L == 0:
                continue
            dev = per_rank[self.rank][0].param.device if per_rank[self.rank] else self.entries[0].param.device
            send = torch.zeros(L, dtype=dtype, device=dev)
            off = 0
            for e in per_rank[self.rank]:
                n = e.param.numel()
                send[off:off + n].copy_(e.param.detach().reshape(-1))
                off += n
            recv = torch.empty(self.world_size * L, dtype=dtype, device=dev)
            self.comm.all_gather_into_tensor(recv, send)
            for r, es in enumerate(per_rank):
                if r == self.rank:
                    continue
                off = r * L
                for e in es:
                    n = e.param.numel()
                    e.param.detach().copy_(recv[off:off + n].view(e.param.shape))
                    off += n

    def expected_comm_bytes(self) -> int:
        """The docstring formula, from the owner map alone (what ``comm_stats()['bytes_per_step']`` measures)."""
        if self.world_size == 1:
            return 0
        total = 0
        for dtype, per_rank in self._buckets().items():
            total += self.world_size * max(sum(e.param.numel() for e in es) for es in per_rank) * dtype.itemsize
        return total

    def comm_stats(self) -> dict[str, Any]:
        return {**self.comm.stats(), "checkpoint_bytes": self.checkpoint_comm.total_bytes}

    # ------------------------------------------------------------------ checkpoints
    def mesh(self) -> Any:
        """The 1-D DeviceMesh of the process group (for DTensor state in state_dict())."""
        if self._mesh is None:
            import torch.distributed as dist
            from torch.distributed.device_mesh import DeviceMesh

            dev = self.entries[0].param.device.type if self.entries else "cpu"
            self._mesh = DeviceMesh.from_group(self.group if self.group is not None else dist.group.WORLD, dev)
        return self._mesh

    def _state_dict_post_hook(self, sd: dict[str, Any]) -> dict[str, Any]:
        exported = self._export_state()
        index = {id(p): i for i, (_, _, p) in enumerate(self._params())}
        sd["state"] = {index[id(p)]: st for p, st in exported.items()}
        return sd

    def _export_state(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Collective: every rank gets, for every parameter, 0-d state as plain tensors and the rest as
        ``Shard(0)`` DTensors over the mesh. One broadcast per owning rank (of that rank's whole state)."""
        from torch.distributed.tensor import DTensor, Shard

        self._ensure_state()
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        dev = self.entries[0].param.device if self.entries else torch.device("cpu")
        for owner in range(self.world_size):
            items = [(e, k, self.opt.state[e.param][k].dtype) for e in self.entries if e.owner == owner for k in e.shapes]
            if not items:
                continue
            nbytes = [_numel(e.shapes[k]) * dt.itemsize for e, k, dt in items]
            buf = torch.empty(sum(nbytes), dtype=torch.uint8, device=dev)
            if owner == self.rank:
                off = 0
                for (e, k, _), nb in zip(items, nbytes):
                    buf[off:off + nb].copy_(self.opt.state[e.param][k].reshape(-1).view(torch.uint8))
                    off += nb
            self.checkpoint_comm.broadcast(buf, owner)
            off = 0
            for (e, k, dt), nb in zip(items, nbytes):
                shape = e.shapes[k]
                t = buf[off:off + nb].view(dt).reshape(shape)
                off += nb
                if len(shape) == 0:
                    val = t.clone().to("cpu" if k == "step" else dev)
                else:
                    a, b = row_range(shape[0], self.world_size, self.rank)
                    val = DTensor.from_local(t[a:b].clone(), self.mesh(), [Shard(0)], run_check=False,
                                             shape=torch.Size(shape), stride=contiguous_stride(shape))
                out.setdefault(e.param, {})[k] = val
        return out

    def after_load_state_dict(self) -> None:
        """Called by ``Fira.load_state_dict`` once ``opt.state`` holds the loaded values."""
        self._ensure_plan()
        self._import_state({e.param: dict(self.opt.state.get(e.param, {})) for e in self.entries})

    def _import_state(self, loaded: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Put loaded state (DTensors from state_dict(), or plain full tensors) on the owners; placeholders
        elsewhere. Collective when any value is a DTensor (the same on every rank)."""
        from torch.distributed.tensor import DTensor, Shard

        new: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        sharded: list[tuple[Entry, str, Any]] = []
        for e in self.entries:
            got = loaded.get(e.param, {})
            fresh = self._fresh_state(e)
            st = {}
            for k in e.shapes:
                v = got.get(k)
                if v is None:
                    st[k] = fresh[k]
                elif isinstance(v, DTensor):
                    mesh = v.device_mesh
                    if mesh.ndim != 1 or mesh.size() != self.world_size or tuple(v.placements) != (Shard(0),):
                        raise ValueError(f"optimizer state {k!r} of {e.name} is a DTensor with placements "
                                         f"{tuple(v.placements)} on a mesh of size {mesh.size()}; the replicated layout "
                                         f"loads Shard(0) over its {self.world_size} ranks (load through "
                                         "torch.distributed.checkpoint with this optimizer's state_dict() as template)")
                    sharded.append((e, k, v))
                    st[k] = None  # filled below
                elif e.owner == self.rank:
                    dev = "cpu" if k == "step" else e.param.device
                    st[k] = v.detach().to(device=dev, copy=True).reshape(e.shapes[k])
                else:
                    st[k] = torch.empty(0, dtype=v.dtype, device="cpu" if k == "step" else e.param.device)
            new[e.param] = st
        if sharded:
            self._gather_to_owners(sharded, new)
        for p, st in new.items():
            self.opt.state[p] = st

    def _gather_to_owners(self, sharded: list[tuple[Entry, str, Any]], new: dict) -> None:
        """Each rank broadcasts its local rows of every sharded value; owners assemble the full tensors."""
        dev = self.entries[0].param.device
        for e, k, v in sharded:
            dev_k = "cpu" if k == "step" else e.param.device
            new[e.param][k] = (torch.empty(e.shapes[k], dtype=v.dtype, device=dev_k) if e.owner == self.rank
                               else torch.empty(0, dtype=v.dtype, device=dev_k))
        for src in range(self.world_size):
            pieces = []
            for e, k, v in sharded:
                a, b = row_range(e.shapes[k][0], self.world_size, src)
                pieces.append((e, k, v, a, b, (b - a) * _numel(e.shapes[k][1:]) * v.dtype.itemsize))
            total = sum(pc[-1] for pc in pieces)
            if total == 0:
                continue
            buf = torch.empty(total, dtype=torch.uint8, device=dev)
            if src == self.rank:
                off = 0
                for e, k, v, a, b, nb in pieces:
                    buf[off:off + nb].copy_(v.to_local().contiguous().reshape(-1).view(torch.uint8))
                    off += nb
            self.checkpoint_comm.broadcast(buf, src)
            off = 0
            for e, k, v, a, b, nb in pieces:
                if e.owner == self.rank and nb:
                    rows = buf[off:off + nb].view(v.dtype).reshape((b - a, *e.shapes[k][1:]))
                    new[e.param][k][a:b].copy_(rows)
                off += nb


def svd_flops(shape: tuple[int, ...]) -> int:
    """The cost model of one thin SVD of an (m, n) matrix: m n min(m, n)."""
    m, n = shape
    return m * n * min(m, n)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
