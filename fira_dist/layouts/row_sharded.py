"""Row-sharded gradients (FSDP2 ``fully_shard``: DTensor parameters and gradients, ``Shard(0)`` on a 1-D mesh).

Rank r holds rows [a_r, b_r) of every parameter and of its gradient (torch.chunk semantics: c = ceil(m / W)
rows per rank, the last ranks fewer or none). Per low-rank matrix G (m, n), k = min(rank, m, n):

- right projection (m >= n for "std"), Q (k, n):  R = G Q^T is row-local: R_r = G_r Q^T (m_r, k). The
  moments (m, k) are sharded like the parameter's rows, phi (one per row) and the residual are row-local.
  Q itself is stored sharded by its rows (k_r, n) and all-gathered once per step (it is small: k x n).
- left projection (m < n), P (m, k) sharded by rows like G:  R = P^T G = sum_r P_r^T G_r. Each rank reduce-
  scatters its partial (k, n) by columns, together with its partial column norms ||G_r[:, j]||^2, so rank r
  ends with R[:, cols_r] (k, n_r) and the full ||G[:, j]||^2 of its columns. The moments (k, n) are sharded
  by columns (``Shard(1)``); N, phi (one per column) are column-local. X = alpha N - beta (phi / lim) R and
  c = phi / lim are all-gathered (k + 1, n), and rank r applies p_r -= step (P_r X + c * G_r).
- the limiter: each rank's partial ||S||^2 (its rows or its columns), for ALL Fira matrices at once, in one
  all-reduce of a vector. Every rank then holds the same limiter norm (a replicated 0-d tensor).
- SVD at refresh steps (per-matrix ``step % update_proj_gap == 0``): each matrix has one owner (greedy LPT on
  m n min(m, n)); the rows of G go to the owner (one all-to-all for all due matrices), the owner computes
  exactly what one process computes (``single.refresh_projector_``: exact or randomized, same seeding, same
  failure handling), and sends back the full Q to every rank (needed this step) or each rank's rows of P
  (a second all-to-all). Each SVD is computed once in the job.
- non-matrix parameters (embeddings, norms, and matrices in groups without ``rank``): elementwise Adam on the
  local shard; the moments are sharded like the parameter.

Before any of this, one all-gather carries, per parameter, "has a gradient" and "has NaN/Inf on this rank"
flags (so that every rank skips the same parameters: ``skip_nonfinite``), together with the Q shards above.

Communication per step and per rank, in bytes (``Comm``: all_gather counts its output, reduce_scatter its
input, all_reduce its tensor, all_to_all what a rank sends to other ranks; everything is packed in fp32, 4
bytes). E = the parameters of the optimizer, c(x) = ceil(x / W), "ok" = has a finite gradient:

    prologue all-gather      4 W (2 |E| + sum_{right ok, not due} c(k) n)
    reduce-scatter           4 W sum_{left ok} (k + f) c(n)              f = 1 for Fira, 0 for GaLore
    all-reduce               4 (number of Fira matrices ok)
    all-gather               4 W sum_{left ok} (k + f) c(n)
    refresh steps only:
    all-to-all (gradients)   4 sum_{due, owner != me} (m_me n + [right] k_me n)
    all-to-all (projectors)  4 sum_{due, owner == me} sum_{d != me} (1 + [right] k n + [left] m_d k)

(a collective with nothing to move is skipped and counts 0). ``expected_comm_bytes()`` evaluates this from
shapes before a step; the tests check it against ``comm_stats()``.

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

from fira_dist.algorithm import (
    adam_update_,
    apply_direction_,
    bias_corrected_step_size,
    decay_,
    is_left_square_quirk,
    limiter,
    lowrank_direction_parts,
    project,
    residual_coefficient,
    scaling_and_residual_sq,
    squared_norms,
    lowrank_adam_,
)
from fira_dist.comm import Comm
from fira_dist.config import Algorithm, GroupOptions
from fira_dist.layouts.owners import assign_owners
from fira_dist.layouts.replicated import STATE_BYTES_KEYS, contiguous_stride, process_group_of, row_range, svd_flops
from fira_dist.layouts.single import SingleProcess, refresh_projector_
from fira_dist.projector import effective_rank, lowrank_shape, projector_shape, side_for

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
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    dims: dict[str, int] = dataclasses.field(default_factory=dict)  # shard dim of each state tensor (ndim >= 1)
    dtype: torch.dtype = torch.float32

    @property
    def low_rank(self) -> bool:
        return self.kind != "adam"

    @property
    def fira(self) -> bool:
        return self.low_rank and self.opts.algorithm == Algorithm.FIRA


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
        self.svd_count = 0
        self.svd_flops = 0
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
                if o.algorithm == Algorithm.FIRA and is_left_square_quirk(side, lr, shape):
                    raise ValueError(f"{name}: a left projection of a square matrix with rank >= its size takes the "
                                     "reference's per-row scaling, which the row-sharded layout does not implement; "
                                     "use proj_type='std' or a smaller rank")
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
        for e, r in zip(mats, assign_owners([svd_flops(e.shape) for e in mats], self.world_size)):
            e.owner = r
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
    def step(self, tasks: list[Any]) -> None:
        self._ensure_plan()
        W, me = self.world_size, self.rank
        by = {id(t.param): t for t in tasks}
        E = self.entries
        n = len(E)
        grads = {id(e.param): by[id(e.param)].grad.to_local() for e in E if id(e.param) in by}
        has_local = [id(e.param) in grads for e in E]
        finite = dict(zip(grads, self.opt.finite_mask(list(grads.values()))))
        due = [e.low_rank and has_local[i] and int(self.opt.state[e.param]["step"]) % e.opts.update_proj_gap == 0
               for i, e in enumerate(E)]

        # ---- prologue all-gather: flags + Q shards of right matrices that are not refreshed this step
        gq = [i for i, e in enumerate(E) if e.kind == "right" and has_local[i] and not due[i]]
        seg = 2 * n + sum(_cdiv(E[i].k, W) * E[i].shape[1] for i in gq)
        send = torch.zeros(seg, dtype=PACK, device=self._device())
        send[:n] = torch.tensor([float(h) for h in has_local])
        send[n:2 * n] = torch.tensor([0.0 if finite.get(id(e.param), True) else 1.0 for e in E])
        off = 2 * n
        for i in gq:
            e = E[i]
            q = self.opt.state[e.param]["projector"].to_local()  # (k_me, n)
            send[off:off + q.numel()].copy_(q.reshape(-1))
            off += _cdiv(e.k, W) * e.shape[1]
        recv = torch.empty(W * seg, dtype=PACK, device=send.device)
        self.comm.all_gather_into_tensor(recv, send)
        recv = recv.view(W, seg)
        has_sum = recv[:, :n].sum(0).tolist()
        bad_sum = recv[:, n:2 * n].sum(0).tolist()
        ok = []
        for i, e in enumerate(E):
            if 0 < has_sum[i] < W:
                raise RuntimeError(f"{e.name} has a gradient on {int(has_sum[i])} of {W} ranks; the row-sharded layout "
                                   "needs the same parameters to have gradients on every rank")
            ok.append(has_sum[i] == W and bad_sum[i] == 0)
            if has_sum[i] == W and bad_sum[i] > 0:
                self.note_nonfinite(by[id(e.param)])
        Q: dict[int, torch.Tensor] = {}
        off = 2 * n
        for i in gq:
            e = E[i]
            cols, ck = e.shape[1], _cdiv(e.k, W)
            parts = [recv[r, off:off + ck * cols].view(ck, cols)[: self._rows(e.k, r)[1] - self._rows(e.k, r)[0]]
                     for r in range(W)]
            Q[i] = torch.cat(parts).to(self._key_dtype(e, "projector"))  # (k, n)
            off += ck * cols

        # ---- refresh: rows of G to the SVD owner, projectors back
        refresh = [i for i in range(n) if due[i] and ok[i]]
        if refresh:
            self._refresh(refresh, grads, Q, ok, by)

        # ---- low-rank math
        live = [i for i in range(n) if ok[i] and E[i].low_rank]
        left = [i for i in live if E[i].kind == "left"]
        work: dict[int, dict[str, Any]] = {}
        for i in live:
            e, st = E[i], self.opt.state[E[i].param]
            st["step"] += 1
            Gc = grads[id(e.param)].to(self._key_dtype(e, "exp_avg"))  # (m_me, n)
            w = {"G": Gc, "t": int(st["step"])}
            if e.kind == "right":
                w["R"] = project(Gc, Q[i], "right")  # (m_me, k)
            else:
                w["partial"] = project(Gc, st["projector"].to_local(), "left")  # (k, n): P_me^T G_me
                if e.fira:
                    w["g_sq"] = squared_norms(Gc, -2)  # (1, n)
            work[i] = w
        if left:
            self._reduce_scatter_left(left, work)
        s_sq = []
        for i in live:
            e, st, w = E[i], self.opt.state[E[i].param], work[i]
            w["N"] = lowrank_adam_(w["R"], st["exp_avg"].to_local(), st["exp_avg_sq"].to_local(), e.opts)
            if e.fira:
                w["phi"], part = scaling_and_residual_sq(w["G"] if e.kind == "right" else None, w["R"], w["N"], e.kind,
                                                         residual_coefficient(e.opts), g_sq=w.get("g_sq_cols"))
                s_sq.append(part.reshape(1).to(PACK))
        fira = [i for i in live if E[i].fira]
        if fira:
            norms = self.comm.all_reduce(torch.cat(s_sq)).sqrt()
            for j, i in enumerate(fira):
                st = self.opt.state[E[i].param]
                lim, new_norm = limiter(norms[j].to(st["limiter_norm"].dtype), st["limiter_norm"],
                                        E[i].opts.limiter_gamma, has_prev=work[i]["t"] > 1)
                st["limiter_norm"].copy_(new_norm)
                work[i]["lim"] = lim
        for i in live:
            e, w = E[i], work[i]
            w["X"], w["c"] = lowrank_direction_parts(w["N"], w["R"], w.get("phi"), w.get("lim"), e.opts)
        if left:
            self._all_gather_left(left, work)
        for i in live:
            e, st, w = E[i], self.opt.state[E[i].param], work[i]
            target = e.param.to_local()
            P = Q[i] if e.kind == "right" else st["projector"].to_local()
            apply_direction_(target, w["G"], w["X"], w["c"], P, e.kind, -bias_corrected_step_size(e.opts, w["t"]))
            decay_(target, e.opts)

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

    def _refresh(self, refresh: list[int], grads: dict, Q: dict, ok: list[bool], by: dict) -> None:
        """All-to-all the due gradients' rows (and old Q rows) to the SVD owners, compute, all-to-all back."""
        W, me, E = self.world_size, self.rank, self.entries
        dev = self._device()
        # 1. rows of G (and of the old Q, the fallback if the SVD fails) to the owner
        in_splits = [0] * W
        chunks: list[list[torch.Tensor]] = [[] for _ in range(W)]
        for i in refresh:
            e = E[i]
            g = grads[id(e.param)].to(PACK).reshape(-1)
            chunks[e.owner].append(g)
            if e.kind == "right":
                chunks[e.owner].append(self.opt.state[e.param]["projector"].to_local().to(PACK).reshape(-1))
        for d in range(W):
            in_splits[d] = sum(c.numel() for c in chunks[d])
        out_splits = [0] * W
        for i in refresh:
            e = E[i]
            if e.owner != me:
                continue
            for s in range(W):
                a, b = self._rows(e.shape[0], s)
                out_splits[s] += (b - a) * e.shape[1]
                if e.kind == "right":
                    qa, qb = self._rows(e.k, s)
                    out_splits[s] += (qb - qa) * e.shape[1]
        inp = torch.cat([c for d in range(W) for c in chunks[d]]) if sum(in_splits) else torch.zeros(0, dtype=PACK, device=dev)
        out = torch.empty(sum(out_splits), dtype=PACK, device=dev)
        self.comm.all_to_all_single(out, inp, out_splits, in_splits)
        # assemble on the owner: source by source, matrix by matrix (plan order)
        mine = [i for i in refresh if E[i].owner == me]
        full_g = {i: [] for i in mine}
        old_q = {i: [] for i in mine}
        off = 0
        for s in range(W):
            for i in mine:
                e = E[i]
                a, b = self._rows(e.shape[0], s)
                cnt = (b - a) * e.shape[1]
                full_g[i].append(out[off:off + cnt].view(b - a, e.shape[1]))
                off += cnt
                if e.kind == "right":
                    qa, qb = self._rows(e.k, s)
                    cnt = (qb - qa) * e.shape[1]
                    old_q[i].append(out[off:off + cnt].view(qb - qa, e.shape[1]))
                    off += cnt
        # 2. the SVDs, exactly as one process (same seeding, same failure handling)
        results = {}
        for i in mine:
            e = E[i]
            G = torch.cat(full_g[i]).to(grads[id(e.param)].dtype)  # (m, n)
            if e.kind == "right":
                proj = torch.cat(old_q[i]).to(self._key_dtype(e, "projector")).clone()  # old Q: kept on failure
            else:
                proj = torch.full(e.shapes["projector"], float("nan"), dtype=self._key_dtype(e, "projector"), device=dev)
            task = by[id(e.param)]
            st = {"step": self.opt.state[e.param]["step"], "projector": proj}
            self.svd_count += 1
            self.svd_flops += svd_flops(e.shape)
            go = refresh_projector_(self.opt, task, st, G)
            status = 2.0 if not go else (1.0 if e.kind == "left" and bool(torch.isnan(proj).any()) else 0.0)
            results[i] = (status, proj)
        # 3. back: [status, full Q] to every rank (right) or [status, rows of P] (left)
        in_splits = [0] * W
        send: list[list[torch.Tensor]] = [[] for _ in range(W)]
        for d in range(W):
            for i in mine:
                e = E[i]
                status, proj = results[i]
                send[d].append(torch.tensor([status], dtype=PACK, device=dev))
                if e.kind == "right":
                    send[d].append(proj.to(PACK).reshape(-1))
                else:
                    a, b = self._rows(e.shape[0], d)
                    send[d].append(proj[a:b].to(PACK).reshape(-1))
            in_splits[d] = sum(t.numel() for t in send[d])
        out_splits = [0] * W
        for i in refresh:
            e = E[i]
            a, b = self._rows(e.shape[0])
            out_splits[e.owner] += 1 + (e.k * e.shape[1] if e.kind == "right" else (b - a) * e.k)
        inp = torch.cat([t for d in range(W) for t in send[d]]) if sum(in_splits) else torch.zeros(0, dtype=PACK, device=dev)
        out = torch.empty(sum(out_splits), dtype=PACK, device=dev)
        self.comm.all_to_all_single(out, inp, out_splits, in_splits)
        off = 0
        for s in range(W):
            for i in refresh:
                e = E[i]
                if e.owner != s:
                    continue
                status = float(out[off])
                off += 1
                st = self.opt.state[e.param]
                if e.kind == "right":
                    cnt = e.k * e.shape[1]
                    Q[i] = out[off:off + cnt].view(e.k, e.shape[1]).to(self._key_dtype(e, "projector"))
                    if status == 0.0:
                        qa, qb = self._rows(e.k)
                        st["projector"].to_local().copy_(Q[i][qa:qb])
                else:
                    a, b = self._rows(e.shape[0])
                    cnt = (b - a) * e.k
                    if status == 0.0:
                        st["projector"].to_local().copy_(out[off:off + cnt].view(b - a, e.k))
                off += cnt
                if status == 2.0:
                    ok[i] = False

    def _reduce_scatter_left(self, left: list[int], work: dict) -> None:
        """Sum the partial P_r^T G_r (and column norms) across ranks; rank r keeps its columns."""
        W, E = self.world_size, self.entries
        sizes = [(E[i].k + int(E[i].fira)) * _cdiv(E[i].shape[1], W) for i in left]
        S = sum(sizes)
        inp = torch.zeros(W, S, dtype=PACK, device=self._device())
        for d in range(W):
            off = 0
            for i, size in zip(left, sizes):
                e, w = E[i], work[i]
                a, b = self._rows(e.shape[1], d)
                cw = _cdiv(e.shape[1], W)
                blk = inp[d, off:off + size].view(e.k + int(e.fira), cw)
                blk[:e.k, :b - a].copy_(w["partial"][:, a:b])
                if e.fira:
                    blk[e.k, :b - a].copy_(w["g_sq"][0, a:b])
                off += size
        out = torch.empty(S, dtype=PACK, device=inp.device)
        self.comm.reduce_scatter_tensor(out, inp.view(-1))
        off = 0
        for i, size in zip(left, sizes):
            e, w = E[i], work[i]
            a, b = self._rows(e.shape[1])
            blk = out[off:off + size].view(e.k + int(e.fira), _cdiv(e.shape[1], W))
            dt = w["G"].dtype
            w["R"] = blk[:e.k, :b - a].to(dt).contiguous()  # (k, n_me)
            if e.fira:
                w["g_sq_cols"] = blk[e.k:, :b - a].to(dt)  # (1, n_me)
            off += size
            del w["partial"]

    def _all_gather_left(self, left: list[int], work: dict) -> None:
        """All-gather X (k, n_r) and c (1, n_r) of every left matrix: every rank gets X (k, n) and c (1, n)."""
        W, E = self.world_size, self.entries
        sizes = [(E[i].k + int(E[i].fira)) * _cdiv(E[i].shape[1], W) for i in left]
        S = sum(sizes)
        send = torch.zeros(S, dtype=PACK, device=self._device())
        off = 0
        for i, size in zip(left, sizes):
            e, w = E[i], work[i]
            a, b = self._rows(e.shape[1])
            blk = send[off:off + size].view(e.k + int(e.fira), _cdiv(e.shape[1], W))
            blk[:e.k, :b - a].copy_(w["X"])
            if e.fira:
                blk[e.k, :b - a].copy_(w["c"].reshape(-1))
            off += size
        recv = torch.empty(W * S, dtype=PACK, device=send.device)
        self.comm.all_gather_into_tensor(recv, send)
        recv = recv.view(W, S)
        off = 0
        for i, size in zip(left, sizes):
            e, w = E[i], work[i]
            cw = _cdiv(e.shape[1], W)
            xs, cs = [], []
            for r in range(W):
                a, b = self._rows(e.shape[1], r)
                blk = recv[r, off:off + size].view(e.k + int(e.fira), cw)
                xs.append(blk[:e.k, :b - a])
                if e.fira:
                    cs.append(blk[e.k:, :b - a])
            dt = w["X"].dtype
            w["X"] = torch.cat(xs, dim=1).to(dt)  # (k, n)
            w["c"] = torch.cat(cs, dim=1).to(dt) if e.fira else None  # (1, n)
            off += size

    # ------------------------------------------------------------------ formula
    def expected_comm_bytes(self) -> int:
        """The docstring's formula for the coming step, from shapes, ``p.grad is not None`` and step counters
        (assumes finite gradients and successful SVDs)."""
        W, me = self.world_size, self.rank
        if W == 1:
            return 0
        E = self.entries
        has = [e.param.grad is not None for e in E]
        due = [e.low_rank and has[i] and int(self.opt.state[e.param]["step"]) % e.opts.update_proj_gap == 0
               for i, e in enumerate(E)]
        total = 4 * W * (2 * len(E) + sum(_cdiv(e.k, W) * e.shape[1] for i, e in enumerate(E)
                                          if e.kind == "right" and has[i] and not due[i]))
        left = [e for i, e in enumerate(E) if e.kind == "left" and has[i]]
        lr_bytes = 4 * W * sum((e.k + int(e.fira)) * _cdiv(e.shape[1], W) for e in left)
        total += 2 * lr_bytes
        total += 4 * sum(1 for i, e in enumerate(E) if e.fira and has[i])
        for i, e in enumerate(E):
            if not due[i]:
                continue
            m_me = self._rows(e.shape[0])[1] - self._rows(e.shape[0])[0]
            k_me = self._rows(e.k)[1] - self._rows(e.k)[0]
            if e.owner != me:
                total += 4 * (m_me * e.shape[1] + (k_me * e.shape[1] if e.kind == "right" else 0))
            else:
                for d in range(W):
                    if d == me:
                        continue
                    m_d = self._rows(e.shape[0], d)[1] - self._rows(e.shape[0], d)[0]
                    total += 4 * (1 + (e.k * e.shape[1] if e.kind == "right" else m_d * e.k))
        return total

    def comm_stats(self) -> dict[str, Any]:
        return self.comm.stats()
