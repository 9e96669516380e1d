"""The optimizer's share of a rank's memory and traffic: state, exchange buffers, temporaries, bytes per step.

Everything here comes from the layouts' own planning code (``fira_dist.layouts.plan``), run on a model's shapes:
the same owner maps (greedy LPT for DDP and SVD owners, locality under ZeRO-1/2), the same pieces (ZeRO-1/2
flat partitions, ZeRO-3 and FSDP2 slices), the same rounds and chunks under the same byte budget. So an estimate
follows the code; the tests check state bytes against the layouts' real state tensors, exactly, and the byte
formulas against ``comm_stats()``.

AdamW is modelled as its users run it: under DeepSpeed ZeRO its FusedAdam (``"type": "AdamW"``: one
multi-tensor kernel, in place, no temporary the size of the state); under DDP, FSDP2 and one process
``torch.optim.AdamW``'s default: on CUDA foreach (``sqrt(exp_avg_sq)`` for the whole group, one moment's size), on
CPU a loop over tensors (``MemoryConfig.device="cpu"``: two temporaries the size of the largest tensor).
"""

from __future__ import annotations

import dataclasses
import functools

from fira_dist.layouts import plan as P
from fira_dist.memory.config import MemoryConfig, comm_budget, dtypes, state_bytes
from fira_dist.memory.model import ModelInfo, ParamInfo
from fira_dist.projector import OVERSAMPLE, POWER_ITERS, effective_rank, lowrank_shape, projector_shape, side_for

ADAMW_IMPL = {"zero1": "DeepSpeed FusedAdam", "zero2": "DeepSpeed FusedAdam", "zero3": "DeepSpeed FusedAdam",
              "ddp": "torch.optim.AdamW (foreach)", "fsdp2": "torch.optim.AdamW (foreach)",
              "single": "torch.optim.AdamW (foreach)"}


def fsdp2_rows(dim0: int, world_size: int, rank: int) -> int:
    """Rows of a dim-0 FSDP2 shard (``torch.chunk`` semantics: ceil-sized chunks, trailing ranks may get 0)."""
    a, b = P.chunk_range(dim0, world_size, rank)
    return b - a


