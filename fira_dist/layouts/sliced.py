"""Fira on row slices: one step when each rank holds a contiguous range of every low-rank matrix.

Shared by FSDP2 (``row_sharded.py``: DTensor ``Shard(0)``, whole rows) and DeepSpeed ZeRO-3
(``flat_partition.py``: ranges of the flattened matrix, whole rows plus at most a partial row at each end).
Rank r holds elements [lo, hi) of a row-major (m, n) matrix, cut by ``plan.segments`` into a block of whole
rows and at most one partial row at each end (a "split row": held in parts by several ranks). k = min(rank, m,
n), f = 1 for Fira (GaLore: 0). Only low-rank things cross ranks; no rank ever holds another rank's gradient
(except the exact SVD at a refresh, gathered to the matrix's owner in bounded rounds).

Right projection, Q (k, n) stored by its rows (torch.chunk of k), gathered whole for the step:
  R_i = G_i Q^T per row i: whole rows are local; a split row's parts are summed (its partial R_i and ||G_i||^2,
  k + f numbers, in one all-reduce for all split rows of a chunk) on the rank holding its first element, which
  holds that row's moments (the moments (m, k) live by "owned rows"). The owner computes N_i, phi_i; phi, the
  residual and the update are row-local. The limiter's ||S||^2 of every Fira matrix of the chunk and the split
  rows' [N_i; phi_i] go in ONE all-reduce; then every holder of a row part forms X_i = alpha N_i - beta c_i R_i
  (c = phi / lim) and applies its columns: W_i[cols] -= step (X_i Q[:, cols] + c_i G_i[cols]).
Left projection, P (m, k) stored by touched rows (a rank keeps P_i for every row it holds part of):
  R = P^T G = sum over ranks of each rank's partial (k, n) (a partial row adds P_i x G_i[cols] to its columns),
  reduce-scattered by columns together with the columns' partial ||G||^2; the moments (k, n) live by columns;
  N, phi, the residual are column-local; after the norms all-reduce, [X; c] (k + f, n) is all-gathered and each
  rank applies P_rows X[:, cols] + c[cols] G_rows[cols] to its parts.

Collectives of one chunk of matrices (``plan.sliced_chunks`` keeps each chunk's buffers within the byte budget;
``plan.sliced_chunk_comm_bytes`` is the formula): Q all-gather, left reduce-scatter, split-row all-reduce, norms
all-reduce, left all-gather. Refresh (before the step, for matrices whose step % update_proj_gap == 0): exact
SVD: each due gradient's slices go point to point to its owner (LPT on m n min(m, n)), in rounds of
``plan.exact_refresh_rounds``; the owner computes exactly what one process computes and sends each rank its
piece of the new projector. Randomized: ``layouts.sketch`` (no gather). Results equal one process up to the
rounding of sums taken in another order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fira_dist.algorithm import (LowRankState, apply_direction_, bias_corrected_step_size, decay_, limiter,
                                 lowrank_adam_, lowrank_direction_parts, residual_coefficient, scaling_and_residual_sq,
                                 squared_norms)
from fira_dist.config import Algorithm, GroupOptions, ProjectorKind
from fira_dist.layouts import plan as P
from fira_dist.layouts.single import new_projector

PACK = torch.float32  # every collective of a step moves fp32


@dataclasses.dataclass
class SlicedMatrix:
    """One low-rank matrix in a sliced layout: its plan (shapes, every rank's range), its SVD owner, and this rank's
    derived pieces. Also serves as the ``task`` of ``single.new_projector`` (name, opts, side)."""

    name: str
    opts: GroupOptions
    plan: P.SliceShape
    owner: int  # SVD owner at exact refreshes
    me: int

    def __post_init__(self) -> None:
        m, n = self.plan.shape
        self.lo, self.hi = self.plan.ranges[self.me]
        self.segs = P.segments(self.lo, self.hi, n)
        self.own = P.owned_rows(self.lo, self.hi, n)
        self.touch = P.touched_rows(self.lo, self.hi, n)
        self.qrows = self.plan.q_rows(self.me)
        self.cols = self.plan.cols(self.me)
        self.split = self.plan.split()
        self.slot = {row: j for j, row in enumerate(self.split)}

    @property
    def side(self) -> str:
        return self.plan.side

    @property
    def shape(self) -> tuple[int, int]:
        return self.plan.shape

    @property
    def k(self) -> int:
        return self.plan.k

    @property
    def fira(self) -> bool:
        return self.plan.fira

    @property
    def f(self) -> int:
        return self.plan.f

    def local_shapes(self) -> dict[str, tuple[int, int]]:
        """Shapes of this rank's projector and moments."""
        m, n = self.shape
        if self.side == "right":
            return {"projector": (self.qrows[1] - self.qrows[0], n), "exp_avg": (self.own[1] - self.own[0], self.k)}
        return {"projector": (self.touch[1] - self.touch[0], self.k), "exp_avg": (self.k, self.cols[1] - self.cols[0])}


@dataclasses.dataclass
class Work:
    """One matrix's step on this rank: local state tensors, its local gradient and weights (1-D, hi - lo
    elements, contiguous), and the step number after increment. Scratch fields are filled by the chunk."""

    mat: SlicedMatrix
    st: LowRankState
    grad: torch.Tensor
    target: torch.Tensor
    t: int
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)


