"""The randomized projector on row slices: a range finder whose every product is a sum over rows, so no rank
ever sees another rank's gradient; only (m + n) x ell numbers per matrix cross ranks.

The math is ``projector._randomized_projector``'s, step by step (same test matrix, same seed rule, same sign
convention), so the result equals one process's up to the rounding of sums taken across ranks. With A the
matrix whose top-k left singular vectors are wanted (A = G for a left projection, G^T for a right one), ell =
min(k + oversample, m, n), Omega (b, ell) from the seeded generator (every rank draws it whole):

    right (A = G^T, a = n):  Y = G^T Omega      (n, ell)   sum over rows: all-reduce
      power iteration:       Z = G orth(Y)      (m, ell)   row-local; split rows' parts: all-reduce (s, ell)
                             Y = G^T Z          (n, ell)   all-reduce
                             Qb = qr(Y);  H = G Qb (m, ell) row-local (split rows: all-reduce), Gram = H^T H
                             (ell, ell) summed over owned rows: all-reduce; U = Qb eigvecs(Gram)[:, top k]
    left (A = G, a = m):     Y = G Omega        (m, ell)   each rank fills its rows: all-reduce
      power iteration:       V = G^T orth(Y)    (n, ell)   all-reduce;  Y = G V  (m, ell)  all-reduce
                             Qb = qr(Y);  B = Qb^T G (ell, n) all-reduce;  U = Qb eigvecs(B B^T)[:, top k]

Everything between the all-reduces (orth, qr, eigh) runs on identical inputs on every rank, so every rank
holds the same U; it keeps its piece (Q's rows or P's touched rows). All matrices of a chunk share each
phase's all-reduce (one collective per phase, ``run_all_reduce_programs``); ``plan.sketch_comm_bytes`` is the
formula.
"""

from __future__ import annotations

from typing import Any, Generator

import torch

from fira_dist.layouts.plan import sketch_dims
from fira_dist.layouts.single import projector_seeds
from fira_dist.layouts.sliced import PACK, SlicedMatrix, Work, projector_piece, seg_view
from fira_dist.projector import OVERSAMPLE, POWER_ITERS, fix_signs_, orthonormalize_cheaply

Program = Generator[torch.Tensor, None, "torch.Tensor | None"]


def run_all_reduce_programs(comm: Any, programs: list[Program]) -> list[Any]:
    """Drive generators that each yield tensors to be summed across ranks (in place) and finally return a result:
    at each phase the yielded tensors of all programs still running go in ONE all-reduce. Every rank runs the
    same programs in the same order, so the concatenations match."""
    results: list[Any] = [None] * len(programs)
    current: dict[int, torch.Tensor] = {}

    def advance(i: int, first: bool) -> None:
        try:
            current[i] = next(programs[i]) if first else programs[i].send(None)
        except StopIteration as stop:
            results[i] = stop.value
            current.pop(i, None)

    for i in range(len(programs)):
        advance(i, True)
    while current:
        idx = sorted(current)
        flat = torch.cat([current[i].reshape(-1).to(PACK) for i in idx])
        if flat.numel():
            comm.all_reduce(flat)
        off = 0
        for i in idx:
            t = current[i]
            t.copy_(flat[off:off + t.numel()].view(t.shape))
            off += t.numel()
        for i in idx:
            advance(i, False)
    return results


def _omega(mat: SlicedMatrix, step: int, b: int, ell: int, dev: torch.device) -> torch.Tensor:
    seed, _ = projector_seeds(mat.name, step)
    gen = torch.Generator(device=dev).manual_seed(seed)
    return torch.randn(b, ell, device=dev, dtype=torch.float32, generator=gen)  # as one process draws it


def _top(Qb: torch.Tensor, gram: torch.Tensor, k: int, mat: SlicedMatrix) -> torch.Tensor:
    _, W = torch.linalg.eigh(gram)
    U = Qb @ W[:, -k:].flip(-1)  # (a, k)
    fix_signs_(U, projector_seeds(mat.name, 0)[1])
    return U