def rows_numel(p: ParamInfo, world_size: int, r: int) -> int:
    """Elements of p in rank r's rows (torch.chunk split of dim 0)."""
    return fsdp2_rows(p.shape[0], world_size, r) * (p.numel // p.shape[0])


def zero3_partition_numel(numel: int, world_size: int) -> int:
    """Elements of one parameter's ZeRO-3 partition (ceil(numel / W), partition_parameters.py)."""
    return -(-numel // world_size)


def replicated_owners(info: ModelInfo, rank: int, proj_type: str, world_size: int, state_itemsize: int = 4
                      ) -> dict[int, int]:
    """Owner of each parameter (index into ``info.params``) under ``layouts.replicated.Replicated`` (DDP): the
    low-rank matrices by greedy LPT on their state bytes, in param-group order; a 0-d elementwise tensor on rank
    0; every other elementwise tensor -1: split by rows over all ranks."""
    order = [i for g in info.groups for i in g]
    mats = [i for i in order if info.params[i].low_rank]
    costs = [P.lowrank_state_numel(info.params[i].shape, rank, side_for(info.params[i].shape, proj_type))
             * state_itemsize for i in mats]
    owner = {i: (-1 if info.params[i].shape else 0) for i in order if not info.params[i].low_rank}
    owner.update(zip(mats, P.assign_owners(costs, world_size)))
    return owner


# ------------------------------------------------------------------------------------------------ layout plans
@dataclasses.dataclass(frozen=True)
class LayoutPlan:
    """What a layout does with a model on W ranks (indices into ``info.params``).

    zero12: per param group, the parameters' pieces and the locality plan of its matrices. zero3 / fsdp2: the
    matrices' slice shapes and SVD owners (in the layouts' order) and, ZeRO-3, the sub-groups. ddp: owners.
    """

    strategy: str
    world_size: int
    budget: int
    groups: tuple[tuple[int, ...], ...] = ()  # zero12: param indices per flat group; zero3: per sub-group
    pieces: dict[int, tuple[P.Piece, ...]] = dataclasses.field(default_factory=dict)  # zero12
    zplans: tuple[P.Zero12Plan, ...] = ()  # zero12: one per group, over its matrices in order
    slices: dict[int, P.SliceShape] = dataclasses.field(default_factory=dict)  # zero3 / fsdp2
    svd_owner: dict[int, int] = dataclasses.field(default_factory=dict)  # zero3 / fsdp2
    owners: dict[int, int] = dataclasses.field(default_factory=dict)  # zero12 matrices, ddp every parameter

    def matrices(self, group: tuple[int, ...], info: ModelInfo) -> list[int]:
        return [i for i in group if info.params[i].low_rank]


@functools.lru_cache(maxsize=64)
def layout_plan(info: ModelInfo, strategy: str, world_size: int, rank: int, proj_type: str, fira: bool,
                budget: int, sub_group_size: int, state_itemsize: int = 4) -> LayoutPlan:
    W = world_size
    if strategy == "ddp":
        return LayoutPlan(strategy, W, budget, owners=replicated_owners(info, rank, proj_type, W, state_itemsize))
    if strategy in ("zero1", "zero2"):
        pieces, zplans, owners = {}, [], {}
        for g in info.groups:
            ps = P.zero12_partition([info.params[i].numel for i in g], W)[1]
            for i, pcs in zip(g, P.zero12_pieces([info.params[i].numel for i in g], W, ps)):
                pieces[i] = tuple(pcs)
            mats = [i for i in g if info.params[i].low_rank]
            zp = P.zero12_plan([pieces[i] for i in mats], budget)
            owners.update(zip(mats, zp.owners))
            zplans.append(zp)
        return LayoutPlan(strategy, W, budget, groups=tuple(tuple(g) for g in info.groups), pieces=pieces,
                          zplans=tuple(zplans), owners=owners)
    groups: list[tuple[int, ...]] = []
    if strategy == "zero3":  # sub-groups (stage3.py _create_fp16_sub_groups): cut where the partitions reach the size
        for g in info.groups:
            cur: list[int] = []
            acc = 0
            for i in g:
                cur.append(i)
                acc += zero3_partition_numel(info.params[i].numel, W)
                if acc >= sub_group_size:
                    groups.append(tuple(cur))
                    cur, acc = [], 0
            if cur:
                groups.append(tuple(cur))
    else:
        groups = [tuple(g) for g in info.groups]
    slices = {}
    mats = [i for g in groups for i in g if info.params[i].low_rank]
    for i in mats:
        shape = info.params[i].shape
        side = side_for(shape, proj_type)
        ranges = P.fsdp2_ranges(shape, W) if strategy == "fsdp2" else P.zero3_ranges(info.params[i].numel, W)
        slices[i] = P.SliceShape(shape, effective_rank(shape, rank), side, fira, tuple(ranges))
    svd_owner = dict(zip(mats, P.assign_owners([P.svd_cost(info.params[i].shape) for i in mats], W)))
    return LayoutPlan(strategy, W, budget, groups=tuple(groups), slices=slices, svd_owner=svd_owner)


def plan_for(info: ModelInfo, cfg: MemoryConfig, rank: int) -> LayoutPlan:
    return layout_plan(info, cfg.strategy, cfg.world_size, rank, cfg.proj_type, cfg.optimizer == "fira",
                       comm_budget(cfg), cfg.zero3_sub_group_size, state_bytes(cfg, dtypes(cfg)))


def flat_partitions(info: ModelInfo, cfg: MemoryConfig) -> list[int]:
    """Numel of each flat fp32 tensor the client optimizer gets on one rank (ZeRO-1/2: one per param group;
    ZeRO-3: one per sub-group)."""
    W = cfg.world_size
    if cfg.strategy in ("zero1", "zero2"):
        return [P.zero12_partition([info.params[i].numel for i in g], W)[1] for g in info.groups]
    lp = layout_plan(info, "zero3", W, 1, cfg.proj_type, False, 1, cfg.zero3_sub_group_size)
    return [sum(zero3_partition_numel(info.params[i].numel, W) for i in g) for g in lp.groups]


# ------------------------------------------------------------------------------------------------ state
def _lowrank_parts(shape: tuple[int, int], rank: int, proj_type: str) -> tuple[int, int]:
    """(projector numel, one moment's numel) of a whole matrix."""
    side = side_for(shape, proj_type)
    a, b = projector_shape(shape, rank, side)
    c, d = lowrank_shape(shape, rank, side)
    return a * b, c * d


def optimizer_state(info: ModelInfo, cfg: MemoryConfig, r: int, rank: int) -> dict[str, int]:
    """Bytes of rank ``r``'s optimizer state tensors: projectors, moments (exp_avg + exp_avg_sq), scalars (0-d fp32
    tensors: ``step`` per state entry, Fira's ``limiter_norm`` per matrix). ``rank``: the projection rank.

    adamw: moments ``zeros_like`` each tensor it updates; torch's AdamW a 0-d step per tensor, DeepSpeed's FusedAdam
    (under ZeRO) a Python int. Fira/GaLore, per layout:
      single   every matrix: projector + moments + step + limiter; Adam tensors: moments + step.
      ddp      each matrix's state on its owner; elementwise-Adam moments split by rows, a step on every rank.
      zero1/2  a matrix's whole state on the rank that updates it (its partition's, or a straddler's largest
               holder); Adam state for the piece of each non-matrix parameter this rank holds.
      zero3    every matrix's state sliced over all ranks (``SliceShape.state_numel``), step + limiter everywhere.
      fsdp2    the same slices with FSDP2's whole-row shards; Adam moments by the parameter's rows.
    """
    dt = dtypes(cfg)
    sb = state_bytes(cfg, dt)
    W, s = cfg.world_size, cfg.strategy
    if cfg.optimizer == "adamw":
        if s in ("single", "ddp"):
            return {"projectors": 0, "moments": 2 * info.numel * sb, "scalars": 4 * len(info.params)}
        if s == "fsdp2":
            rows = sum(rows_numel(p, W, r) for p in info.params)
            return {"projectors": 0, "moments": 2 * rows * sb, "scalars": 4 * len(info.params)}
        flats = flat_partitions(info, cfg)  # FusedAdam keeps its step count as a Python int: no tensor
        return {"projectors": 0, "moments": 2 * sum(flats) * sb, "scalars": 0}
    proj = mom = scal = 0
    if s in ("single", "ddp"):
        owner = replicated_owners(info, rank, cfg.proj_type, W, sb) if s == "ddp" else {}
        for i, p in enumerate(info.params):
            o = owner.get(i, r)
            if p.low_rank and o == r:
                pn, mn = _lowrank_parts(p.shape, rank, cfg.proj_type)
                proj, mom, scal = proj + pn * sb, mom + 2 * mn * sb, scal + 8
            elif not p.low_rank and o == -1:  # row-split elementwise Adam: this rank's rows, a step everywhere
                mom, scal = mom + 2 * rows_numel(p, W, r) * sb, scal + 4
            elif not p.low_rank and o == r:
                mom, scal = mom + 2 * p.numel * sb, scal + 4
        return {"projectors": proj, "moments": mom, "scalars": scal}
    lp = plan_for(info, cfg, rank)
    if s in ("zero1", "zero2"):
        for i, p in enumerate(info.params):
            if p.low_rank and lp.owners[i] == r:
                pn, mn = _lowrank_parts(p.shape, rank, cfg.proj_type)
                proj, mom, scal = proj + pn * sb, mom + 2 * mn * sb, scal + 8
            elif not p.low_rank:
                for pc in lp.pieces[i]:
                    if pc.rank == r:
                        mom, scal = mom + 2 * pc.length * sb, scal + 4
        return {"projectors": proj, "moments": mom, "scalars": scal}
    for i, p in enumerate(info.params):
        if p.low_rank:
            numel = lp.slices[i].state_numel(r)
            proj, mom, scal = proj + numel["projector"] * sb, mom + 2 * numel["moment"] * sb, scal + 8
        elif s == "fsdp2":
            mom, scal = mom + 2 * rows_numel(p, W, r) * sb, scal + 4
        else:  # ZeRO-3 Adam pieces
            lo, hi = P.zero3_ranges(p.numel, W)[r]
            if hi > lo:
                mom, scal = mom + 2 * (hi - lo) * sb, scal + 4
    return {"projectors": proj, "moments": mom, "scalars": scal}


# ------------------------------------------------------------------------------------------------ step buffers
def svd_workspace(shape: tuple[int, int]) -> int:
    """torch.linalg.svd(G, full_matrices=False) of an fp32 (m, n) gradient: LAPACK's copy of G, U, S, Vh."""
    m, n = shape
    q = min(m, n)
    return 4 * (m * n + m * q + q + q * n)


def optimizer_buffers(info: ModelInfo, cfg: MemoryConfig, r: int, rank: int) -> dict[str, int]:
    """Rank r's transient memory in the optimizer step, from the layout's plan under ``comm_budget(cfg)``.

    exchange: the largest exchange buffer alive at once (``comm_buffers`` of the step):
      ddp      the bounded all-gather of updated values: (W + 1) C elements (``plan.gather_rounds``);
      zero1/2  the straddlers an owner rebuilds in one round, 8 bytes per element (``plan.zero12_buffer_bytes``);
      zero3/fsdp2  the larger of a regular chunk's collective buffers and temporaries (``SliceShape.footprint``:
               the gathered Q or [X; c], R and N) and an exact refresh round's rebuilt gradients on their SVD
               owner (4 m n each).
    workspace: the optimizer's own temporaries: the exact SVD of the largest matrix whose SVD this rank computes,
      or a whole-matrix step's low-rank R and N (2 max(m, n) k x 4 of its largest matrix); elementwise Adam's
      m / (sqrt(v) + eps) for the largest tensor. AdamW: see the module docstring.
    """
    W, s = cfg.world_size, cfg.strategy
    dt = dtypes(cfg)
    sb = state_bytes(cfg, dt)
    if cfg.optimizer == "adamw":
        if s.startswith("zero"):
            return {"exchange": 0, "workspace": 0}
        if cfg.device == "cpu":  # _single_tensor_adamw: denom = sqrt(v) / bc + eps, and exp_avg / denom
            return {"exchange": 0, "workspace": 2 * largest_adam_piece(info, cfg, r, None, every=True) * sb}
        return {"exchange": 0, "workspace": optimizer_state(info, cfg, r, rank)["moments"] // 2}
    lp = plan_for(info, cfg, rank) if s != "single" else None
    mats = [i for g in info.groups for i in g if info.params[i].low_rank]
    exchange = 0
    if s == "single":
        svd_mine, step_mine = mats, mats
    elif s == "ddp":
        svd_mine = step_mine = [i for i in mats if lp.owners[i] == r]
        if W > 1:
            exchange = ddp_gather(info, lp, dt["w"]).buffer_bytes
    elif s in ("zero1", "zero2"):
        svd_mine = step_mine = [i for i in mats if lp.owners[i] == r]
        for g, zp in zip(lp.groups, lp.zplans):
            gm = lp.matrices(g, info)
            exchange = max(exchange, P.zero12_buffer_bytes(zp, [lp.pieces[i] for i in gm], r))
    else:  # zero3 / fsdp2: sliced
        svd_mine = [i for i in mats if lp.svd_owner[i] == r]
        step_mine = mats
        for g in lp.groups:
            gm = lp.matrices(g, info)
            shapes = [lp.slices[i] for i in gm]
            for chunk in P.sliced_chunks(shapes, lp.budget):
                exchange = max(exchange, sum(shapes[j].footprint() for j in chunk))
            for rnd in P.exact_refresh_rounds(shapes, [lp.svd_owner[i] for i in gm], lp.budget):
                exchange = max(exchange, sum(P.FP32 * info.params[gm[j]].numel for j in rnd
                                             if lp.svd_owner[gm[j]] == r))
    workspace = max((svd_workspace(info.params[i].shape) for i in svd_mine), default=0)
    for i in step_mine if s not in ("zero3", "fsdp2") else ():  # sliced: the chunk's footprint counts it
        m, n = info.params[i].shape
        workspace = max(workspace, 2 * max(m, n) * effective_rank((m, n), rank) * sb)
    workspace = max(workspace, 2 * largest_adam_piece(info, cfg, r, lp) * sb)  # m / (sqrt(v) + eps)
    return {"exchange": exchange, "workspace": workspace}


def largest_adam_piece(info: ModelInfo, cfg: MemoryConfig, r: int, lp: LayoutPlan | None, every: bool = False) -> int:
    """Elements of the largest elementwise-Adam tensor (or piece of one) rank r updates in one call (every: all
    parameters are elementwise, as for AdamW)."""
    W, s = cfg.world_size, cfg.strategy
    out = 0
    for i, p in enumerate(info.params):
        if p.low_rank and not every:
            continue
        if s == "single":
            n = p.numel
        elif s == "fsdp2" or (s == "ddp" and every):
            n = rows_numel(p, W, r) if p.shape else 1
        elif s == "ddp":
            n = rows_numel(p, W, r) if p.shape else int(lp is not None and lp.owners.get(i) == r)
        elif s == "zero3":
            lo, hi = P.zero3_ranges(p.numel, W)[r]
            n = hi - lo
        else:
            n = sum(pc.length for pc in lp.pieces[i] if pc.rank == r)
        out = max(out, n)
    return out


def ddp_gather(info: ModelInfo, lp: LayoutPlan, itemsize: int) -> P.GatherRounds:
    """``Replicated``'s all-gather of the updated values: rank r contributes the matrices it owns and its rows of
    every row-split tensor (``plan.gather_rounds`` under the budget)."""
    W = lp.world_size
    lengths = [0] * W
    for i, o in lp.owners.items():
        if o >= 0:
            lengths[o] += info.params[i].numel
        else:
            for q in range(W):
                lengths[q] += rows_numel(info.params[i], W, q)
    return P.gather_rounds(lengths, itemsize, lp.budget)


# ------------------------------------------------------------------------------------------------ traffic
def optimizer_comm_bytes(info: ModelInfo, cfg: MemoryConfig, r: int, rank: int, refresh: str | None = None) -> int:
    """Bytes rank r's optimizer collectives move in one step (Comm's convention, the layouts' formulas; every
    parameter has a finite gradient). refresh: None (a regular step), "svd" or "randomized" (a step where every
    matrix refreshes its projector that way)."""
    W, s = cfg.world_size, cfg.strategy
    if W == 1 or cfg.optimizer == "adamw" or s == "single":
        return 0
    lp = plan_for(info, cfg, rank)
    if s == "ddp":
        return ddp_gather(info, lp, dtypes(cfg)["w"]).comm_bytes
    if s in ("zero1", "zero2"):
        total = 0
        for g, zp in zip(lp.groups, lp.zplans):
            total += 4 * len(g) + P.zero12_comm_bytes(zp, [lp.pieces[i] for i in lp.matrices(g, info)], r)
        return total
    total = 4 * W * 2 * len(info.params) if s == "fsdp2" else 0
    for g in lp.groups:
        gm = lp.matrices(g, info)
        shapes = [lp.slices[i] for i in gm]
        if s == "zero3":
            total += 4 * len(g)
        total += sum(P.sliced_chunk_comm_bytes([shapes[j] for j in c]) for c in P.sliced_chunks(shapes, lp.budget))
        if refresh == "randomized":
            sk = [sh for sh in shapes if sh.k < min(sh.shape)]
            ex = [(sh, lp.svd_owner[i]) for sh, i in zip(shapes, gm) if sh.k >= min(sh.shape)]
            total += P.sketch_comm_bytes(sk, OVERSAMPLE, POWER_ITERS)
        elif refresh == "svd":
            ex = [(sh, lp.svd_owner[i]) for sh, i in zip(shapes, gm)]
        else:
            ex = []
        if ex:
            rounds = P.exact_refresh_rounds([e[0] for e in ex], [e[1] for e in ex], lp.budget)
            total += P.exact_refresh_comm_bytes([e[0] for e in ex], [e[1] for e in ex], rounds, r)
    return total


def framework_comm_bytes(info: ModelInfo, cfg: MemoryConfig) -> int:
    """Bytes the framework itself moves per step and rank, in Comm's convention (reduce-scatter: its input,
    all-gather: its output, all-reduce: the tensor): ZeRO-1/2 gradient reduce-scatter + parameter all-gather,
    N (g + w); ZeRO-3 the same with the parameters gathered for forward and again for backward, N (g + 2 w);
    FSDP2 reduce-scatter in the reduce dtype + all-gather for forward and backward in the compute dtype; DDP the
    gradients' all-reduce, N g."""
    N, s = info.numel, cfg.strategy
    dt = dtypes(cfg)
    if cfg.world_size == 1 or s == "single":
        return 0
    if s in ("zero1", "zero2"):
        return N * (dt["g"] + dt["w"])
    if s == "zero3":
        return N * (dt["g"] + 2 * dt["w"])
    if s == "fsdp2":
        compute = 2 if cfg.precision != "fp32" else 4
        return N * (4 + 2 * compute)
    return N * dt["g"]