def seg_view(x: torch.Tensor, mat: SlicedMatrix, seg: tuple[int, int, int, int]) -> torch.Tensor:
    """The (rows, cols) view of a local 1-D range for one segment (contiguous: whole rows or one row part)."""
    r0, r1, c0, c1 = seg
    n = mat.shape[1]
    start = r0 * n + c0 - mat.lo
    return x[start:start + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)


def _adam(R: torch.Tensor, st: LowRankState, o: GroupOptions) -> torch.Tensor:
    return lowrank_adam_(R, st.exp_avg, st.exp_avg_sq, o) if R.numel() else torch.empty_like(R)


# ------------------------------------------------------------------------------------------------ the step
def step_chunk(comm: Any, works: list[Work]) -> None:
    """One Fira / GaLore step for a chunk of matrices (every rank passes the same matrices in the same order)."""
    if not works:
        return
    dev = works[0].target.device
    right = [w for w in works if w.mat.side == "right"]
    left = [w for w in works if w.mat.side == "left"]
    if right:
        _gather_q(comm, right, dev)
    for w in right:
        _right_partials(w)
    for w in left:
        _left_partials(w)
    split = [w for w in right if w.mat.split]
    if split:
        _sum_split_rows(comm, split, dev)
    if left:
        _reduce_scatter_left(comm, left, dev)
    for w in right:
        _right_owned(w)
    for w in works:  # low-rank Adam and the scaling terms on what this rank owns (rows / columns)
        s, o = w.scratch, w.mat.opts
        s["N"] = _adam(s["R"], w.st, o)
        if w.mat.fira:
            s["phi"], s["s_sq"] = scaling_and_residual_sq(None, s["R"], s["N"], w.mat.side, residual_coefficient(o),
                                                          g_sq=s["g_sq"])
    _norms_and_split_directions(comm, works, dev)
    for w in works:
        s = w.scratch
        s["X"], s["c"] = lowrank_direction_parts(s["N"], s["R"], s.get("phi"), s.get("lim"), w.mat.opts)
    if left:
        _all_gather_left(comm, left, dev)
    for w in works:
        _apply(w)


