"""Low-rank factorized training and weight refactorization (Glentis et al. 2025, arXiv 2505.22922).

- :func:`factorize` replaces each target ``nn.Linear`` (weight W of shape (m, n), m = out_features, n = in_features)
  by a :class:`LowRankLinear` with trainable factors ``B`` (m, r) and ``A_T`` (n, r), used as
  W = (alpha / r) B A with A = A_T^T (r, n). Everything else stays full rank. Targets are matched as
  ``fira_dist.param_groups`` matches them (an ``nn.Linear`` whose module name contains a target substring); the
  factors are initialised as the authors' code (OptimAI-Lab/Memory_Efficient_Pretraining, ``LoRaFaLinear``:
  ``kaiming_uniform_(a=sqrt(5))`` on both factors, i.e. A ~ U(+-1/sqrt(n)), B ~ U(+-1/sqrt(r))). Their LLaMA-60M
  recipe: rank 128, alpha 32, lr 0.0015, AdamW on every parameter.
  A is stored transposed so that both factors are tall: FSDP2 ``Shard(0)`` then splits the long dimension of each
  (rows of B, columns of A) and the refactorization below needs only r x r numbers from other ranks.
- :func:`refactorize` re-balances every factor pair without changing its product: with the SVD
  B A = U_r S_r V_r^T, B <- U_r sqrt(S_r), A <- sqrt(S_r) V_r^T (the authors' ``merge_and_reinit``, which takes the
  SVD of the (m, n) product). Here the (m, n) product is never formed. With the Gram matrices
  G_B = B^T B = R_B^T R_B and G_A = A A^T = R_A^T R_A (r x r, float64; R = Lambda^(1/2) Q^T from an eigendecomposition
  of G, a QR's R up to an orthogonal factor, which the core SVD absorbs), B A = (B R_B^+) (R_B R_A^T) (R_A^+ A) where
  B R_B^+ and A^T R_A^+ have orthonormal columns; the SVD of the small core C = R_B R_A^T = U_c S V_c^T gives
  B <- B T_B, A_T <- A_T T_A with T_B = R_B^+ U_c sqrt(S), T_A = R_A^+ V_c sqrt(S) (r x r). Cost O((m + n) r^2) plus
  an r x r SVD, against O(m n r + m n min(m, n)) for the direct route; and it is row-local: a rank holding rows of
  B and of A_T needs only the summed Grams (one all-reduce of 2 r^2 numbers per matrix, bucketed over all matrices).
  Directions along which a factor is numerically zero (Gram eigenvalues below 1e-13 of the largest) are dropped, so
  rank-deficient factors are handled: the product loses only what was rounding noise. The sign of each singular
  pair follows a fixed rule on U_c (its largest entry positive); a sign flip of a (column of B, row of A) pair
  changes neither the product nor, when the moments are reset with it, any later loss (Adam is sign-equivariant).
- Where the factors live: plain modules and DDP (the same computation on every rank, no communication); FSDP2
  (DTensor ``Shard(0)`` factors: the Grams are all-reduced, everything else stays local); DeepSpeed ZeRO 1/2/3
  (the fp32 master weights the optimizer holds are read whole with ``deepspeed.utils.safe_get_full_fp32_param``,
  an all-reduce (ZeRO-1/2) or all-gather (ZeRO-3) of one factor, refactorized as one process would, and written
  back into the masters (ZeRO-1/2: ``safe_set_full_fp32_param``; ZeRO-3: ``safe_set_local_fp32_param`` with this
  rank's padded partition, since the full setter assumes no padding) AND into the model's working copies (the
  bit16 parameters; ZeRO-3's ``ds_tensor`` partitions), so the next forward sees the new factors); ZeRO-0 with a
  bf16/fp16 wrapper (pass ``engine=``: its fp32 copies are updated too).
- :func:`factorized_shapes` maps a model's parameter shapes to the factorized model's (for memory estimates).

Refactorizing changes the coordinates the optimizer's moments live in: reset them at the same step
(``fira_dist.Fira(momentum_reset_interval=K)`` does, right after; ``fira-dist pretrain --optimizer lowrank
--momentum-reset-interval K`` runs both).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

DEFAULT_RANK = 128
DEFAULT_ALPHA = 32.0
GRAM_REL_TOL = 1e-13  # Gram eigenvalues below this fraction of the largest are treated as zero
BUCKET_NUMEL = 2**22  # float64 numbers per Gram all-reduce (32 MiB)


class LowRankLinear(nn.Module):
    """y = (alpha / r) (x A_T) B^T + bias, i.e. an ``nn.Linear`` whose weight is W = (alpha / r) B A_T^T.

    Parameters: ``B`` (out_features, r), ``A_T`` (in_features, r), ``bias`` (out_features) or None.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = DEFAULT_ALPHA,
                 bias: bool = False, device: Any = None, dtype: Any = None):
        super().__init__()
        check_rank((out_features, in_features), rank, "LowRankLinear")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LowRankLinear alpha={alpha!r} is not accepted; expected a finite number > 0")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))  # (m, r)
        self.A_T = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))  # (n, r)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        """The authors' initialisation: kaiming_uniform_(a=sqrt(5)) on A (r, n) then on B (m, r); bias as nn.Linear."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A_T.t(), a=math.sqrt(5))  # A (r, n): fan_in n
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))  # fan_in r
            if self.bias is not None:
                nn.init.uniform_(self.bias, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.linear(x, self.A_T.t()), self.B) * self.scale
        return out if self.bias is None else out + self.bias

    def weight(self) -> torch.Tensor:
        """The (m, n) weight this module computes with (formed: for tests and inspection only)."""
        return (self.B @ self.A_T.t()) * self.scale

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, bias={self.bias is not None}")