def _right_program(w: Work, q: int) -> Program:
    mat, n = w.mat, w.mat.shape[1]
    _, m_, ell = sketch_dims(mat.plan, OVERSAMPLE)
    dev = w.target.device
    Gs = [seg_view(w.grad, mat, seg).float() for seg in mat.segs]
    omega = _omega(mat, w.t, m_, ell, dev)  # (m, ell): one row per row of G
    split_parts = [(j, seg[0]) for j, seg in enumerate(mat.segs) if seg[0] in mat.slot and (seg[2] > 0 or seg[3] < n)]

    def rows_times(Y: torch.Tensor) -> Program:
        """G Y per segment (rows, ell), with the split rows' parts summed across ranks."""
        parts = [G @ Y[c0:c1] for G, (_, _, c0, c1) in zip(Gs, mat.segs)]
        buf = torch.zeros(len(mat.split), ell, dtype=PACK, device=dev)
        for j, row in split_parts:
            buf[mat.slot[row]] = parts[j][0]
        yield buf
        for j, row in split_parts:
            parts[j] = buf[mat.slot[row]].view(1, -1)
        return parts

    Y = torch.zeros(n, ell, dtype=PACK, device=dev)
    for G, (r0, r1, c0, c1) in zip(Gs, mat.segs):
        Y[c0:c1].addmm_(G.T, omega[r0:r1])
    yield Y
    for _ in range(q):
        Z = yield from rows_times(orthonormalize_cheaply(Y))
        Y = torch.zeros(n, ell, dtype=PACK, device=dev)
        for G, Zj, (_, _, c0, c1) in zip(Gs, Z, mat.segs):
            Y[c0:c1].addmm_(G.T, Zj)
        yield Y
    Qb, _ = torch.linalg.qr(Y)  # (n, ell)
    H = yield from rows_times(Qb)
    gram = torch.zeros(ell, ell, dtype=PACK, device=dev)
    for Hj, (r0, r1, c0, c1) in zip(H, mat.segs):
        if c0 == 0:  # a whole row, or a split row that starts here: counted once, by its owner
            gram.addmm_(Hj.T, Hj)
    yield gram
    return _top(Qb, gram, mat.k, mat).T.contiguous()  # Q (k, n)


def _left_program(w: Work, q: int) -> Program:
    mat = w.mat
    m, n = mat.shape
    _, _, ell = sketch_dims(mat.plan, OVERSAMPLE)
    dev = w.target.device
    Gs = [seg_view(w.grad, mat, seg).float() for seg in mat.segs]
    omega = _omega(mat, w.t, n, ell, dev)  # (n, ell): one row per column of G

    def times(X: torch.Tensor) -> torch.Tensor:  # G X (m, ell), this rank's part
        Y = torch.zeros(m, ell, dtype=PACK, device=dev)
        for G, (r0, r1, c0, c1) in zip(Gs, mat.segs):
            Y[r0:r1].addmm_(G, X[c0:c1])
        return Y

    Y = times(omega)
    yield Y
    for _ in range(q):
        O = orthonormalize_cheaply(Y)
        V = torch.zeros(n, ell, dtype=PACK, device=dev)
        for G, (r0, r1, c0, c1) in zip(Gs, mat.segs):
            V[c0:c1].addmm_(G.T, O[r0:r1])
        yield V
        Y = times(V)
        yield Y
    Qb, _ = torch.linalg.qr(Y)  # (m, ell)
    B = torch.zeros(ell, n, dtype=PACK, device=dev)
    for G, (r0, r1, c0, c1) in zip(Gs, mat.segs):
        B[:, c0:c1].addmm_(Qb[r0:r1].T, G)
    yield B
    return _top(Qb, B @ B.T, mat.k, mat)  # P (m, k)


def _guarded(program: Program) -> Program:
    """A program whose final eigensolve may fail (identically on every rank): None instead of an exception."""
    try:
        return (yield from program)
    except RuntimeError:  # torch.linalg.LinAlgError
        return None


def refresh_randomized(opt: Any, comm: Any, works: list[Work]) -> list[bool]:
    """Randomized refreshes of ``works`` (``t`` = the step before increment), all phases batched. Each rank keeps
    its piece of each new projector. Returns, per work, whether it takes its step (False: its first projector
    failed). A failure warns once, naming the parameter, as one process does."""
    programs = [_guarded(_right_program(w, POWER_ITERS) if w.mat.side == "right" else _left_program(w, POWER_ITERS))
                for w in works]
    go = []
    for w, proj in zip(works, run_all_reduce_programs(comm, programs)):
        if proj is None:
            keep = "keeping the previous projector" if w.t > 0 else "skipping this matrix's step"
            opt.warn_once(f"svd:{w.mat.name}", f"projector refresh of {w.mat.name} at step {w.t} failed (the sketch's "
                          f"eigensolver did not converge); {keep}")
            go.append(w.t > 0)
            continue
        w.st.projector.copy_(projector_piece(w.mat, proj, comm.rank))
        go.append(True)
    return go