def _gather_q(comm: Any, right: list[Work], dev: torch.device) -> None:
    """All-gather every right matrix's Q shards (padded to ceil(k / W) rows): each rank gets Q (k, n)."""
    W = comm.world_size
    if W == 1:
        for w in right:
            w.scratch["Q"] = w.st.projector
        return
    sizes = [w.mat.plan.q_gather_numel() for w in right]
    send = torch.zeros(sum(sizes), dtype=PACK, device=dev)
    off = 0
    for w, size in zip(right, sizes):
        q = w.st.projector  # (k_me, n)
        send[off:off + q.numel()].copy_(q.reshape(-1))
        off += size
    recv = torch.empty(W * send.numel(), dtype=PACK, device=dev).view(W, -1)
    comm.all_gather_into_tensor(recv.view(-1), send)
    off = 0
    for w, size in zip(right, sizes):
        n = w.mat.shape[1]
        parts = []
        for r in range(W):
            a, b = w.mat.plan.q_rows(r)
            parts.append(recv[r, off:off + (b - a) * n].view(b - a, n))
        w.scratch["Q"] = torch.cat(parts).to(w.st.projector.dtype)  # (k, n)
        off += size


def _right_partials(w: Work) -> None:
    """Per segment: R rows (rows, k) = G_seg Q[:, cols]^T, and ||G_seg||^2 per row (Fira); partial on split rows."""
    s, mat = w.scratch, w.mat
    dt = w.st.exp_avg.dtype
    s["G"] = [seg_view(w.grad, mat, seg).to(dt) for seg in mat.segs]
    Q = s["Q"]
    s["Rseg"] = [G @ Q[:, c0:c1].T for G, (_, _, c0, c1) in zip(s["G"], mat.segs)]
    if mat.fira:
        s["gseg"] = [squared_norms(G, -1) for G in s["G"]]


def _left_partials(w: Work) -> None:
    """This rank's part of P^T G (k, n) and of the column norms ||G[:, j]||^2 (1, n)."""
    s, mat = w.scratch, w.mat
    dt = w.st.exp_avg.dtype
    k, n = mat.k, mat.shape[1]
    s["G"] = [seg_view(w.grad, mat, seg).to(dt) for seg in mat.segs]
    Pl = w.st.projector  # (touched rows, k)
    t0 = mat.touch[0]
    partial = torch.zeros(k, n, dtype=dt, device=w.target.device)
    g_cols = torch.zeros(1, n, dtype=dt, device=w.target.device) if mat.fira else None
    for G, (r0, r1, c0, c1) in zip(s["G"], mat.segs):
        partial[:, c0:c1].addmm_(Pl[r0 - t0:r1 - t0].T, G)
        if g_cols is not None:
            g_cols[:, c0:c1].add_(squared_norms(G, -2))
    s["partial"], s["g_cols_partial"] = partial, g_cols


def _split_parts(w: Work) -> list[tuple[int, int]]:
    """(segment index, split row) of this rank's segments that are parts of split rows."""
    n = w.mat.shape[1]
    return [(j, r0) for j, (r0, r1, c0, c1) in enumerate(w.mat.segs) if r0 in w.mat.slot and (c0 > 0 or c1 < n)]


def _sum_split_rows(comm: Any, split: list[Work], dev: torch.device) -> None:
    """One all-reduce of every split row's partial [R_i; ||G_i||^2] (k + f each): every rank gets the sums."""
    sizes = [w.mat.plan.split_numel() for w in split]
    buf = torch.zeros(sum(sizes), dtype=PACK, device=dev)
    off = 0
    for w, size in zip(split, sizes):
        kf = w.mat.k + w.mat.f
        view = buf[off:off + size].view(-1, kf)
        for j, row in _split_parts(w):
            view[w.mat.slot[row], :w.mat.k].copy_(w.scratch["Rseg"][j][0])
            if w.mat.fira:
                view[w.mat.slot[row], w.mat.k].copy_(w.scratch["gseg"][j][0, 0])
        w.scratch["split_sum"] = view
        off += size
    comm.all_reduce(buf)


