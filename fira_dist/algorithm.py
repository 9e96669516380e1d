"""The Fira / GaLore / Adam math on local tensors. Nothing here knows about ranks or collectives.

Notation for one weight with gradient G of shape (m, n), projector P (see projector.py), k = min(rank, m, n):
- right projection: R = G Q^T (m, k), back(X) = X Q; the scaling factor phi is per row of G: (m, 1)
- left projection:  R = P^T G (k, n), back(X) = P X; phi is per column of G: (1, n)

One step, as the reference (fira 1.0.2) computes it:
    m, v  <- Adam moments of R;  N = m / (sqrt(v) + eps)
    phi   = ||N||_axis / (||R||_axis + 1e-8)
    S     = (G - beta * back(R)) * phi          beta = alpha ("reference") or 1 ("orthogonal")
    lim   = max(||S|| / (prev + 1e-8), gamma) / gamma  (1 on the first step);  S /= lim;  prev = ||S||
    p    -= step_size * (alpha * back(N) + S);  p -= lr * wd * p

Because phi is per row (right) or per column (left) it commutes with back(), so with c = phi / lim:
    alpha * back(N) + S = back(alpha * N - beta * c * R) + c * G
which needs two (m x n x k) matrix products per step (R = project(G) and back(X)) instead of three.
||S|| is then computed without forming S, from per-row (per-column) norms:
    ||S||^2 = sum_i phi_i^2 * (||G_i||^2 - (2 beta - beta^2) ||R_i||^2)
(exact for an orthonormal projector; each term clamped at 0 against rounding). The per-row form is what
lets a row-sharded layout compute ||S||^2 locally and finish it with one all-reduce of a scalar.

Reference quirk kept: for a left projection whose low-rank N is square (k == n, i.e. rank >= n and m == n)
the reference takes phi per ROW of G. That does not commute with back(), so that case runs the explicit
three-product form. (With m > n the reference crashes on a broadcast; we use phi per column there.)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fira_dist.config import Algorithm, GroupOptions, Residual
from fira_dist.projector import lowrank_shape

NORM_EPS = 1e-8  # the reference's epsilon in phi and in the limiter

# Matrices of at most this many numbers take the stacked form (batched_update_: bmm on (B, m, n) tensors),
# alone or with other same-shape matrices; larger ones take the 2-D form (mm, no stacking copies). The form
# depends on the size only, so a matrix gets the same bits whether a layout updates it alone or batched.
# There per-operation overhead outweighs the stacking copies; `python benchmarks/optimizer_step.py
# --batching` measures where (see the README).
STACKED_MAX_NUMEL = 2**17  # 131072: 256 x 256 and 192 x 512 stacked, 256 x 688 not


def bias_corrected_step_size(o: GroupOptions, step: int) -> float:
    """lr * sqrt(1 - beta2^t) / (1 - beta1^t) (or lr without correct_bias); step t counts from 1."""
    if not o.correct_bias:
        return o.lr
    return o.lr * math.sqrt(1.0 - o.beta2**step) / (1.0 - o.beta1**step)


def adam_normalized_(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, o: GroupOptions) -> torch.Tensor:
    """Update the moments in place (same op order as the reference) and return N = m / (sqrt(v) + eps).

    Seven elementwise kernels: for tensors that a layout may split anywhere (plain Adam's rows or flat slices),
    where every element must get the same bits whatever the split. Low-rank moments, always updated a whole
    matrix at a time, take lowrank_adam_ instead.
    """
    exp_avg.mul_(o.beta1).add_(g, alpha=1.0 - o.beta1)
    exp_avg_sq.mul_(o.beta2).addcmul_(g, g, value=1.0 - o.beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(o.eps)


# A step count at which torch's fused Adam kernel has bias corrections of exactly 1 (beta^step underflows to 0
# in float64 for any beta <= _FUSED_MAX_BETA), so that it computes the reference's N; the bias correction is
# applied in the step size (bias_corrected_step_size), as the reference does.
_UNCORRECTED_STEP = 2.0**40
_FUSED_MAX_BETA = 1.0 - 1e-9
_step_tensors: dict[torch.device, torch.Tensor] = {}


def _uncorrected_step(device: torch.device) -> torch.Tensor:
    t = _step_tensors.get(device)
    if t is None:  # float32 on the tensors' device, as the CUDA kernel requires
        t = _step_tensors[device] = torch.tensor(_UNCORRECTED_STEP, dtype=torch.float32, device=device)
    return t


def lowrank_adam_(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, o: GroupOptions,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """adam_normalized_ for one matrix's whole low-rank moments, in one fused kernel: returns N (into out).

    torch._fused_adam_ with lr = -1 and bias corrections of 1, on a zeroed N: N = m / (sqrt(v) + eps) as the
    reference (v bitwise as adam_normalized_; m as torch's lerp, within an ulp). One pass instead of seven
    kernels and three temporaries: 0.46-0.78x the time for LLaMA-60M's low-rank moments on a 2-core CPU, and
    half with an allocator that reuses freed pages (`python benchmarks/optimizer_step.py --moments`). The
    kernel takes the last numel % 8 (or 16) elements of a call on a scalar path, so a matrix gets the same bits
    only if it always gets a call of its own: never pass several matrices stacked in one tensor.

    g, exp_avg, exp_avg_sq, out: one shape, dtype and device; g and out may be views (g is copied if not
    contiguous, as the kernel reads raw memory); the moments must be contiguous.
    """
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("lowrank_adam_: the moments must be contiguous tensors")
    if exp_avg.device.type not in ("cpu", "cuda") or max(o.beta1, o.beta2) > _FUSED_MAX_BETA:
        n = adam_normalized_(g, exp_avg, exp_avg_sq, o)  # no fused kernel here, or no underflow to rely on
        return n if out is None else out.copy_(n)
    g = g.contiguous()
    n = torch.zeros_like(exp_avg) if out is None or not out.is_contiguous() else out.zero_()
    torch._fused_adam_([n], [g], [exp_avg], [exp_avg_sq], [], [_uncorrected_step(exp_avg.device)], lr=-1.0,
                       beta1=o.beta1, beta2=o.beta2, weight_decay=0.0, eps=o.eps, amsgrad=False, maximize=False)
    if out is not None and out is not n:
        out.copy_(n)
        return out
    return n


def project(G: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """(m, n) -> (m, k) for 'right' (G Q^T), (k, n) for 'left' (P^T G); stacked (B, ...) alike (bmm)."""
    return G @ P.mT if side == "right" else P.mT @ G


def project_back(X: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """(m, k) or (k, n) -> (m, n)."""
    return X @ P if side == "right" else P @ X


def _axis(side: str) -> int:
    # Norms along the projected dimension: per row of G for 'right' (dim -1), per column for 'left' (dim -2);
    # negative so that stacked (B, m, n) tensors work too.
    return -1 if side == "right" else -2


# Rows per chunk (about this many numbers) when squared norms are summed down the columns (see squared_norms).
_COLUMN_NORM_CHUNK_NUMEL = 2**18


def squared_norms(T: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared 2-norms of T (..., m, n) along dim -1 (per row: (..., m, 1)) or -2 (per column: (..., 1, n)).

    Per row: vector_norm, squared. Per column: sums of squares over chunks of rows. torch's vector_norm down a
    strided dimension is 10-30x slower on CPU than this (0.24 ms against 2.5 ms for 768 x 2048; 27 ms against
    181 ms for 4096 x 11008), and a chunk's square is a small temporary, never an (m, n) one.
    """
    if dim in (-1, T.dim() - 1):
        return torch.linalg.vector_norm(T, dim=-1, keepdim=True).square()
    if dim not in (-2, T.dim() - 2):
        raise ValueError(f"squared_norms: dim must be -1 or -2 (of a {T.dim()}-d tensor), got {dim}")
    rows = max(1, _COLUMN_NORM_CHUNK_NUMEL // max(1, T.shape[-1]))
    first, *rest = T.split(rows, dim=-2)  # at least one chunk, even with no rows
    out = first.square().sum(dim=-2, keepdim=True)
    for chunk in rest:
        out.add_(chunk.square().sum(dim=-2, keepdim=True))
    return out


def residual_coefficient(o: GroupOptions) -> float:
    """beta: the multiple of back(R) removed from G in the residual."""
    return o.alpha if o.residual == Residual.REFERENCE else 1.0


def scaling_and_residual_terms(
    G: torch.Tensor | None, R: torch.Tensor, N: torch.Tensor, side: str, beta: float,
    g_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """phi (m, 1) or (1, n) and the per-row (per-column) terms whose sum is ||S||^2, same shape as phi.

    G (m, n) in the low-rank dtype; R, N (m, k) or (k, n); or all stacked (B, ...). No collectives. g_sq: the
    squared norms of G along the projected dimension ((m, 1) / (1, n)) when the caller has them instead of G
    (a column-sharded left projection sums them across ranks); G is then not read.
    """
    ax = _axis(side)
    if ax == -1:  # per row: norms directly (one kernel each)
        r_norm = torch.linalg.vector_norm(R, dim=-1, keepdim=True)  # (m, 1)
        phi = torch.linalg.vector_norm(N, dim=-1, keepdim=True).div_(r_norm + NORM_EPS)
        r_sq = r_norm.square_()
    else:  # per column: from squared norms (see squared_norms)
        r_sq = squared_norms(R, ax)  # (1, n)
        phi = squared_norms(N, ax).sqrt_().div_(r_sq.sqrt().add_(NORM_EPS))
    if g_sq is None:
        g_sq = squared_norms(G, ax)  # no (m, n) temporary
    res = torch.sub(g_sq, r_sq, alpha=2.0 * beta - beta * beta).clamp_(min=0.0)
    return phi, res.mul_(phi).mul_(phi)


def scaling_and_residual_sq(
    G: torch.Tensor | None, R: torch.Tensor, N: torch.Tensor, side: str, beta: float,
    g_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """phi and the local part of ||S||^2 (0-d), for the rows/columns this process holds (see
    scaling_and_residual_terms)."""
    phi, terms = scaling_and_residual_terms(G, R, N, side, beta, g_sq)
    return phi, terms.sum()


def limiter(
    s_norm: torch.Tensor, prev: torch.Tensor, gamma: float | None, has_prev: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm-growth limiter: (divisor lim (0-d), the norm to store (0-d)). No host sync."""
    if gamma is None or not has_prev:
        return torch.ones_like(s_norm), s_norm
    lim = torch.clamp(s_norm / (prev + NORM_EPS), min=gamma) / gamma
    return lim, s_norm / lim


def lowrank_direction_parts(
    N: torch.Tensor, R: torch.Tensor, phi: torch.Tensor | None, lim: torch.Tensor | None, o: GroupOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """X (low-rank shape, in N's storage: N is overwritten) and c (phi / lim, or None for GaLore) with
    direction = back(X) + c * G."""
    if o.algorithm == Algorithm.GALORE:
        return N.mul_(o.alpha), None
    c = phi / lim
    X = N.mul_(o.alpha).addcmul_(c, R, value=-residual_coefficient(o))  # in place: N is not needed after
    return X, c


def apply_direction_(
    target: torch.Tensor,
    G: torch.Tensor,
    X: torch.Tensor,
    c: torch.Tensor | None,
    P: torch.Tensor,
    side: str,
    scale: float,
) -> None:
    """target += scale * (back(X) + c * G), in place, with one matrix product and no (m, n) temporary.

    target and G (m, n) (or the same rows of them), or stacked (B, m, n) (then baddbmm); X and c as from
    lowrank_direction_parts.
    """
    if c is not None:
        target.addcmul_(G.to(target.dtype), c.to(target.dtype), value=scale)
    Xt, Pt = X.to(target.dtype), P.to(target.dtype)
    product_ = target.addmm_ if target.dim() == 2 else target.baddbmm_
    if side == "right":
        product_(Xt, Pt, alpha=scale)
    else:
        product_(Pt, Xt, alpha=scale)


def decay_(p: torch.Tensor, o: GroupOptions) -> None:
    """Decoupled weight decay exactly as the reference: p -= lr * wd * p."""
    if o.weight_decay > 0.0:
        p.add_(p, alpha=-o.lr * o.weight_decay)


@dataclasses.dataclass
class LowRankState:
    """The tensors of one low-rank matrix (views into the optimizer state dict)."""

    projector: torch.Tensor  # (k, n) right / (m, k) left
    exp_avg: torch.Tensor  # (m, k) / (k, n)
    exp_avg_sq: torch.Tensor  # same
    limiter_norm: torch.Tensor  # 0-d


def is_left_square_quirk(side: str, lowrank_shape: tuple[int, int], full_shape: tuple[int, int]) -> bool:
    """The reference's per-row phi for a left projection with square N (see module docstring)."""
    return side == "left" and lowrank_shape[0] == lowrank_shape[1] and full_shape[0] == full_shape[1]


def uses_gradient_norms(o: GroupOptions, side: str, full_shape: tuple[int, int]) -> bool:
    """Whether the step of this matrix reads ||G||^2 along the projected dimension (gradient_norms_sq): Fira,
    except the left-square quirk (which forms S explicitly)."""
    return o.algorithm == Algorithm.FIRA and not is_left_square_quirk(
        side, lowrank_shape(full_shape, o.rank, side), full_shape)


def gradient_norms_sq(G: torch.Tensor, side: str, dtype: torch.dtype) -> torch.Tensor:
    """||G||^2 per row ('right': (m, 1)) or per column ('left': (1, n)) of the whole (m, n) gradient, in dtype.

    A whole-matrix step computes it with this function, on the 2-D G, whoever calls it (alone or batched, or
    up front as a layout's NaN/Inf check: its sum is finite iff G is, barring squares past 3e38), so a matrix
    gets the same bits either way.
    """
    return squared_norms(G.to(dtype), _axis(side))


def whole_matrix_update_(
    target: torch.Tensor, G: torch.Tensor, st: LowRankState, o: GroupOptions, side: str, step: int,
    g_sq: torch.Tensor | None = None,
) -> None:
    """One Fira/GaLore step for a whole matrix held by this process: updates st and target (m, n).

    step: the step number after increment (1 on the first update). The projector must be current. g_sq:
    gradient_norms_sq(G, ...) if the caller has it already (else computed here when needed).
    """
    quirk = o.algorithm == Algorithm.FIRA and is_left_square_quirk(side, tuple(st.exp_avg.shape), tuple(G.shape))
    if G.numel() <= STACKED_MAX_NUMEL and not quirk:
        # a batch of one: the same kernels (bmm) as a batch of several, so batching changes no bit
        batched_update_([target], [G], [st], o, side, step, None if g_sq is None else [g_sq])
        return
    Gc = G.to(st.exp_avg.dtype)
    R = project(Gc, st.projector, side)
    N = lowrank_adam_(R, st.exp_avg, st.exp_avg_sq, o)
    step_size = bias_corrected_step_size(o, step)
    if quirk:
        _left_square_quirk_update_(target, Gc, R, N, st, o, step, step_size)
    else:
        phi = lim = None
        if o.algorithm == Algorithm.FIRA:
            if g_sq is None:
                g_sq = gradient_norms_sq(Gc, side, Gc.dtype)
            phi, s_sq = scaling_and_residual_sq(None, R, N, side, residual_coefficient(o), g_sq)
            lim, new_norm = limiter(s_sq.sqrt(), st.limiter_norm, o.limiter_gamma, has_prev=step > 1)
            st.limiter_norm.copy_(new_norm)
        X, c = lowrank_direction_parts(N, R, phi, lim, o)
        apply_direction_(target, Gc, X, c, st.projector, side, -step_size)
    decay_(target, o)


def _left_square_quirk_update_(target, G, R, N, st, o, step, step_size) -> None:
    phi = torch.linalg.vector_norm(N, dim=1, keepdim=True) / (torch.linalg.vector_norm(R, dim=1, keepdim=True) + NORM_EPS)
    S = (G - residual_coefficient(o) * (st.projector @ R)) * phi  # (m, n), phi per row as the reference
    lim, new_norm = limiter(torch.linalg.vector_norm(S), st.limiter_norm, o.limiter_gamma, has_prev=step > 1)
    st.limiter_norm.copy_(new_norm)
    D = torch.addmm(S / lim, st.projector, N, alpha=o.alpha)
    target.add_(D.to(target.dtype), alpha=-step_size)


def adam_update_(target: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 o: GroupOptions, step: int) -> None:
    """Plain Adam (the reference's form: eps outside the bias correction) on any-shaped tensors."""
    N = adam_normalized_(g.to(exp_avg.dtype), exp_avg, exp_avg_sq, o)
    target.add_(N.to(target.dtype), alpha=-bias_corrected_step_size(o, step))
    decay_(target, o)


def batched_update_(
    targets: list[torch.Tensor], Gs: list[torch.Tensor], states: list[LowRankState], o: GroupOptions, side: str,
    step: int, g_sqs: list[torch.Tensor] | None = None,
) -> None:
    """whole_matrix_update_ for B matrices of one shape at once: stacked (B, m, n) tensors, bmm, and one
    elementwise kernel per operation instead of B. Same results as whole_matrix_update_ on each matrix
    (every operation is per matrix: per-row / per-column norms, per-matrix sums, a per-slice bmm, the fused
    moments update called per matrix; a batch of one, whole_matrix_update_, runs the same kernels on views).

    targets and Gs (m, n) each, states with projectors (k, n) right / (m, k) left, all at the same step
    (after increment), none in the left-square quirk. The stacking copies cost 3 passes over B * m * n
    numbers, so this pays only when per-operation overhead dominates (small matrices: STACKED_MAX_NUMEL).
    g_sqs: gradient_norms_sq of each G, if the caller has them (else computed here, matrix by matrix, for Fira).
    """
    one = len(states) == 1  # views instead of stacked copies

    def stacked(ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0].unsqueeze(0) if one else torch.stack(ts)

    dt = states[0].exp_avg.dtype
    G = stacked([g.to(dt) for g in Gs])  # (B, m, n)
    P = stacked([s.projector for s in states])  # (B, k, n) / (B, m, k)
    R = project(G, P, side)  # (B, m, k) / (B, k, n)
    N = torch.empty_like(R)
    for s, r_i, n_i in zip(states, R, N):  # a call per matrix: the same bits as alone (see lowrank_adam_)
        lowrank_adam_(r_i, s.exp_avg, s.exp_avg_sq, o, out=n_i)
    phi = lim = None
    if o.algorithm == Algorithm.FIRA:
        if g_sqs is None:
            g_sqs = [gradient_norms_sq(g, side, dt) for g in Gs]
        phi, terms = scaling_and_residual_terms(None, R, N, side, residual_coefficient(o), stacked(g_sqs))
        lims = []
        for s, t in zip(states, terms):  # per-matrix sums and limiters
            lim_i, new_norm = limiter(t.sum().sqrt(), s.limiter_norm, o.limiter_gamma, has_prev=step > 1)
            s.limiter_norm.copy_(new_norm)
            lims.append(lim_i)
        lim = torch.stack(lims).view(-1, 1, 1)
    X, c = lowrank_direction_parts(N, R, phi, lim, o)
    T = stacked(targets)
    apply_direction_(T, G, X, c, P, side, -bias_corrected_step_size(o, step))
    decay_(T, o)
    if not one:
        for t, t_new in zip(targets, T):
            t.copy_(t_new)