def check_rank(shape: Sequence[int], rank: Any, name: str) -> int:
    """``rank`` must be an integer in [1, min(m, n)] for a weight of shape (m, n); the error names the module."""
    m, n = int(shape[0]), int(shape[1])
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank > min(m, n):
        raise ValueError(f"rank={rank!r} is not accepted for {name} ({m} x {n}); expected an integer in "
                         f"[1, {min(m, n)}] (at most min(out_features, in_features): a larger rank cannot be reached "
                         "by a product of the two factors)")
    return rank


def _targets(target_modules: Iterable[str]) -> tuple[str, ...]:
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules={target_modules!r} is not accepted; expected non-empty module-name "
                         "substrings, e.g. ('attn', 'mlp')")
    return targets


def factorize(model: nn.Module, target_modules: Iterable[str] = ("attn", "mlp"), rank: int = DEFAULT_RANK,
              alpha: float = DEFAULT_ALPHA) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose name contains a target (and whose weight requires
    grad: the rule of ``fira_dist.param_groups``) by a :class:`LowRankLinear` of the same shape, device and dtype,
    initialised as the authors' code (on the meta device: left for ``reset_parameters`` after ``to_empty``).
    The old weight is dropped; a bias is kept. Returns the replaced modules' names. Draws from torch's global RNG.
    Raises ValueError naming the module when ``rank`` > min(m, n), and when nothing matches."""
    targets = _targets(target_modules)
    picked = [(name, mod) for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and any(t in name for t in targets) and mod.weight.requires_grad]
    if not picked:
        raise ValueError(f"target_modules={targets!r} matched no nn.Linear module of {type(model).__name__}; module "
                         f"names look like {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]}")
    for name, mod in picked:  # check every rank first: all or nothing
        check_rank(tuple(mod.weight.shape), rank, name)
    for name, mod in picked:
        w = mod.weight
        new = LowRankLinear(mod.in_features, mod.out_features, rank, alpha, bias=False, device=w.device, dtype=w.dtype)
        if mod.bias is not None:
            new.bias = mod.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return [name for name, _ in picked]


def lowrank_modules(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    """The :class:`LowRankLinear` modules of ``model`` (any wrapper: DDP, FSDP2, a DeepSpeed engine's module)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def reset_factors_(model: nn.Module) -> int:
    """Re-initialise every :class:`LowRankLinear` (e.g. after ``to_empty`` of a model built on the meta device)."""
    mods = lowrank_modules(model)
    for _, m in mods:
        m.reset_parameters()
    return len(mods)


def factorized_shapes(shapes: Mapping[str, Sequence[int]], rank: int,
                      target_modules: Iterable[str] = ("attn", "mlp")) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of the model :func:`factorize` makes, from the original model's parameter shapes.

    ``shapes``: parameter name -> shape, as ``{n: p.shape for n, p in model.named_parameters()}``. A 2-D
    ``<module>.weight`` whose module name contains a target is taken for an ``nn.Linear`` (true of LLaMA: names
    alone cannot tell) and becomes ``<module>.B`` (m, r) and ``<module>.A_T`` (n, r); every other entry is kept, in
    order. Raises ValueError naming the parameter when rank > min(m, n), and when nothing matches.
    """
    targets = _targets(target_modules)
    out: dict[str, tuple[int, ...]] = {}
    found = False
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and any(t in module for t in targets):
            check_rank(shape, rank, name)
            out[f"{module}.B"] = (shape[0], rank)
            out[f"{module}.A_T"] = (shape[1], rank)
            found = True
        else:
            out[name] = shape
    if not found:
        raise ValueError(f"target_modules={targets!r} matched no 2-D '<module>.weight' among {len(shapes)} parameters "
                         f"(names look like {list(shapes)[:4]})")
    return out


# ----------------------------------------------------------------------------------------------- the math
def gram(X: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """X^T X (r, r) in ``dtype`` for X (rows, r): rows may be a shard (the full Gram is the sum over shards)."""
    Xd = X.to(dtype)
    return Xd.t() @ Xd


def _gram_root(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R^+) with R^T R = G for a symmetric PSD (r, r) G: R = Lambda^(1/2) Q^T from eigh, pseudo-inverse dropping
    eigenvalues below GRAM_REL_TOL of the largest (a zero G gives R = R^+ = 0)."""
    lam, Q = torch.linalg.eigh(G)
    top = lam.max().clamp(min=0.0)
    keep = lam > top * GRAM_REL_TOL
    sq = lam.clamp(min=0.0).sqrt()
    R = sq.unsqueeze(1) * Q.t()  # (r, r)
    inv = torch.where(keep, 1.0 / torch.where(keep, sq, torch.ones_like(sq)), torch.zeros_like(sq))
    return R, Q * inv.unsqueeze(0)


def balancing_transforms(G_B: torch.Tensor, G_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T_B, T_A, S) from the Grams G_B = B^T B and G_A = A_T^T A_T (r, r): B T_B = U_r sqrt(S_r) and
    A_T T_A = V_r sqrt(S_r) where B A_T^T = U_r S_r V_r^T. All (r, r) (S: (r,)), in the Grams' dtype. No collectives:
    with the same (summed) Grams every rank gets the same transforms."""
    R_B, R_B_pinv = _gram_root(G_B)
    R_A, R_A_pinv = _gram_root(G_A)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.t())  # the core C (r, r)
    V = Vh.t()
    idx = U.abs().argmax(dim=0)  # sign rule: each column of U's largest entry positive
    sign = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    root = S.sqrt()
    return R_B_pinv @ (U * (sign * root)), R_A_pinv @ (V * (sign * root)), S


def refactor_pair(B: torch.Tensor, A_T: torch.Tensor, work_dtype: torch.dtype = torch.float64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced factors (B' (m, r), A_T' (n, r), in the inputs' dtypes) of whole factors B (m, r), A_T (n, r):
    B' A_T'^T = B A_T^T and B'^T B' = A_T'^T A_T' = S_r. The (m, n) product is never formed. No collectives."""
    T_B, T_A, _ = balancing_transforms(gram(B, work_dtype), gram(A_T, work_dtype))
    return (B.to(work_dtype) @ T_B).to(B.dtype), (A_T.to(work_dtype) @ T_A).to(A_T.dtype)


def refactor_by_svd(B: torch.Tensor, A_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' ``merge_and_reinit`` (reference for tests): the SVD of the fp32 (m, n) product B A_T^T, then
    B = U_r sqrt(S_r), A_T = V_r sqrt(S_r). Forms the product: O(m n min(m, n))."""
    r = B.shape[1]
    U, S, Vh = torch.linalg.svd((B.float() @ A_T.float().t()), full_matrices=False)
    root = S[:r].sqrt()
    return (U[:, :r] * root).to(B.dtype), (Vh[:r].t() * root).to(A_T.dtype)


# ----------------------------------------------------------------------------------------------- where factors live
def _kind(p: torch.Tensor) -> str:
    if hasattr(p, "ds_id"):
        return "zero3"
    if hasattr(p, "_hp_mapping"):
        return "zero12"  # ZeRO-1/2 and DeepSpeed's BF16_Optimizer
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor):
            return "dtensor"
    except ImportError:  # pragma: no cover
        pass
    return "plain"


def _zero_get(p: torch.Tensor) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)  # collective over the data-parallel group
    if full is None:
        raise RuntimeError("refactorize: DeepSpeed returned no fp32 master weight for a factor (requires_grad=False?)")
    return full.reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def _zero_set(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write a new full value into the fp32 master partition(s) and the working copy of a ZeRO parameter."""
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank's padded partition of the flattened parameter
        import torch.distributed as dist
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import safe_set_local_fp32_param

        part = p.ds_tensor
        pn = part.numel()
        flat = full.reshape(-1)
        lo = min(dist.get_rank(group=p.ds_process_group) * pn, flat.numel())
        hi = min(lo + pn, flat.numel())
        local = torch.zeros(pn, dtype=torch.float32, device=part.device)
        local[:hi - lo].copy_(flat[lo:hi])
        safe_set_local_fp32_param(p, local)
        part.data.copy_(local.to(part.dtype))
        if getattr(p, "ds_secondary_tensor", None) is not None:  # hpZ's copy is stale now: fetched again when needed
            p.ds_secondary_tensor = None
        if p.ds_status == ZeroParamStatus.AVAILABLE:  # a persistent (never released) parameter holds the full value
            p.data.copy_(full.to(p.dtype))
    else:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, full)
        p.data.copy_(full.to(p.dtype))


def _fp32_copies(engine: Any) -> dict[int, torch.Tensor]:
    """ZeRO-0 with DeepSpeed's fp16/bf16 wrapper: id(model parameter) -> the fp32 copy the optimizer updates."""
    wrapper = getattr(engine, "optimizer", None)
    if type(wrapper).__name__ not in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        return {}
    return {id(lp): hp for lg, hg in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lg, hg)}