def _right_owned(w: Work) -> None:
    """R and ||G||^2 of the rows this rank owns (its whole rows, then a split row that starts in its range)."""
    s, mat = w.scratch, w.mat
    n, dt = mat.shape[1], w.st.exp_avg.dtype
    Rs, gs = [], []
    for j, (r0, r1, c0, c1) in enumerate(mat.segs):
        if c0 != 0:
            continue  # a row part that starts on another rank
        if c1 == n and r0 not in mat.slot:
            Rs.append(s["Rseg"][j])
            if mat.fira:
                gs.append(s["gseg"][j])
        else:  # an owned split row: the sum over its holders
            kf = s["split_sum"][mat.slot[r0]]
            Rs.append(kf[:mat.k].view(1, -1).to(dt))
            if mat.fira:
                gs.append(kf[mat.k:].view(1, 1).to(dt))
    s["R"] = torch.cat(Rs) if Rs else torch.zeros(0, mat.k, dtype=dt, device=w.target.device)
    s["g_sq"] = (torch.cat(gs) if gs else torch.zeros(0, 1, dtype=dt, device=w.target.device)) if mat.fira else None


def _reduce_scatter_left(comm: Any, left: list[Work], dev: torch.device) -> None:
    """Sum the partial P^T G (and column norms) over ranks; rank r keeps its columns: R (k, n_r), ||G||^2 (1, n_r)."""
    W = comm.world_size
    sizes = [w.mat.plan.left_numel() for w in left]
    S = sum(sizes)
    inp = torch.zeros(W, S, dtype=PACK, device=dev)
    for d in range(W):
        off = 0
        for w, size in zip(left, sizes):
            mat, s = w.mat, w.scratch
            a, b = mat.plan.cols(d)
            blk = inp[d, off:off + size].view(mat.k + mat.f, -1)
            blk[:mat.k, :b - a].copy_(s["partial"][:, a:b])
            if mat.fira:
                blk[mat.k, :b - a].copy_(s["g_cols_partial"][0, a:b])
            off += size
    out = torch.empty(S, dtype=PACK, device=dev)
    comm.reduce_scatter_tensor(out, inp.view(-1))
    off = 0
    for w, size in zip(left, sizes):
        mat, s = w.mat, w.scratch
        a, b = mat.cols
        dt = w.st.exp_avg.dtype
        blk = out[off:off + size].view(mat.k + mat.f, -1)
        s["R"] = blk[:mat.k, :b - a].to(dt).contiguous()  # (k, n_me)
        s["g_sq"] = blk[mat.k:, :b - a].to(dt) if mat.fira else None  # (1, n_me)
        del s["partial"], s["g_cols_partial"]
        off += size


def _norms_and_split_directions(comm: Any, works: list[Work], dev: torch.device) -> None:
    """ONE all-reduce of the chunk's ||S||^2 (one per Fira matrix) and of the split rows' [N_i; phi_i] (written by
    each row's owner); then every rank has each Fira matrix's limiter and every split row's pieces of X."""
    fira = [w for w in works if w.mat.fira]
    split = [w for w in works if w.mat.side == "right" and w.mat.split]
    sizes = [w.mat.plan.split_numel() for w in split]
    buf = torch.zeros(len(fira) + sum(sizes), dtype=PACK, device=dev)
    for j, w in enumerate(fira):
        buf[j] = w.scratch["s_sq"]
    off = len(fira)
    for w, size in zip(split, sizes):
        mat, s = w.mat, w.scratch
        view = buf[off:off + size].view(-1, mat.k + mat.f)
        o0, o1 = mat.own
        for row in mat.split:
            if o0 <= row < o1:
                view[mat.slot[row], :mat.k].copy_(s["N"][row - o0])
                if mat.fira:
                    view[mat.slot[row], mat.k].copy_(s["phi"][row - o0, 0])
        s["split_dir"] = view
        off += size
    if buf.numel():
        comm.all_reduce(buf)
    norms = buf[:len(fira)].sqrt()
    for j, w in enumerate(fira):
        st = w.st
        lim, new_norm = limiter(norms[j].to(st.limiter_norm.dtype), st.limiter_norm, w.mat.opts.limiter_gamma,
                                has_prev=w.t > 1)
        st.limiter_norm.copy_(new_norm)
        w.scratch["lim"] = lim
    for w in split:  # X and c of the split rows this rank holds a part of but does not own
        mat, s = w.mat, w.scratch
        o0, o1 = mat.own
        dt = w.st.exp_avg.dtype
        s["X_rows"] = {}
        for j, row in _split_parts(w):
            if o0 <= row < o1:
                continue
            v = s["split_dir"][mat.slot[row]]
            N_i = v[:mat.k].view(1, -1).to(dt).clone()
            phi_i = v[mat.k:].view(1, 1).to(dt) if mat.fira else None
            R_i = s["split_sum"][mat.slot[row], :mat.k].view(1, -1).to(dt)
            s["X_rows"][row] = lowrank_direction_parts(N_i, R_i, phi_i, s.get("lim"), mat.opts)


