"""Who holds what and what moves: the placement plans of every layout, computed from shapes alone.

Pure functions of shapes, options, the world size and the byte budget: no tensors, no collectives. The layouts
run them on their real parameters and ``fira_dist.memory`` runs them on a model's shapes, so an estimate cannot
drift from the code. Every plan is identical on every rank (a pure function of the same arguments), so none
needs communication.

- Owner maps: greedy longest-processing-time (``assign_owners``) for replicated gradients (DDP, ZeRO-0) and SVD
  owners; locality (``largest_holder``) under ZeRO-1/2, where a matrix inside one rank's flat partition stays there.
- Pieces: which contiguous element range of a parameter each rank's flat partition holds (``zero12_pieces``,
  ``zero3_ranges``), and FSDP2's row shards (``fsdp2_ranges``); ``segments`` cuts a range into whole rows and at
  most one partial row at each end.
- Chunks: every exchange the optimizer makes runs in rounds bounded by a byte budget (``comm_bucket_bytes``):
  ``first_fit_rounds`` (per-rank loads, an item larger than the budget alone on its rank), ``gather_rounds``
  (an all-gather split at element granularity).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from fira_dist.projector import lowrank_shape, projector_shape

FP32 = 4  # every exchange of a step is packed in fp32
MiB = 1 << 20
# Outside DeepSpeed (DDP, FSDP2): 64 MiB, a few times DDP's own 25 MiB gradient bucket. Messages of tens of MiB
# already run at full NCCL / gloo bandwidth, so larger rounds would buy little speed and cost memory: at LLaMA-7B a
# rank holds 0.37 GiB of Fira state at W = 8 and 0.05 GiB at W = 64, and the step's transient must stay small next
# to what Fira saves. A matrix larger than the budget (a 7B MLP matrix's gradient is 172 MiB in fp32) moves alone.
DEFAULT_COMM_BUCKET_BYTES = 64 * MiB


def check_comm_bucket_bytes(value: Any, where: str) -> int:
    """A byte budget: an integer (or integral float, e.g. 5e8) >= 1; anything else names ``where``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 1
    if ok and isinstance(value, float):
        ok = value == int(value)
    if not ok:
        raise ValueError(f"{where}={value!r} is not accepted; expected a number of bytes >= 1 (an integer, e.g. "
                         f"{DEFAULT_COMM_BUCKET_BYTES} = 64 MiB)")
    return int(value)


# --------------------------------------------------------------------------------------------------- owners
def lowrank_state_numel(shape: Sequence[int], rank: int, side: str) -> int:
    """Elements of projector + exp_avg + exp_avg_sq for one (m, n) matrix (the limiter norm is 1 more)."""
    a, b = projector_shape(tuple(shape), rank, side)
    c, d = lowrank_shape(tuple(shape), rank, side)
    return a * b + 2 * c * d + 1


def assign_owners(costs: Sequence[float], world_size: int, initial_loads: Sequence[float] | None = None) -> list[int]:
    """owner[i] in [0, world_size) for each cost, by greedy LPT: costs sorted descending (ties by index) go one by
    one to the least-loaded rank (ties to the lowest). Max load <= (sum(initial) + sum(costs)) / W + max(costs)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r} is not accepted; expected an integer >= 1")
    loads = [0.0] * world_size if initial_loads is None else [float(x) for x in initial_loads]
    if len(loads) != world_size:
        raise ValueError(f"initial_loads has {len(loads)} entries; expected world_size={world_size}")
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda q: (loads[q], q))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def svd_cost(shape: Sequence[int]) -> int:
    """The SVD owner map's cost of one (m, n) matrix: m n min(m, n)."""
    m, n = shape
    return m * n * min(m, n)