@torch.no_grad()
def refactorize(model: nn.Module, *, engine: Any = None, work_dtype: torch.dtype = torch.float64,
                bucket_numel: int = BUCKET_NUMEL) -> dict[str, Any]:
    """Re-balance every :class:`LowRankLinear` of ``model`` in place (see the module docstring); products unchanged.

    Call it on every rank, between optimizer steps (FSDP2: parameters sharded). Collectives: FSDP2, one all-reduce
    of the Grams (2 r^2 float64 per matrix) per bucket of ``bucket_numel`` numbers; ZeRO-1/2, one all-reduce of each
    factor (DeepSpeed's full-parameter read); ZeRO-3, one all-gather of each factor; none otherwise (DDP: every rank
    computes the same). ``engine``: the DeepSpeed engine, needed only for ZeRO-0 with a bf16/fp16 wrapper.
    Returns {"matrices", "allreduce_bytes" (Grams), "gathered_bytes" (ZeRO factor reads), "seconds"}.
    """
    from fira_dist.comm import Comm

    t0 = time.perf_counter()
    mods = lowrank_modules(model)
    copies = _fp32_copies(engine) if engine is not None else {}
    stats = {"matrices": len(mods), "allreduce_bytes": 0, "gathered_bytes": 0}
    sharded: dict[Any, list[LowRankLinear]] = {}  # device mesh -> its modules
    for name, m in mods:
        kinds = {_kind(m.B), _kind(m.A_T)}
        if len(kinds) != 1:
            raise ValueError(f"refactorize: the factors of {name} are held differently ({sorted(kinds)}); expected "
                             "both plain, both FSDP2-sharded or both under the same DeepSpeed ZeRO stage")
        kind = kinds.pop()
        if kind == "dtensor":
            _check_shard0(name, m)
            sharded.setdefault(m.B.device_mesh, []).append(m)
        elif kind in ("zero3", "zero12"):
            B, A_T = _zero_get(m.B), _zero_get(m.A_T)
            stats["gathered_bytes"] += 4 * (B.numel() + A_T.numel())
            B2, A2 = refactor_pair(B, A_T, work_dtype)
            _zero_set(m.B, B2)
            _zero_set(m.A_T, A2)
        else:
            hb, ha = copies.get(id(m.B)), copies.get(id(m.A_T))
            B2, A2 = refactor_pair(m.B if hb is None else hb, m.A_T if ha is None else ha, work_dtype)
            for p, hp, new in ((m.B, hb, B2), (m.A_T, ha, A2)):
                if hp is not None:
                    hp.copy_(new)
                p.copy_(new.to(p.dtype))
    for mesh, group_mods in sharded.items():
        comm = Comm(mesh.get_group())
        _refactorize_row_sharded(group_mods, comm, work_dtype, bucket_numel)
        stats["allreduce_bytes"] += comm.total_bytes
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _check_shard0(name: str, m: LowRankLinear) -> None:
    from torch.distributed.tensor import Shard

    for pname, p in (("B", m.B), ("A_T", m.A_T)):
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"refactorize: {name}.{pname} is a DTensor with placements {tuple(p.placements)} on a "
                             f"{p.device_mesh.ndim}-D mesh; expected Shard(0) on a 1-D mesh (FSDP2 fully_shard)")
    if m.A_T.device_mesh != m.B.device_mesh:
        raise ValueError(f"refactorize: the factors of {name} live on different device meshes")