def _all_gather_left(comm: Any, left: list[Work], dev: torch.device) -> None:
    """All-gather X (k, n_r) and c (1, n_r) of every left matrix: every rank gets X (k, n) and c (1, n)."""
    W = comm.world_size
    sizes = [w.mat.plan.left_numel() for w in left]
    send = torch.zeros(sum(sizes), dtype=PACK, device=dev)
    off = 0
    for w, size in zip(left, sizes):
        mat, s = w.mat, w.scratch
        a, b = mat.cols
        blk = send[off:off + size].view(mat.k + mat.f, -1)
        blk[:mat.k, :b - a].copy_(s["X"])
        if mat.fira:
            blk[mat.k, :b - a].copy_(s["c"].reshape(-1))
        off += size
    recv = torch.empty(W * send.numel(), dtype=PACK, device=dev).view(W, -1)
    comm.all_gather_into_tensor(recv.view(-1), send)
    off = 0
    for w, size in zip(left, sizes):
        mat, s = w.mat, w.scratch
        xs, cs = [], []
        for r in range(W):
            a, b = mat.plan.cols(r)
            blk = recv[r, off:off + size].view(mat.k + mat.f, -1)
            xs.append(blk[:mat.k, :b - a])
            if mat.fira:
                cs.append(blk[mat.k:, :b - a])
        dt = s["X"].dtype
        s["X"] = torch.cat(xs, dim=1).to(dt)  # (k, n)
        s["c"] = torch.cat(cs, dim=1).to(dt) if mat.fira else None  # (1, n)
        off += size


def _apply(w: Work) -> None:
    """W_seg -= step (back(X)[seg] + c[seg] G_seg) for each of this rank's segments, then decoupled decay."""
    s, mat = w.scratch, w.mat
    scale = -bias_corrected_step_size(mat.opts, w.t)
    if mat.side == "right":
        Q, o0, o1 = s["Q"], mat.own[0], mat.own[1]
        for G, seg in zip(s["G"], mat.segs):
            r0, r1, c0, c1 = seg
            if o0 <= r0 < o1:
                X, c = s["X"][r0 - o0:r1 - o0], (None if s["c"] is None else s["c"][r0 - o0:r1 - o0])
            else:
                X, c = s["X_rows"][r0]
            apply_direction_(seg_view(w.target, mat, seg), G, X, c, Q[:, c0:c1], "right", scale)
    else:
        Pl, t0 = w.st.projector, mat.touch[0]
        for G, seg in zip(s["G"], mat.segs):
            r0, r1, c0, c1 = seg
            c = None if s["c"] is None else s["c"][:, c0:c1]
            apply_direction_(seg_view(w.target, mat, seg), G, s["X"][:, c0:c1], c, Pl[r0 - t0:r1 - t0], "left", scale)
    decay_(w.target, mat.opts)
    w.scratch.clear()


# ------------------------------------------------------------------------------------------------ refresh
def projector_piece(mat: SlicedMatrix, proj: torch.Tensor, r: int) -> torch.Tensor:
    """Rank r's piece of a whole projector: Q's rows chunk (right) or P's touched rows (left)."""
    if mat.side == "right":
        a, b = mat.plan.q_rows(r)
        return proj[a:b]
    lo, hi = mat.plan.ranges[r]
    t0, t1 = P.touched_rows(lo, hi, mat.shape[1])
    return proj[t0:t1]