# --------------------------------------------------------------------------------------------------- rounds
def first_fit_rounds(items: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Rounds of item indices: item i = (rank, bytes) holds ``bytes`` on ``rank`` while its round runs.

    Items go, in order, into the first round where their rank's load stays <= budget, or where their rank has
    nothing yet (an item larger than the budget is alone on its rank). So in every round each rank holds at most
    max(budget, its largest item), and items of different ranks share rounds (they run in parallel).
    """
    rounds: list[list[int]] = []
    loads: list[dict[int, int]] = []
    for i, (rank, nbytes) in enumerate(items):
        for j, load in enumerate(loads):
            have = load.get(rank, 0)
            if have == 0 or have + nbytes <= budget:
                rounds[j].append(i)
                load[rank] = have + nbytes
                break
        else:
            rounds.append([i])
            loads.append({rank: nbytes})
    return rounds


def consecutive_chunks(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose sizes sum to <= budget; an item larger than the budget is alone."""
    out: list[list[int]] = []
    acc = 0
    for i, s in enumerate(sizes):
        if out and acc + s <= budget and out[-1]:
            out[-1].append(i)
            acc += s
        else:
            out.append([i])
            acc = s
    return out


@dataclasses.dataclass(frozen=True)
class GatherRounds:
    """An all-gather of per-rank flat contributions (rank r: ``lengths[r]`` elements, the longest ``longest``) in
    rounds of ``per_round`` elements per rank: round j moves elements [j per_round, (j + 1) per_round) of every
    rank's contribution, the last round only up to ``longest`` (shorter contributions zero-padded). Per rank: a send
    buffer of per_round and a receive buffer of W per_round elements."""

    per_round: int
    rounds: int
    world_size: int
    itemsize: int
    longest: int

    def round_numel(self, j: int) -> int:
        return min(self.per_round, self.longest - j * self.per_round)

    @property
    def comm_bytes(self) -> int:
        """What Comm counts (the all-gather outputs): W x longest x itemsize, whatever the rounds."""
        return self.world_size * self.longest * self.itemsize

    @property
    def buffer_bytes(self) -> int:
        return (self.world_size + 1) * self.per_round * self.itemsize if self.rounds else 0


def gather_rounds(lengths: Sequence[int], itemsize: int, budget: int) -> GatherRounds:
    """Rounds whose send + receive buffers, (W + 1) per_round x itemsize, fit in ``budget`` (at least 1 element)."""
    W = len(lengths)
    longest = max(lengths, default=0)
    per_round = max(1, min(longest, budget // ((W + 1) * itemsize))) if longest else 0
    rounds = -(-longest // per_round) if longest else 0
    return GatherRounds(per_round, rounds, W, itemsize, longest)


# --------------------------------------------------------------------------------------------------- pieces
@dataclasses.dataclass(frozen=True)
class Piece:
    """Elements [start, start + length) of a parameter's flattened tensor, at ``offset`` in ``rank``'s flat."""

    rank: int
    start: int
    length: int
    offset: int


def zero12_partition(group_numels: Sequence[int], world_size: int, alignment_factor: int = 2) -> tuple[int, int]:
    """(aligned flat numel, partition numel) of one DeepSpeed ZeRO-1/2 param group (stage_1_and_2.py: ``alignment =
    nccl_start_alignment_factor * dp_size``, the flat padded to a multiple of it, cut into W equal partitions)."""
    a = alignment_factor * world_size
    aligned = -(-sum(group_numels) // a) * a
    return aligned, aligned // world_size


def contiguous_pieces(group_offset: int, numel: int, partition_size: int, world_size: int) -> list[Piece]:
    """The pieces of a parameter at ``group_offset`` in a flat group cut into W partitions of ``partition_size``."""
    out = []
    for q in range(world_size):
        lo, hi = max(q * partition_size - group_offset, 0), min((q + 1) * partition_size - group_offset, numel)
        if hi > lo:
            out.append(Piece(q, lo, hi - lo, group_offset + lo - q * partition_size))
    return out


def zero12_pieces(group_numels: Sequence[int], world_size: int, partition_size: int) -> list[list[Piece]]:
    """Pieces of each parameter of a ZeRO-1/2 group, laid end to end in group order."""
    out, off = [], 0
    for n in group_numels:
        out.append(contiguous_pieces(off, n, partition_size, world_size))
        off += n
    return out


def zero3_ranges(numel: int, world_size: int) -> list[tuple[int, int]]:
    """(lo, hi) of each rank's ZeRO-3 partition of one parameter: ceil(numel / W) elements each, the last shorter
    or empty (partition_parameters.py)."""
    pn = -(-numel // world_size) if numel else 0
    return [(min(q * pn, numel), min((q + 1) * pn, numel)) for q in range(world_size)]


def chunk_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """torch.chunk / DTensor ``Shard`` semantics: rank r holds [r c, min((r + 1) c, total)), c = ceil(total / W)."""
    c = -(-total // world_size) if total else 0
    start = min(rank * c, total)
    return start, min(start + c, total)


def fsdp2_ranges(shape: Sequence[int], world_size: int) -> list[tuple[int, int]]:
    """(lo, hi) in the flattened (m, n) matrix of each rank's FSDP2 row shard (whole rows, torch.chunk)."""
    m, n = shape
    return [(a * n, b * n) for a, b in (chunk_range(m, world_size, q) for q in range(world_size))]


def largest_holder(pieces: Sequence[Piece]) -> int:
    """The rank holding the most elements (ties: the lowest rank)."""
    return min(pieces, key=lambda pc: (-pc.length, pc.rank)).rank


# --------------------------------------------------------------------------------------------------- ZeRO-1/2
@dataclasses.dataclass(frozen=True)
class Zero12Plan:
    """Locality-first ownership of a flat group's low-rank matrices (index = position in the given list).

    A matrix inside one rank's partition is owned and updated there, in place, with no communication. A matrix
    that straddles a boundary (a ``straddler``) is owned by its largest holder; the other holders send it their
    gradient and weight pieces and get the updated pieces back, in ``rounds`` (``first_fit_rounds`` on the owner's
    rebuilt fp32 gradient + weight, 8 m n bytes)."""

    owners: tuple[int, ...]
    straddlers: tuple[int, ...]
    rounds: tuple[tuple[int, ...], ...]  # straddler positions (indices into ``straddlers``' matrices) per round


def zero12_plan(pieces: Sequence[Sequence[Piece]], budget: int) -> Zero12Plan:
    owners = tuple(largest_holder(p) for p in pieces)
    straddlers = tuple(i for i, p in enumerate(pieces) if sum(pc.length > 0 for pc in p) > 1)
    items = [(owners[i], 2 * FP32 * sum(pc.length for pc in pieces[i])) for i in straddlers]
    rounds = tuple(tuple(straddlers[j] for j in rnd) for rnd in first_fit_rounds(items, budget))
    return Zero12Plan(owners, straddlers, rounds)


def zero12_comm_bytes(plan: Zero12Plan, pieces: Sequence[Sequence[Piece]], rank: int) -> int:
    """Bytes rank ``rank`` sends for the matrices of one flat group per step (fp32): 8 per element it holds of a
    straddler owned elsewhere (gradient + weight), 4 per element other ranks hold of a straddler it owns (the
    updated weight). Matrices inside one partition move nothing."""
    total = 0
    for i in plan.straddlers:
        mine = sum(pc.length for pc in pieces[i] if pc.rank == rank)
        if plan.owners[i] == rank:
            total += FP32 * (sum(pc.length for pc in pieces[i]) - mine)
        else:
            total += 2 * FP32 * mine
    return total


def zero12_buffer_bytes(plan: Zero12Plan, pieces: Sequence[Sequence[Piece]], rank: int) -> int:
    """The largest exchange buffer rank ``rank`` holds in one round: the rebuilt fp32 gradient and weight of the
    straddlers it owns in that round (holders send and receive straight from and into their flat partitions)."""
    return max((sum(2 * FP32 * sum(pc.length for pc in pieces[i]) for i in rnd if plan.owners[i] == rank)
                for rnd in plan.rounds), default=0)


# --------------------------------------------------------------------------------------------------- row slices
def segments(lo: int, hi: int, n: int) -> list[tuple[int, int, int, int]]:
    """Elements [lo, hi) of a row-major matrix with n columns as (row0, row1, c0, c1) blocks: at most a partial
    row at each end (a single row) and whole rows in between (c0 = 0, c1 = n). Empty for an empty range."""
    if hi <= lo:
        return []
    first, last = lo // n, (hi - 1) // n
    if first == last:
        return [(first, first + 1, lo - first * n, hi - first * n)]
    out = []
    r0 = first
    if lo % n:
        out.append((first, first + 1, lo % n, n))
        r0 = first + 1
    r1 = hi // n
    if r1 > r0:
        out.append((r0, r1, 0, n))
    if hi % n:
        out.append((r1, r1 + 1, 0, hi % n))
    return out


def owned_rows(lo: int, hi: int, n: int) -> tuple[int, int]:
    """Rows whose first element lies in [lo, hi): the rows whose row-wise state this rank holds."""
    if hi <= lo:
        a = -(-lo // n)
        return a, a
    return -(-lo // n), -(-hi // n)


def touched_rows(lo: int, hi: int, n: int) -> tuple[int, int]:
    """Rows with at least one element in [lo, hi)."""
    if hi <= lo:
        return 0, 0
    return lo // n, -(-hi // n)


def split_rows(ranges: Sequence[tuple[int, int]], n: int) -> list[int]:
    """Rows that more than one rank holds part of (a partition boundary falls strictly inside them), ascending."""
    rows = set()
    for lo, hi in ranges:
        for b in (lo, hi):
            if b % n and hi > lo:
                rows.add(b // n)
    return sorted(rows)


def row_owner(row: int, ranges: Sequence[tuple[int, int]], n: int) -> int:
    """The rank holding the row's first element."""
    e = row * n
    for q, (lo, hi) in enumerate(ranges):
        if lo <= e < hi:
            return q
    raise ValueError(f"row {row} (element {e}) is held by no rank")


# --------------------------------------------------------------------------------------------------- sliced plans
@dataclasses.dataclass(frozen=True)
class SliceShape:
    """One low-rank (m, n) matrix cut into contiguous element ranges, one per rank (FSDP2 row shards: whole rows;
    ZeRO-3 partitions: whole rows plus a partial row at each end). What the sliced layouts need to know of it.

    Placement of its state (``layouts.sliced``): right projection: Q (k, n) by its rows (torch.chunk of k), the
    moments (m, k) by owned rows (rows whose first element a rank holds); left projection: P (m, k) by touched
    rows (a rank holding part of a row keeps that row of P), the moments (k, n) by columns (torch.chunk of n).
    """

    shape: tuple[int, int]
    k: int
    side: str  # "right" | "left"
    fira: bool  # Fira (norm scaling + limiter) or GaLore
    ranges: tuple[tuple[int, int], ...]

    @property
    def W(self) -> int:
        return len(self.ranges)

    @property
    def f(self) -> int:
        """Extra numbers per row / column that travel with R and X for Fira: ||G||^2 and phi, or c."""
        return int(self.fira)

    def split(self) -> list[int]:
        return split_rows(self.ranges, self.shape[1]) if self.side == "right" else []

    def q_rows(self, r: int) -> tuple[int, int]:
        return chunk_range(self.k, self.W, r)

    def cols(self, r: int) -> tuple[int, int]:
        return chunk_range(self.shape[1], self.W, r)

    def state_numel(self, r: int) -> dict[str, int]:
        """Elements of rank r's state tensors: projector, one moment."""
        m, n = self.shape
        lo, hi = self.ranges[r]
        if self.side == "right":
            a, b = self.q_rows(r)
            o0, o1 = owned_rows(lo, hi, n)
            return {"projector": (b - a) * n, "moment": (o1 - o0) * self.k}
        t0, t1 = touched_rows(lo, hi, n)
        c0, c1 = self.cols(r)
        return {"projector": (t1 - t0) * self.k, "moment": self.k * (c1 - c0)}

    # bytes of one regular step's collectives (fp32), per rank; see layouts.sliced.step_chunk
    def q_gather_numel(self) -> int:
        """Per rank: the padded Q shard sent in the Q all-gather (W of them received)."""
        return -(-self.k // self.W) * self.shape[1] if self.side == "right" else 0

    def left_numel(self) -> int:
        """Per rank: the padded column block of [R; ||G||^2] (reduce-scatter output) and of [X; c] (all-gather
        input), (k + f) ceil(n / W); W of them are the reduce-scatter input and the all-gather output."""
        return (self.k + self.f) * -(-self.shape[1] // self.W) if self.side == "left" else 0

    def split_numel(self) -> int:
        """The split rows' [R_i; ||G_i||^2] (first all-reduce) and [N_i; phi_i] (second): (k + f) per split row."""
        return len(self.split()) * (self.k + self.f)

    def workspace_numel(self) -> int:
        """Elements of this matrix's temporaries in a regular step, on the rank with the most (the same number on
        every rank, so that every rank forms the same chunks): right: Q (k, n) gathered whole, R and N of its
        owned rows (2 x (ceil(m / W) + 1) x k); left: the partial P^T G (k, n), R and N of its columns
        (2 k ceil(n / W)), [X; c] gathered whole ((k + 1) n)."""
        m, n = self.shape
        k, W = self.k, self.W
        if self.side == "right":
            return k * n + 2 * (-(-m // W) + 1) * k
        return k * n + 2 * k * -(-n // W) + (k + 1) * n

    def footprint(self) -> int:
        """Bytes this matrix adds on a rank while its chunk runs: its collective buffers (send and receive) and its
        temporaries (``workspace_numel``)."""
        W = self.W
        return FP32 * ((W + 1) * (self.q_gather_numel() + self.left_numel()) + 2 * self.split_numel()
                       + self.workspace_numel())


def sliced_chunks(shapes: Sequence[SliceShape], budget: int) -> list[list[int]]:
    """The regular step's chunks: consecutive matrices whose exchange buffers fit the budget (one matrix may
    exceed it alone). Every collective of a step then moves one chunk's data at a time."""
    return consecutive_chunks([s.footprint() for s in shapes], budget)


def sliced_chunk_comm_bytes(shapes: Sequence[SliceShape]) -> int:
    """What Comm counts for one chunk of a regular step, per rank (the same on every rank):
    Q all-gather W sum_right ceil(k/W) n; left reduce-scatter and all-gather W (k + f) ceil(n/W) each;
    split-row all-reduce sum_right s (k + f) (s split rows); norms all-reduce (#Fira + sum_right s (k + f));
    times 4 bytes. A collective with nothing to move is skipped."""
    if not shapes or shapes[0].W == 1:
        return 0
    W = shapes[0].W
    q = sum(s.q_gather_numel() for s in shapes)
    left = sum(s.left_numel() for s in shapes)
    split = sum(s.split_numel() for s in shapes)
    norms = sum(s.fira for s in shapes) + split
    return FP32 * (W * q + 2 * W * left + split + norms)


def exact_refresh_rounds(shapes: Sequence[SliceShape], owners: Sequence[int], budget: int) -> list[list[int]]:
    """Rounds of the exact-SVD refresh: the SVD owner rebuilds each due gradient whole (4 m n bytes)."""
    return first_fit_rounds([(o, FP32 * s.shape[0] * s.shape[1]) for s, o in zip(shapes, owners)], budget)


def projector_piece_numel(s: SliceShape, r: int) -> int:
    """What rank r receives of a new projector: its rows of Q (right) or its touched rows of P (left)."""
    return s.state_numel(r)["projector"]


def exact_refresh_comm_bytes(shapes: Sequence[SliceShape], owners: Sequence[int], rounds: Sequence[Sequence[int]],
                             rank: int) -> int:
    """Bytes rank ``rank`` sends in an exact refresh (assuming every SVD succeeds): its slice of each due
    gradient to the matrix's owner, and, as owner, each other rank's projector piece; plus one all-reduce of
    one status per due matrix per round."""
    total = 0
    for s, o in zip(shapes, owners):
        lo, hi = s.ranges[rank]
        if o != rank:
            total += FP32 * (hi - lo)
        else:
            total += FP32 * sum(projector_piece_numel(s, q) for q in range(s.W) if q != rank)
    return total + FP32 * sum(len(r) for r in rounds) if shapes and shapes[0].W > 1 else total


def sketch_dims(s: SliceShape, oversample: int) -> tuple[int, int, int]:
    """(a, b, ell) of the randomized range finder: the top-k left singular vectors of A (a, b) are wanted, A = G
    for a left projection, G^T for a right one; ell = min(k + oversample, m, n)."""
    m, n = s.shape
    a, b = (m, n) if s.side == "left" else (n, m)
    return a, b, min(s.k + oversample, m, n)


def sketch_comm_bytes(shapes: Sequence[SliceShape], oversample: int, power_iters: int) -> int:
    """Per rank, the all-reduces of the distributed randomized projector (layouts.sketch), one per phase for all
    matrices: right (a = n): Y (n, ell) per sketch, the split rows' partial G O and G Qb (s ell each), the
    Gram (ell, ell); left (a = m): Y (m, ell) per sketch, G^T O (n, ell) per power iteration, Qb^T G (ell, n)."""
    if not shapes or shapes[0].W == 1:
        return 0
    total = 0
    for s in shapes:
        m, n = s.shape
        _, _, ell = sketch_dims(s, oversample)
        if s.side == "right":
            total += ell * (n * (1 + power_iters) + len(s.split()) * (power_iters + 1) + ell)
        else:
            total += ell * (m * (1 + power_iters) + n * (power_iters + 1))
    return FP32 * total