def _refactorize_row_sharded(mods: list[LowRankLinear], comm: Any, work_dtype: torch.dtype, bucket_numel: int) -> None:
    """Row-sharded factors: local Grams of B_i (m_i, r) and A_T,i (n_i, r), summed by all-reduce in buckets; every
    rank then computes the same r x r transforms and applies them to its rows."""
    per = [2 * m.rank * m.rank for m in mods]
    start = 0
    while start < len(mods):  # buckets of whole matrices, at most bucket_numel numbers (at least one matrix)
        end, size = start, 0
        while end < len(mods) and (end == start or size + per[end] <= bucket_numel):
            size += per[end]
            end += 1
        chunk = mods[start:end]
        dev = chunk[0].B.to_local().device
        buf = torch.empty(size, dtype=work_dtype, device=dev)
        off = 0
        for m in chunk:
            r2 = m.rank * m.rank
            buf[off:off + r2].copy_(gram(m.B.to_local(), work_dtype).reshape(-1))
            buf[off + r2:off + 2 * r2].copy_(gram(m.A_T.to_local(), work_dtype).reshape(-1))
            off += 2 * r2
        comm.all_reduce(buf)
        off = 0
        for m in chunk:
            r, r2 = m.rank, m.rank * m.rank
            T_B, T_A, _ = balancing_transforms(buf[off:off + r2].view(r, r), buf[off + r2:off + 2 * r2].view(r, r))
            off += 2 * r2
            for p, T in ((m.B, T_B), (m.A_T, T_A)):
                local = p.to_local()  # (rows_i, r)
                local.copy_((local.to(work_dtype) @ T).to(local.dtype))
        start = end
