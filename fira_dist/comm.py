"""Every collective the optimizer issues goes through ``Comm``, which counts the bytes each one moves.

Byte convention (per rank, payload only): all_reduce counts the tensor's bytes; all_gather_into_tensor
counts the output's bytes; reduce_scatter_tensor counts the input's bytes; broadcast counts the tensor's
bytes on every rank; all_to_all_single and the point-to-point ``exchange`` count the bytes a rank sends to the
other ranks. ``stats()``
reports the last completed step and the running total, so a layout's docstring formula can be checked
against a measurement.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (a FutureWarning on every call) for the
# same collectives under new names; older torch (>= 2.4, what pyproject accepts) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Comm:
    """A process group plus byte counters. ``end_step()`` closes one optimizer step's tally."""

    def __init__(self, group: Any = None):
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self._current: collections.Counter[str] = collections.Counter()
        self._last: dict[str, int] = {}
        self.total_bytes = 0
        self.steps = 0

    def _count(self, op: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self._current[op] += n
        self.total_bytes += n

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            self._count("all_reduce", t)
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            self._count("all_gather", out)
            _all_gather_single(out, inp, group=self.group)
        else:
            out.copy_(inp)
        return out

    def reduce_scatter_tensor(self, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            self._count("reduce_scatter", inp)
            _reduce_scatter_single(out, inp, group=self.group)
        else:
            out.copy_(inp)
        return out

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """src is a rank within the group."""
        if self.world_size > 1:
            self._count("broadcast", t)
            dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                           group=self.group)
        return t

    def all_gather_list(self, outs: list[torch.Tensor], inp: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors of different sizes (one per rank) into outs."""
        if self.world_size > 1:
            for o in outs:
                self._count("all_gather", o)
            dist.all_gather(outs, inp, group=self.group)
        else:
            outs[0].copy_(inp)
        return outs

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
                          in_splits: list[int]) -> torch.Tensor:
        """Rank i sends inp's i-th chunk (in_splits[i] elements) to rank i and receives out_splits[j] from rank j.

        Counts the bytes this rank sends to other ranks (its own chunk stays local).
        """
        if self.world_size > 1:
            n = (sum(in_splits) - in_splits[self.rank]) * inp.element_size()
            self._current["all_to_all"] += n
            self.total_bytes += n
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
        else:
            out.copy_(inp)
        return out

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Point-to-point, all at once (``batch_isend_irecv``): send each (tensor, group rank) and receive into each
        (tensor, group rank); returns when all are done. Messages between two ranks match in the order both list
        them. Tensors must be contiguous; a rank never sends to itself. Counts the bytes this rank sends."""
        if self.world_size == 1 or not (sends or recvs):
            return
        ops = []
        for t, r in sends:
            self._count("p2p", t)
            ops.append(dist.P2POp(dist.isend, t, self.global_rank(r), group=self.group))
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(r), group=self.group) for t, r in recvs]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    def global_rank(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def end_step(self) -> None:
        self._last = dict(self._current)
        self._current = collections.Counter()
        self.steps += 1

    def stats(self) -> dict[str, Any]:
        return {"bytes_per_step": sum(self._last.values()), "by_op": dict(self._last),
                "total_bytes": self.total_bytes, "steps": self.steps}