def refresh_exact(opt: Any, comm: Any, works: list[Work], budget: int) -> list[bool]:
    """Exact SVD refreshes: each due gradient's slices go to its owner (point to point, in rounds bounded by the
    budget), the owner computes exactly what one process would, and sends each rank its projector piece.
    ``works[i].t`` is the step BEFORE increment. Returns, per work, whether it takes its step (False: the first
    projector failed on its owner). A failed later refresh keeps every rank's old piece (one status all-reduce
    per round tells all)."""
    W, me = comm.world_size, comm.rank
    go = [True] * len(works)
    if not works:
        return go
    dev = works[0].target.device
    shapes = [w.mat.plan for w in works]
    for rnd in P.exact_refresh_rounds(shapes, [w.mat.owner for w in works], budget):
        sends, recvs, full = [], [], {}
        for i in rnd:
            w = works[i]
            mat = w.mat
            if mat.owner == me:
                G = torch.empty(mat.shape[0] * mat.shape[1], dtype=PACK, device=dev)
                G[mat.lo:mat.hi].copy_(w.grad)
                for q, (lo, hi) in enumerate(mat.plan.ranges):
                    if q != me and hi > lo:
                        recvs.append((G[lo:hi], q))
                full[i] = G
            elif mat.hi > mat.lo:
                sends.append((w.grad.to(PACK).contiguous(), mat.owner))
        comm.exchange(sends, recvs)
        status = torch.zeros(len(rnd), dtype=PACK, device=dev)
        new: dict[int, torch.Tensor] = {}
        for j, i in enumerate(rnd):
            if i in full:
                w = works[i]
                proj = new_projector(opt, w.mat, w.t, full.pop(i).view(w.mat.shape).to(w.grad.dtype))
                if proj is None:
                    status[j] = 1.0
                else:
                    new[i] = proj
        comm.all_reduce(status)
        sends, recvs, landing = [], [], []
        for j, i in enumerate(rnd):
            w = works[i]
            mat = w.mat
            if float(status[j]) != 0.0:
                go[i] = w.t > 0  # keep the old projector; at step 0 there is none: skip the step
                continue
            if mat.owner == me:
                proj = new[i]
                for q in range(W):
                    piece = projector_piece(mat, proj, q)
                    if q == me:
                        w.st.projector.copy_(piece)
                    elif piece.numel():
                        sends.append((piece.to(PACK).contiguous(), q))
            elif w.st.projector.numel():
                buf = torch.empty(w.st.projector.shape, dtype=PACK, device=dev)
                recvs.append((buf, mat.owner))
                landing.append((w.st.projector, buf))
        comm.exchange(sends, recvs)
        for dst, buf in landing:
            dst.copy_(buf)
    return go


def uses_sketch(mat: SlicedMatrix) -> bool:
    """Randomized refresh (layouts.sketch) for this matrix: asked for, and k < min(m, n) (else the exact SVD, as
    projector.compute_projector decides for one process)."""
    return mat.opts.projector == ProjectorKind.RANDOMIZED and mat.k < min(mat.shape)


def check_supported(name: str, opts: GroupOptions, side: str, shape: tuple[int, int], layout: str) -> None:
    """The reference's per-row scaling of a left projection with square N cannot be computed on row slices."""
    from fira_dist.algorithm import is_left_square_quirk
    from fira_dist.projector import lowrank_shape

    if opts.algorithm == Algorithm.FIRA and is_left_square_quirk(side, lowrank_shape(shape, opts.rank, side), shape):
        raise ValueError(f"{name}: a left projection of a square matrix with rank >= its size takes the reference's "
                         f"per-row scaling, which the {layout} layout does not implement; use proj_type='std' or a "
                         "smaller rank")
