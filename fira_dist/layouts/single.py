"""One process: every matrix's gradient, state and update are local. No collectives.

This is the layout the distributed ones are tested against, and the home of the whole-matrix step that
owner-computes layouts (replicated, flat-partitioned) run on each matrix's owner.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import torch

from fira_dist import algorithm
from fira_dist.algorithm import (LowRankState, adam_update_, batched_update_, is_left_square_quirk,
                                 whole_matrix_update_)
from fira_dist.config import ProjectorKind
from fira_dist.projector import ProjectorError, compute_projector, lowrank_shape, projector_shape


def projector_seeds(name: str, step: int) -> tuple[int, int]:
    """(test-matrix seed, sign seed) of a randomized refresh of parameter ``name`` at ``step``: by name and step, so
    that resumption is bit-exact and every layout draws the same test matrix; the sign seed by name only, so the
    directions keep their signs from one refresh to the next (projector.fix_signs_)."""
    return zlib.crc32(f"{name}:{step}".encode()), zlib.crc32(f"{name}:sign".encode())


def new_projector(opt: Any, task: Any, step: int, G: torch.Tensor) -> torch.Tensor | None:
    """The projector of the whole gradient G (m, n) at a refresh, or None if it cannot be computed (non-finite G, an
    SVD that fails twice); then one warning names the parameter and says what happens instead."""
    o = task.opts
    gen, sign_seed = None, None
    if o.projector == ProjectorKind.RANDOMIZED:
        seed, sign_seed = projector_seeds(task.name, step)
        gen = torch.Generator(device=G.device).manual_seed(seed)
    try:
        return compute_projector(G, o.rank, task.side, o.projector, generator=gen, sign_seed=sign_seed)
    except ProjectorError as err:
        keep = "keeping the previous projector" if step > 0 else "skipping this matrix's step"
        opt.warn_once(f"svd:{task.name}", f"projector refresh of {task.name} at step {step} failed ({err}); {keep}")
        return None


def refresh_projector_(opt: Any, task: Any, st: dict[str, Any], G: torch.Tensor) -> bool:
    """Recompute the projector from the whole gradient G (m, n) if this step is a refresh step.

    Returns False when the matrix cannot take a step now (the first projector failed); on a later failure
    the old projector is kept. Either way one warning names the parameter.
    """
    step = int(st["step"])
    if step % task.opts.update_proj_gap != 0:
        return True
    P = new_projector(opt, task, step, G)
    if P is None:
        return step > 0
    st["projector"].copy_(P)
    return True


def whole_matrix_step_(opt: Any, task: Any, st: dict[str, Any], G: torch.Tensor, target: torch.Tensor,
                       g_sq: torch.Tensor | None = None) -> bool:
    """Refresh (if due), then one low-rank step of target (m, n) from the whole gradient G. False if skipped.
    g_sq: see algorithm.whole_matrix_update_."""
    if not refresh_projector_(opt, task, st, G):
        return False
    st["step"] += 1
    lrs = LowRankState(st["projector"], st["exp_avg"], st["exp_avg_sq"], st["limiter_norm"])
    whole_matrix_update_(target, G, lrs, task.opts, task.side, int(st["step"]), g_sq)
    return True


def gradient_norms_up_front(opt: Any, tasks: list[Any]) -> list[torch.Tensor | None]:
    """For each task whose step reads ||G||^2 per row / column (a Fira matrix), those norms, computed now so
    that they also serve as its NaN/Inf check (opt.finite_mask(known=...)): one pass over G fewer per step.
    None for the others. Only when non-finite gradients are checked at all."""
    if not opt.skip_nonfinite:
        return [None] * len(tasks)
    out = []
    for t in tasks:
        o = t.opts
        if t.low_rank and algorithm.uses_gradient_norms(o, t.side, tuple(t.grad.shape)):
            m = opt.state.get(t.param, {}).get("exp_avg")  # the dtype the step will compute in
            dt = m.dtype if m is not None else opt.state_dtype(o, t.grad.dtype)
            out.append(algorithm.gradient_norms_sq(t.grad, t.side, dt))
        else:
            out.append(None)
    return out


def adam_step_(opt: Any, task: Any, g: torch.Tensor, target: torch.Tensor, state_key: Any) -> None:
    st = opt.init_adam_state(state_key, g, task.opts)
    st["step"] += 1
    adam_update_(target, g, st["exp_avg"], st["exp_avg_sq"], task.opts, int(st["step"]))


# Whether same-shape matrices of at most algorithm.STACKED_MAX_NUMEL numbers are updated together.
BATCH_SAME_SHAPE = True


def step_tasks_(opt: Any, tasks: list[Any], on_nonfinite: Callable[[Any], None]) -> None:
    """Whole-matrix Fira / elementwise Adam for tasks whose parameter and gradient are entirely local.

    Projector refreshes run matrix by matrix; the updates of same-shape matrices (same options, step and
    dtypes) of at most algorithm.STACKED_MAX_NUMEL numbers run stacked, with the same bits as one by one."""
    groups: dict[tuple, list[tuple[Any, dict[str, Any], torch.Tensor | None]]] = {}
    g_sqs = gradient_norms_up_front(opt, tasks)
    for task, g_sq, ok in zip(tasks, g_sqs, opt.finite_mask([t.grad for t in tasks], known=g_sqs)):
        if not ok:
            on_nonfinite(task)
            continue
        if not task.low_rank:
            adam_step_(opt, task, task.grad, task.param, task.param)
            continue
        st = opt.init_matrix_state(task.param, task)
        if task.grad.numel() > algorithm.STACKED_MAX_NUMEL or not BATCH_SAME_SHAPE:
            whole_matrix_step_(opt, task, st, task.grad, task.param, g_sq)
            continue
        if not refresh_projector_(opt, task, st, task.grad):
            continue
        st["step"] += 1
        key = (tuple(task.grad.shape), task.side, task.opts, int(st["step"]), task.param.dtype,
               st["exp_avg"].dtype, task.grad.device)
        groups.setdefault(key, []).append((task, st, g_sq))
    for (shape, side, o, step, *_), members in groups.items():
        states = [LowRankState(st["projector"], st["exp_avg"], st["exp_avg_sq"], st["limiter_norm"])
                  for _, st, _ in members]
        if is_left_square_quirk(side, tuple(states[0].exp_avg.shape), shape):  # never stacked
            for (task, _, _), lrs in zip(members, states):
                whole_matrix_update_(task.param, task.grad, lrs, o, side, step)
        else:
            g_sqs = [g for _, _, g in members]  # all None or none: same options, same check
            batched_update_([t.param for t, _, _ in members], [t.grad for t, _, _ in members], states, o, side,
                            step, None if g_sqs[0] is None else g_sqs)


class SingleProcess:
    """Everything on this process."""

    def __init__(self, opt: Any, process_group: Any = None):
        self.opt = opt
        self.skipped: dict[str, int] = {}  # parameter name -> steps skipped for a non-finite gradient

    def logical_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def expected_state_shapes(self) -> dict[torch.Tensor, dict[str, tuple[int, ...]]]:
        out = {}
        for gi, group in enumerate(self.opt.param_groups):
            o = self.opt.group_options(gi)
            for p in group["params"]:
                if o.low_rank and p.ndim == 2:
                    from fira_dist.projector import side_for

                    side = side_for(p.shape, o.proj_type.value)
                    lr_shape = lowrank_shape(p.shape, o.rank, side)
                    out[p] = {"projector": projector_shape(p.shape, o.rank, side), "exp_avg": lr_shape,
                              "exp_avg_sq": lr_shape}
                else:
                    out[p] = {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        return out

    def note_nonfinite(self, task: Any) -> None:
        self.skipped[task.name] = self.skipped.get(task.name, 0) + 1
        self.opt.warn_once(f"nf:{task.name}", f"gradient of {task.name} has NaN/Inf: its update is skipped "
                           f"(state untouched) at step {self.opt.global_step}; warning once")

    def step(self, tasks: list[Any]) -> None:
        step_tasks_(self.opt, tasks, self.note_nonfinite)

    def comm_stats(self) -> dict[str, Any]:
        return {"bytes_per_step": 0, "total_bytes": 0, "by_op": {}}
