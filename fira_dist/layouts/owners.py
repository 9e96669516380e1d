"""Deterministic, load-balanced owner maps: which rank holds each matrix's state and does its math.

Computed identically on every rank from shapes alone, so it needs no communication. Greedy
longest-processing-time (LPT): matrices sorted by cost (descending, ties by index) go one by one to the
least-loaded rank (ties to the lowest rank). LPT guarantees max load <= total / W + the largest single
cost, which is the per-rank state bound the tests check. The default cost is the matrix's optimizer-state
element count (projector + two moments), so memory is what gets balanced; SVD work follows it closely
for the LLaMA shapes (both grow with max(m, n) * k).
"""

from __future__ import annotations

from typing import Sequence

from fira_dist.projector import lowrank_shape, projector_shape


def lowrank_state_numel(shape: Sequence[int], rank: int, side: str) -> int:
    """Elements of projector + exp_avg + exp_avg_sq for one (m, n) matrix (the limiter norm is 1 more)."""
    a, b = projector_shape(tuple(shape), rank, side)
    c, d = lowrank_shape(tuple(shape), rank, side)
    return a * b + 2 * c * d + 1


def assign_owners(costs: Sequence[float], world_size: int, initial_loads: Sequence[float] | None = None) -> list[int]:
    """owner[i] in [0, world_size) for each cost, by greedy LPT. Pure function of its arguments.

    initial_loads: what each rank already holds (e.g. its share of elementwise Adam state); the bound
    max load <= (sum(initial_loads) + sum(costs)) / W + max(costs) still holds when no initial load alone
    exceeds it.
    """
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
