"""Row-sharded gradients (FSDP2 ``fully_shard``: DTensor parameters and gradients, ``Shard(0)`` on a 1-D mesh).

Rank r holds rows [a_r, b_r) of every parameter and of its gradient (torch.chunk semantics: c = ceil(m / W)
rows per rank, the last ranks fewer or none). The low-rank matrices' math is ``layouts.sliced`` (Fira on row
slices; here every slice is whole rows, so no row is split): per matrix G (m, n), k = min(rank, m, n),
- right projection (m >= n for "std"): Q (k, n) stored by its rows, all-gathered for the step; R = G_r Q^T,
  the moments (by rows), phi and the residual are row-local;
- left projection (m < n): P (m, k) by rows; the partial P_r^T G_r (k, n) and column norms are reduce-scattered
  by columns, the moments live by columns (``Shard(1)``), [X; c] (k + f, n) is all-gathered;
- the limiter's ||S||^2 of every Fira matrix of a chunk in one all-reduce;
- refresh steps (``step % update_proj_gap == 0``): exact SVD: the due gradients' rows go point to point to each
  matrix's owner (greedy LPT on m n min(m, n)) in rounds bounded by ``comm_bucket_bytes``, and each rank gets
  its piece of the new projector back; randomized: ``layouts.sketch``, no gradient moves.
- non-matrix parameters (embeddings, norms, matrices in groups without ``rank``): elementwise Adam on the local
  shard; the moments are sharded like the parameter.

Before any of this, one all-gather carries, per parameter, "has a gradient" and "has NaN/Inf on this rank"
flags, so that every rank skips the same parameters (``skip_nonfinite``).

Communication per step and per rank, in bytes (``Comm``: all_gather counts its output, reduce_scatter its
input, all_reduce its tensor, point-to-point what a rank sends; everything fp32). E = the parameters, chunks =
``plan.sliced_chunks`` of the matrices that step, f = 1 for Fira:

    flags all-gather      4 W 2 |E|
    per chunk             plan.sliced_chunk_comm_bytes: 4 (W sum_right ceil(k/W) n + 2 W sum_left (k + f)
                          ceil(n/W) + #Fira)
    exact refresh         plan.exact_refresh_comm_bytes: 4 (rows held x n of each due matrix owned elsewhere
                          + the other ranks' projector pieces of each due matrix owned here + #due)
    randomized refresh    plan.sketch_comm_bytes: 4 ell (n (1 + q) + ell) right, 4 ell (m + n)(1 + q) left

``expected_comm_bytes()`` evaluates this before a step; the tests check it against ``comm_stats()``.

State and checkpoints: every state tensor with ndim >= 1 is a DTensor on the parameters' mesh (right: Q
``Shard(0)`` over its k rows, moments ``Shard(0)``; left: P ``Shard(0)``, moments ``Shard(1)``; Adam: the
parameter's placement); step and limiter norm are plain 0-d tensors, equal on every rank. Every rank has the
same keys (state is created eagerly), so ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` +
``torch.distributed.checkpoint`` save it and reshard it to another world size without any help; state_dict()
is not collective. ``load_state_dict`` also takes plain full tensors (each rank keeps its slice).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fira_dist.algorithm import LowRankState, adam_update_
from fira_dist.comm import Comm
from fira_dist.config import Algorithm, GroupOptions
from fira_dist.layouts import plan as P
from fira_dist.layouts.replicated import STATE_BYTES_KEYS, contiguous_stride, process_group_of, row_range
from fira_dist.layouts.single import SingleProcess
from fira_dist.layouts.sketch import refresh_randomized
from fira_dist.layouts.sliced import SlicedMatrix, Work, check_supported, refresh_exact, step_chunk, uses_sketch
from fira_dist.projector import OVERSAMPLE, POWER_ITERS, effective_rank, lowrank_shape, projector_shape, side_for

PACK = torch.float32  # every collective of a step moves fp32


@dataclasses.dataclass
class Entry:
    param: torch.Tensor
    name: str
    opts: GroupOptions
    shape: tuple[int, ...]
    kind: str  # "right" | "left" | "adam"
    k: int = 0
    owner: int = -1  # SVD owner (low-rank only)
    mat: SlicedMatrix | None = None  # low-rank only: the sliced plan
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    dims: dict[str, int] = dataclasses.field(default_factory=dict)  # shard dim of each state tensor (ndim >= 1)
    dtype: torch.dtype = torch.float32

    @property
    def low_rank(self) -> bool:
        return self.kind != "adam"

    @property
    def fira(self) -> bool:
        return self.low_rank and self.opts.algorithm == Algorithm.FIRA


class RowSharded(SingleProcess):
    """FSDP2 layout; see the module docstring for the math, the communication formula and the state layout."""

    def __init__(self, opt: Any, process_group: Any = None):
        super().__init__(opt)
        from torch.distributed.tensor import DTensor, Shard

        params = [p for g in opt.param_groups for p in g["params"]]
        meshes = set()
        for gi, g in enumerate(opt.param_groups):
            for i, p in enumerate(g["params"]):
                name = opt.param_name(g, i, p)
                if not isinstance(p, DTensor):
                    raise ValueError(f"layout='row_sharded' needs DTensor parameters (FSDP2 fully_shard); {name} is a "
                                     f"plain {type(p).__name__}: shard every module, or use layout='replicated'")
                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                    raise ValueError(f"layout='row_sharded' supports Shard(0) on a 1-D mesh (FSDP2 fully_shard); {name} "
                                     f"has placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh")
                meshes.add(p.device_mesh)
        if len(meshes) > 1:
            raise ValueError(f"layout='row_sharded': the parameters live on {len(meshes)} different device meshes; "
                             "expected one (one FSDP2 mesh per optimizer)")
        if not params:
            raise ValueError("layout='row_sharded' got no parameters")
        self.mesh = next(iter(meshes))
        if process_group is not None:
            pg = process_group_of(process_group)
            import torch.distributed as dist

            if dist.get_world_size(pg) != self.mesh.size():
                raise ValueError(f"process_group has {dist.get_world_size(pg)} ranks but the parameters are sharded over "
                                 f"a mesh of {self.mesh.size()}: pass the FSDP2 mesh (or leave process_group unset)")
        self.group = self.mesh.get_group()
        self.comm = Comm(self.group)
        self.rank, self.world_size = self.mesh.get_local_rank(), self.mesh.size()
        self.svd_count = 0  # exact SVDs computed on this rank
        self.svd_flops = 0
        self.sketch_count = 0  # distributed randomized refreshes this rank took part in
        self.entries: list[Entry] = []
        self._signature: tuple = ()
        self._ensure_plan()

    # ------------------------------------------------------------------ plan
    def _ensure_plan(self) -> None:
        items = [(gi, i, p) for gi, g in enumerate(self.opt.param_groups) for i, p in enumerate(g["params"])]
        sig = tuple((id(p), tuple(p.shape), self.opt.param_groups[gi].get("rank"),
                     self.opt.param_groups[gi].get("proj_type")) for gi, _, p in items)
        if sig == self._signature:
            # Same parameters: only re-read the group options, so that edits of param_groups (an lr schedule)
            # apply at the next step, as with the other layouts. Entries are in the order of ``items``.
            for e, (gi, _, _) in zip(self.entries, items):
                e.opts = self.opt.group_options(gi)
                if e.mat is not None:
                    e.mat.opts = e.opts
            return
        entries = []
        for gi, i, p in items:
            o = self.opt.group_options(gi)
            shape = tuple(p.shape)
            name = self.opt.param_name(self.opt.param_groups[gi], i, p)
            dtype = self.opt.state_dtype(o, p.dtype)
            if o.low_rank and len(shape) == 2:
                side = side_for(shape, o.proj_type.value)
                k = effective_rank(shape, o.rank)
                lr = lowrank_shape(shape, o.rank, side)
                check_supported(name, o, side, shape, "row-sharded (FSDP2)")
                e = Entry(p, name, o, shape, side, k, dtype=dtype)
                e.shapes = {"step": (), "projector": projector_shape(shape, o.rank, side), "exp_avg": lr,
                            "exp_avg_sq": lr, "limiter_norm": ()}
                mom_dim = 0 if side == "right" else 1
                e.dims = {"projector": 0, "exp_avg": mom_dim, "exp_avg_sq": mom_dim}
            else:
                e = Entry(p, name, o, shape, "adam", dtype=dtype)
                e.shapes = {"step": (), "exp_avg": shape, "exp_avg_sq": shape}
                e.dims = {"exp_avg": 0, "exp_avg_sq": 0} if len(shape) else {}
            entries.append(e)
        mats = [e for e in entries if e.low_rank]
        for e, r in zip(mats, P.assign_owners([P.svd_cost(e.shape) for e in mats], self.world_size)):
            e.owner = r
            shape = P.SliceShape(e.shape, e.k, e.kind, e.fira, tuple(P.fsdp2_ranges(e.shape, self.world_size)))
            e.mat = SlicedMatrix(e.name, e.opts, shape, r, self.rank)
        for e in entries:
            lo, hi = row_range(e.shape[0], self.world_size, self.rank) if e.shape else (0, 0)
            local = e.param.to_local().shape
            if e.shape and local[0] != hi - lo:
                raise ValueError(f"{e.name}: local shard has {local[0]} rows, expected {hi - lo} (rows {lo}:{hi} of "
                                 f"{e.shape[0]} under Shard(0) chunking); uneven custom sharding is not supported")
        self.entries, self._signature = entries, sig
        self._ensure_state()

    def _rows(self, e_rows: int, r: int | None = None) -> tuple[int, int]:
        return row_range(e_rows, self.world_size, self.rank if r is None else r)

    # ------------------------------------------------------------------ state
    def _key_dtype(self, e: Entry, key: str) -> torch.dtype:
        return torch.float32 if key in ("step", "limiter_norm") else e.dtype

    def _dtensor(self, local: torch.Tensor, shape: tuple[int, ...], dim: int) -> Any:
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=contiguous_stride(shape))

    def _local_slice(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        a, b = self._rows(full.shape[dim])
        return full.narrow(dim, a, b - a)

    def _fresh(self, e: Entry, key: str) -> torch.Tensor:
        shape, dt = e.shapes[key], self._key_dtype(e, key)
        if key == "step":
            return torch.zeros((), dtype=dt)
        dev = e.param.device
        if not shape:
            return torch.zeros((), dtype=dt, device=dev)
        dim = e.dims[key]
        a, b = self._rows(shape[dim])
        local_shape = list(shape)
        local_shape[dim] = b - a
        return self._dtensor(torch.zeros(local_shape, dtype=dt, device=dev), shape, dim)

    def _ensure_state(self) -> None:
        for e in self.entries:
            st = self.opt.state[e.param]
            for k in e.shapes:
                if k not in st:
                    st[k] = self._fresh(e, k)

    def state_bytes(self) -> int:
        """Bytes of projectors, moments and limiter norms held by this rank (local shards; step excluded)."""
        total = 0
        for e in self.entries:
            for k, t in self.opt.state[e.param].items():
                if k in STATE_BYTES_KEYS:
                    t = t.to_local() if hasattr(t, "to_local") else t
                    total += t.numel() * t.element_size()
        return total

    def entry_state_bytes(self, e: Entry) -> int:
        n = 0
        for k in STATE_BYTES_KEYS:
            if k in e.shapes:
                c = 1
                for s in e.shapes[k]:
                    c *= s
                n += c * self._key_dtype(e, k).itemsize
        return n

    def state_bytes_total(self) -> int:
        return sum(self.entry_state_bytes(e) for e in self.entries)

    def state_bytes_max(self) -> int:
        return max((self.entry_state_bytes(e) for e in self.entries), default=0)

    def after_load_state_dict(self) -> None:
        """Loaded values: DTensors with this layout's placements are kept; plain full tensors are sliced to this
        rank's shard; DTensors with other placements are redistributed (collective, through DTensor)."""
        from torch.distributed.tensor import DTensor, Shard

        self._ensure_plan()
        for e in self.entries:
            st = self.opt.state[e.param]
            for k in list(e.shapes):
                v = st.get(k)
                if v is None:
                    st[k] = self._fresh(e, k)
                    continue
                dt = v.dtype
                if k == "step":
                    st[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().to("cpu", copy=True).reshape(())
                elif not e.shapes[k]:
                    st[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().to(e.param.device).reshape(())
                elif isinstance(v, DTensor):
                    want = (Shard(e.dims[k]),)
                    if v.device_mesh != self.mesh or tuple(v.placements) != want:
                        if v.device_mesh.size() != self.world_size:
                            raise ValueError(f"optimizer state {k!r} of {e.name} is a DTensor on a mesh of "
                                             f"{v.device_mesh.size()} ranks; load it through torch.distributed."
                                             "checkpoint with this optimizer's state_dict() as the template")
                        v = self._dtensor(self._local_slice(v.full_tensor(), e.dims[k]).clone(), e.shapes[k], e.dims[k])
                    st[k] = v
                else:
                    full = v.detach().to(e.param.device).reshape(e.shapes[k])
                    st[k] = self._dtensor(self._local_slice(full, e.dims[k]).to(dt).clone(), e.shapes[k], e.dims[k])

    # ------------------------------------------------------------------ step
    @property
    def budget(self) -> int:
        return self.opt.comm_bucket_bytes

    def _local_state(self, e: Entry) -> LowRankState:
        st = self.opt.state[e.param]
        return LowRankState(st["projector"].to_local(), st["exp_avg"].to_local(), st["exp_avg_sq"].to_local(),
                            st["limiter_norm"])

    def step(self, tasks: list[Any]) -> None:
        self._ensure_plan()
        W = self.world_size
        by = {id(t.param): t for t in tasks}
        E = self.entries
        n = len(E)
        grads = {id(e.param): by[id(e.param)].grad.to_local() for e in E if id(e.param) in by}
        finite = dict(zip(grads, self.opt.finite_mask(list(grads.values()))))

        # ---- prologue all-gather: per parameter "has a gradient" and "has NaN/Inf here"
        send = torch.tensor([float(id(e.param) in grads) for e in E] +
                            [0.0 if finite.get(id(e.param), True) else 1.0 for e in E], dtype=torch.float32,
                            device=self._device())
        recv = torch.empty(W * 2 * n, dtype=torch.float32, device=send.device)
        self.comm.all_gather_into_tensor(recv, send)
        recv = recv.view(W, 2 * n)
        has_sum, bad_sum = recv[:, :n].sum(0).tolist(), recv[:, n:].sum(0).tolist()
        ok = []
        for i, e in enumerate(E):
            if 0 < has_sum[i] < W:
                raise RuntimeError(f"{e.name} has a gradient on {int(has_sum[i])} of {W} ranks; the row-sharded layout "
                                   "needs the same parameters to have gradients on every rank")
            ok.append(has_sum[i] == W and bad_sum[i] == 0)
            if has_sum[i] == W and bad_sum[i] > 0:
                self.note_nonfinite(by[id(e.param)])

        # ---- low-rank matrices: refresh (exact or sketched), then the step chunk by chunk
        def work(e: Entry, t: int) -> Work:
            return Work(e.mat, self._local_state(e), grads[id(e.param)].reshape(-1), e.param.to_local().view(-1), t)

        live = [e for i, e in enumerate(E) if ok[i] and e.low_rank]
        due = [work(e, int(self.opt.state[e.param]["step"])) for e in live
               if int(self.opt.state[e.param]["step"]) % e.opts.update_proj_gap == 0]
        exact = [w for w in due if not uses_sketch(w.mat)]
        sketched = [w for w in due if uses_sketch(w.mat)]
        skip = set()
        for w, go in zip(exact + sketched, refresh_exact(self.opt, self.comm, exact, self.budget)
                         + refresh_randomized(self.opt, self.comm, sketched)):
            if not go:
                skip.add(w.mat.name)
        for w in exact:
            if w.mat.owner == self.rank:
                self.svd_count += 1
                self.svd_flops += P.svd_cost(w.mat.shape)
        self.sketch_count += len(sketched)
        works = []
        for e in live:
            if e.name in skip:
                continue
            st = self.opt.state[e.param]
            st["step"] += 1
            works.append(work(e, int(st["step"])))
        for chunk in P.sliced_chunks([w.mat.plan for w in works], self.budget):
            step_chunk(self.comm, [works[j] for j in chunk])

        # ---- elementwise Adam on local shards
        for i in range(n):
            e = E[i]
            if not ok[i] or e.low_rank:
                continue
            st = self.opt.state[e.param]
            st["step"] += 1
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m = m.to_local() if hasattr(m, "to_local") else m
            v = v.to_local() if hasattr(v, "to_local") else v
            adam_update_(e.param.to_local(), grads[id(e.param)], m, v, e.opts, int(st["step"]))
        self.comm.end_step()

    def _device(self) -> torch.device:
        return self.entries[0].param.device if self.entries else torch.device("cpu")

    # ------------------------------------------------------------------ formula
    def expected_comm_bytes(self) -> int:
        """The docstring's formula for the coming step, from shapes, ``p.grad is not None`` and step counters
        (assumes finite gradients and successful SVDs)."""
        W, me = self.world_size, self.rank
        if W == 1:
            return 0
        E = self.entries
        live = [e for e in E if e.low_rank and e.param.grad is not None]
        due = [e for e in live if int(self.opt.state[e.param]["step"]) % e.opts.update_proj_gap == 0]
        exact = [e.mat for e in due if not uses_sketch(e.mat)]
        sketched = [e.mat.plan for e in due if uses_sketch(e.mat)]
        total = 4 * W * 2 * len(E)
        rounds = P.exact_refresh_rounds([m.plan for m in exact], [m.owner for m in exact], self.budget)
        total += P.exact_refresh_comm_bytes([m.plan for m in exact], [m.owner for m in exact], rounds, me)
        total += P.sketch_comm_bytes(sketched, OVERSAMPLE, POWER_ITERS)
        shapes = [e.mat.plan for e in live]
        for chunk in P.sliced_chunks(shapes, self.budget):
            total += P.sliced_chunk_comm_bytes([shapes[j] for j in chunk])
        return total

    def comm_stats(self) -> dict[str, Any]:
        return self.comm.stats()
