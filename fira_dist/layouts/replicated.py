"""Replicated gradients (DDP, DeepSpeed ZeRO-0): owner-computes.

Every rank holds every parameter and the same, already averaged, gradient G.

- Low-rank matrices: a deterministic owner map (``plan.assign_owners``: greedy LPT on optimizer-state
  bytes, computed from shapes alone, identical on every rank, no communication) gives each matrix one owner.
  Only the owner holds its projector, moments and limiter norm, computes its SVD at refresh steps and its
  update, with exactly the single-process code (``single.whole_matrix_step_``) on exactly the same G.
- Elementwise-Adam tensors (embeddings, norms, lm_head, anything not low rank): nothing ties their elements
  together, so each is split by rows (torch.chunk boundaries, as DTensor ``Shard(0)``): rank r holds the
  moments of its rows and updates those rows (``algorithm.adam_update_`` on the row slice). Whole-tensor
  ownership would leave one rank with, e.g., LLaMA-60M's 32000 x 512 embedding's moments (40% of all state).

Either way every parameter ends bitwise equal to a one-process run on the same gradient (elementwise
arithmetic does not care how the rows are split). The updated values then reach every rank by an all-gather
(one per parameter dtype), rank r contributing its matrices and its rows, in rounds bounded by
``comm_bucket_bytes`` (``share_owned_values``: never a whole-model receive buffer).

Communication per step and per rank (``Comm`` counts all_gather output bytes)::

    bytes_per_step = sum over parameter dtypes d of  W * max_r L_r(d) * itemsize(d)
    L_r(d) = sum of numel(p) over low-rank matrices of dtype d owned by rank r
           + sum of rows_r(p) * numel(p) / rows(p) over the other tensors of dtype d

in rounds of C_d = min(max_r L_r(d), comm_bucket_bytes // ((W + 1) itemsize(d))) elements per rank (the last one
shorter), where rows_r(p) = the rows rank r holds under torch.chunk splitting, and only parameters with
``requires_grad`` count (``plan.gather_rounds``). Every such parameter is in the
gather whether or not it has a gradient this step: a parameter without one is sent unchanged, so ranks never
need to agree on which gradients exist. Nothing else is communicated during a step. Whether a gradient is
finite is decided on the whole gradient, identical on every rank, so all ranks skip the same tensors.

State layout and checkpoints. In memory, ``optimizer.state[p]`` has the same keys on every rank: a
matrix's owner holds the working tensors and other ranks 0-element placeholders (with the right dtype); an
elementwise tensor's moments are this rank's rows; ``step`` is a 0-d tensor. Every rank having state for
every parameter also keeps ``torch.distributed.checkpoint.state_dict`` from running its zero-lr
initialisation step on some ranks only. ``optimizer.state_dict()`` is COLLECTIVE under this layout (call it
on every rank, as with FSDP): it returns tensors of ndim >= 1 as DTensors sharded ``Shard(0)`` over a 1-D
mesh of the process group (each owner's matrix state is scattered by one broadcast per owning rank; the
row-split moments already are shards) and 0-d tensors (step, limiter norm) as plain tensors equal on every
rank. That is what ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` + ``dcp.save`` need,
and a checkpoint saved at one world size loads at another: ``load_state_dict`` (collective too) gathers each
matrix's tensors to its owner under the new owner map and keeps this rank's rows of the others. It also
accepts plain full tensors, e.g. a single-process state dict (no collective for those). Checkpoint traffic
is counted on a separate ``Comm`` (``checkpoint_comm``) so that per-step figures stay exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fira_dist.algorithm import adam_update_
from fira_dist.comm import Comm
from fira_dist.config import GroupOptions
from fira_dist.layouts.plan import assign_owners, gather_rounds, lowrank_state_numel
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
    owner: int  # the rank holding a low-rank matrix's state; -1: an elementwise tensor split by rows
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
                costs.append(lowrank_state_numel(shape, o.rank, side) * dtype.itemsize)
            else:
                side = None
                shapes = {"step": (), "exp_avg": shape, "exp_avg_sq": shape}
            entries.append(Entry(p, self.opt.param_name(self.opt.param_groups[gi], i, p), o, shape, low, side, -1,
                                 shapes, dtype))
        # Matrices: greedy LPT on state bytes (per-rank matrix state <= their total / W + the largest one); the
        # elementwise tensors are split by rows on top, so the bound holds for all state. A 0-d tensor (no rows)
        # goes to rank 0.
        mats = [e for e in entries if e.low_rank]
        for e, r in zip(mats, assign_owners(costs, self.world_size)):
            e.owner = r
        for e in entries:
            if not e.low_rank and not e.shape:
                e.owner = 0
        self.entries, self._signature = entries, sig
        self._by_param = {id(e.param): e for e in entries}
        if moving is not None:
            self._import_state(moving)
        self._ensure_state()

    def owner_of(self, p: torch.Tensor) -> int:
        return self._by_param[id(p)].owner

    # ------------------------------------------------------------------ state
    def rows(self, e: Entry, rank: int | None = None) -> tuple[int, int]:
        """The rows of an elementwise tensor that `rank` (default: this rank) updates and holds state for."""
        return row_range(e.shape[0], self.world_size, self.rank if rank is None else rank)

    def _fresh_state(self, e: Entry) -> dict[str, torch.Tensor]:
        dev = e.param.device
        out = {}
        for k, shape in e.shapes.items():
            dt, where = self._key_dtype(e, k), ("cpu" if k == "step" else dev)
            if k == "step" and e.owner < 0:
                out[k] = torch.zeros((), dtype=dt)  # a row-split tensor: every rank steps it
            elif e.owner < 0:
                a, b = self.rows(e)
                out[k] = torch.zeros((b - a, *shape[1:]), dtype=dt, device=where)
            elif e.owner == self.rank:
                out[k] = torch.zeros(shape, dtype=dt, device=where)
            else:  # placeholders: same keys, right dtype, no storage
                out[k] = torch.empty(0, dtype=dt, device=where)
        return out

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
        mine = [(e, by_param[id(e.param)]) for e in self.entries
                if (e.owner == self.rank or e.owner < 0) and id(e.param) in by_param]
        for (e, task), ok in zip(mine, self.opt.finite_mask([t.grad for _, t in mine])):
            if not ok:
                self.note_nonfinite(task)
                continue
            st = self.opt.state[task.param]
            if e.low_rank:
                if int(st["step"]) % task.opts.update_proj_gap == 0:
                    self.svd_count += 1
                    self.svd_flops += svd_flops(task.shape)
                whole_matrix_step_(self.opt, task, st, task.grad, task.param)
            elif e.owner == self.rank:  # a 0-d tensor
                adam_step_(self.opt, task, task.grad, task.param, task.param)
            else:  # this rank's rows
                a, b = self.rows(e)
                st["step"] += 1
                adam_update_(task.param.detach()[a:b], task.grad[a:b], st["exp_avg"], st["exp_avg_sq"], task.opts,
                             int(st["step"]))
        self._share_values()
        self.comm.end_step()

    def _segments(self) -> dict[torch.dtype, list[list[tuple[Entry, int, int]]]]:
        """Per parameter dtype, what each rank contributes to the gather: (entry, first row, last row)."""
        out: dict[torch.dtype, list[list[tuple[Entry, int, int]]]] = {}
        for e in self.entries:
            per_rank = out.setdefault(e.param.dtype, [[] for _ in range(self.world_size)])
            if e.owner >= 0:
                per_rank[e.owner].append((e, 0, e.shape[0] if e.shape else 1))
            else:
                for r in range(self.world_size):
                    a, b = self.rows(e, r)
                    if b > a:
                        per_rank[r].append((e, a, b))
        return out

    @staticmethod
    def _numel_rows(e: Entry, a: int, b: int) -> int:
        return (b - a) * _numel(e.shape[1:]) if e.shape else 1

    def _share_values(self) -> None:
        dev = self.entries[0].param.device if self.entries else torch.device("cpu")
        for dtype, per_rank in self._segments().items():
            views = [[e.param.detach().view(-1)[self._numel_rows(e, 0, a):][:self._numel_rows(e, a, b)]
                      for e, a, b in segs] for segs in per_rank]
            share_owned_values(self.comm, views, self.opt.comm_bucket_bytes, dtype, dev)

    def expected_comm_bytes(self) -> int:
        """The docstring formula, from the owner map alone (what ``comm_stats()['bytes_per_step']`` measures)."""
        if self.world_size == 1:
            return 0
        total = 0
        for dtype, per_rank in self._segments().items():
            lengths = [sum(self._numel_rows(*seg) for seg in segs) for segs in per_rank]
            total += gather_rounds(lengths, dtype.itemsize, self.opt.comm_bucket_bytes).comm_bytes
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
        ``Shard(0)`` DTensors over the mesh. One broadcast per owning rank (of its matrices' state)."""
        self._ensure_state()
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        dev = self.entries[0].param.device if self.entries else torch.device("cpu")
        for e in self.entries:  # row-split tensors: already this rank's shard
            if e.owner < 0:
                st = self.opt.state[e.param]
                out[e.param] = {k: st[k].clone() if not e.shapes[k] else self._as_dtensor(st[k].clone(), e.shapes[k])
                                for k in e.shapes}
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
                    val = self._as_dtensor(t[a:b].clone(), shape)
                out.setdefault(e.param, {})[k] = val
        return out

    def _as_dtensor(self, local: torch.Tensor, shape: tuple[int, ...]) -> Any:
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh(), [Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=contiguous_stride(shape))

    def after_load_state_dict(self) -> None:
        """Called by ``Fira.load_state_dict`` once ``opt.state`` holds the loaded values."""
        self._ensure_plan()
        self._import_state({e.param: dict(self.opt.state.get(e.param, {})) for e in self.entries})

    def _import_state(self, loaded: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Put loaded state (DTensors from state_dict(), or plain full tensors) where it lives: a matrix's on its
        owner (placeholders elsewhere), an elementwise tensor's rows on their rank. Collective when a matrix's
        value is a DTensor (the same on every rank)."""
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
                    if e.owner < 0:  # a row-split tensor: the shard is this rank's rows already
                        st[k] = v.to_local().detach().clone()
                    else:
                        sharded.append((e, k, v))
                        st[k] = None  # filled below
                elif e.owner < 0:
                    dev = "cpu" if k == "step" else e.param.device
                    full = v.detach().to(device=dev).reshape(e.shapes[k])
                    if e.shapes[k]:
                        a, b = self.rows(e)
                        full = full[a:b]
                    st[k] = full.clone()
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


def share_owned_values(comm: Comm, views: list[list[torch.Tensor]], budget: int, dtype: torch.dtype,
                       device: torch.device) -> None:
    """Bring every rank up to date with the values their owners computed: ``views[q]`` are this rank's 1-D views
    (same shapes on every rank) of what rank q owns. Rank q's contribution is the concatenation of views[q]; it
    is all-gathered in rounds (``plan.gather_rounds``: round j moves elements [j C, (j + 1) C) of every rank's
    contribution), so the send and receive buffers hold (W + 1) C elements <= budget bytes, never the model."""
    W, me = comm.world_size, comm.rank
    if W == 1:
        return
    lengths = [sum(v.numel() for v in vs) for vs in views]
    plan = gather_rounds(lengths, dtype.itemsize, budget)
    C = plan.per_round
    for j in range(plan.rounds):
        n = plan.round_numel(j)  # C, or what is left of the longest contribution
        send = torch.zeros(n, dtype=dtype, device=device)
        _copy_range(views[me], j * C, send, to_views=False)
        recv = torch.empty(W * n, dtype=dtype, device=device)
        comm.all_gather_into_tensor(recv, send)
        for q in range(W):
            if q != me:
                _copy_range(views[q], j * C, recv[q * n:(q + 1) * n], to_views=True)


def _copy_range(views: list[torch.Tensor], start: int, buf: torch.Tensor, to_views: bool) -> None:
    """Copy elements [start, start + len(buf)) of the concatenation of views into buf (or back, to_views)."""
    pos, end = 0, start + buf.numel()
    for v in views:
        lo, hi = max(start, pos), min(end, pos + v.numel())
        if hi > lo:
            a, b = lo - start, hi - start
            if to_views:
                v[lo - pos:hi - pos].copy_(buf[a:b])
            else:
                buf[a:b].copy_(v[lo - pos:hi - pos])
        pos += v.numel()
        if pos >= end:
            break


def svd_flops(shape: tuple[int, ...]) -> int:
    """The cost model of one thin SVD of an (m, n) matrix: m n min(m, n)."""
    m, n = shape
    return m * n * min(m, n)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
