"""``fira_dist.Fira``: the torch optimizer users construct, and ``param_groups`` to build its groups.

The optimizer owns the param groups, the state dict and validation; how gradients, state and updates are
laid out across ranks is the job of a layout object (``fira_dist.layouts``), chosen from the parameters
it is given: one process, replicated gradients (DDP / ZeRO-0), FSDP2 row shards, or DeepSpeed ZeRO flat
partitions. All layouts use the same per-matrix math (``fira_dist.algorithm``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fira_dist import reference_state
from fira_dist.config import GROUP_DEFAULTS, GroupOptions, MomentumReset, normalize_group
from fira_dist.projector import lowrank_shape, projector_shape, side_for

log = logging.getLogger(__name__)

# The param-group key that carries the engine-step count in checkpoints when momentum resets are on.
CLOCK_KEY = "global_step"
# State tensors a momentum reset keeps (a projector is replaced at the next step's refresh anyway).
KEPT_AT_RESET = ("projector",)


@dataclasses.dataclass
class Task:
    """One parameter to update this step, as the layout sees it."""

    param: torch.Tensor
    grad: torch.Tensor
    opts: GroupOptions
    name: str
    shape: tuple[int, ...]  # the parameter's logical (full) shape

    @property
    def low_rank(self) -> bool:
        return self.opts.low_rank and len(self.shape) == 2

    @property
    def side(self) -> str:
        return side_for(self.shape, self.opts.proj_type.value)


class Fira(torch.optim.Optimizer):
    """Fira (arXiv 2410.01623): low-rank Adam + norm-scaled full-rank residual + norm-growth limiter.

    Param groups as ``fira.FiraAdamW``: a group with ``rank`` is low rank, with the keys ``update_proj_gap``,
    ``alpha`` (or galore-torch's ``scale``) and ``proj_type``; other groups get plain Adam. The constructor's
    keyword arguments are the defaults for every group; each default reproduces the reference:

    Args:
        params: parameters or param groups (``fira_dist.param_groups(model, ...)`` builds them).
        lr, betas, eps, weight_decay, correct_bias: as ``fira.FiraAdamW`` (eps=1e-6, decoupled decay).
        update_proj_gap: steps between projector refreshes (refresh at step 0, T, 2T, ...).
        alpha: scale of the low-rank update (the paper's alpha; galore-torch's ``scale``).
        proj_type: "std" | "reverse_std" | "left" | "right".
        algorithm: "fira" | "galore" (low-rank Adam only: no residual, no scaling, no limiter).
        limiter_gamma: the norm-growth limiter's gamma (1.01); None turns the limiter off.
        residual: "reference" (alpha inside the residual, as the official code) | "orthogonal" ((I - PP^T) G).
        projector: "svd" (exact, as the reference) | "randomized" (range finder; see projector.py).
        state_dtype: "float32" (default) | "grad" (moments and projector in the gradient dtype, as the reference).
        skip_nonfinite: a parameter whose gradient has NaN/Inf is skipped for the step (state untouched),
            with one warning per parameter name.
        layout: "auto" | "single" | "replicated" | "row_sharded" | a layout object (see fira_dist.layouts).
        process_group: the data-parallel group for distributed layouts (default: the world).
        comm_bucket_bytes: the most bytes one exchange of the optimizer's step may buffer on a rank (gradient and
            weight pieces, gathered values, projector refreshes); larger exchanges run in rounds, and a matrix
            larger than the budget moves alone. None: 64 MiB, or under DeepSpeed its ``reduce_bucket_size`` x
            the gradient's element size (see fira_dist.layouts.plan).
        momentum_reset_interval: K >= 1, or None (default: never). After every K completed steps, before the next
            update, every parameter's moments and step count are zeroed, for every kind of group (low-rank Fira and
            GaLore moments, plain Adam): a fresh start, as the optimizer rebuild of Glentis et al. 2025 (arXiv
            2505.22922). The step count going to 0 also refreshes every projector at the next step and restarts the
            norm-growth limiter (no previous norm), as a new optimizer would; projector tensors keep their values
            until that refresh. Keys and shapes of the state do not change (tensors are zeroed in place), so
            checkpoints and DCP resharding work as before.
        recovery_steps: R in [0, K - 1] (default min(10, K - 1)): the j-th update after a reset runs at
            (0.001 + 0.999 j / R) times the group's ``lr``, j < R; applied inside step(), so it works under any
            scheduler (ours, DeepSpeed's, the Hugging Face Trainer's), which keeps setting ``lr`` as if there were
            no resets.

    The reset clock is the number of engine steps taken (``global_step``: one per ``step()`` call, or per ZeRO engine
    step however many times DeepSpeed calls ``step()`` in it); with resets on it is saved in every param group as
    ``"global_step"`` and restored by ``load_state_dict``, so a resumed run resets and ramps on the same steps.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        update_proj_gap: int = GROUP_DEFAULTS["update_proj_gap"],
        alpha: float = GROUP_DEFAULTS["alpha"],
        proj_type: str = GROUP_DEFAULTS["proj_type"],
        algorithm: str = GROUP_DEFAULTS["algorithm"],
        limiter_gamma: float | None = GROUP_DEFAULTS["limiter_gamma"],
        residual: str = GROUP_DEFAULTS["residual"],
        projector: str = GROUP_DEFAULTS["projector"],
        state_dtype: str = GROUP_DEFAULTS["state_dtype"],
        skip_nonfinite: bool = True,
        layout: Any = "auto",
        process_group: Any = None,
        comm_bucket_bytes: int | None = None,
        momentum_reset_interval: int | None = None,
        recovery_steps: int | None = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_proj_gap=update_proj_gap, alpha=alpha, proj_type=proj_type, algorithm=algorithm,
            limiter_gamma=limiter_gamma, residual=residual, projector=projector, state_dtype=state_dtype,
        )
        GroupOptions.from_group(defaults, where="Fira(...)")  # validate the constructor's arguments
        self.momentum_reset = MomentumReset.from_values(
            momentum_reset_interval, recovery_steps, "Fira(momentum_reset_interval)", "Fira(recovery_steps)")
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        from fira_dist.layouts.plan import DEFAULT_COMM_BUCKET_BYTES, check_comm_bucket_bytes

        self.comm_bucket_bytes_explicit = comm_bucket_bytes is not None
        self.comm_bucket_bytes = (DEFAULT_COMM_BUCKET_BYTES if comm_bucket_bytes is None else
                                  check_comm_bucket_bytes(comm_bucket_bytes, "Fira(comm_bucket_bytes)"))
        self._warned: set[str] = set()
        self.global_step = 0  # engine steps taken (one per call of step(), or per step_end() under ZeRO)
        from fira_dist.layouts import make_layout  # late import: layouts import this module

        self.layout = make_layout(self, layout, process_group)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"param_groups[{len(self.param_groups)}]"
        normalize_group(param_group, where)
        if param_group.get("rank") is None:
            param_group.pop("rank", None)
        if getattr(self, "momentum_reset", None) is not None and self.momentum_reset.enabled:
            param_group.setdefault(CLOCK_KEY, getattr(self, "global_step", 0))
        super().add_param_group(param_group)
        GroupOptions.from_group(self.param_groups[-1], where=where)

    def group_options(self, index: int) -> GroupOptions:
        return GroupOptions.from_group(self.param_groups[index], where=f"param_groups[{index}]")

    def param_name(self, group: dict[str, Any], i: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names is not None:
            return names[i]
        return f"param {i} of group {self.param_groups.index(group)} {tuple(p.shape)}"

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning(message)

    # ------------------------------------------------------------------ state
    def state_dtype(self, opts: GroupOptions, grad_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if opts.state_dtype.value == "float32" else grad_dtype

    def init_matrix_state(self, p: torch.Tensor, task: Task, local_rows: int | None = None) -> dict[str, Any]:
        """State of a whole low-rank matrix: step (CPU), projector, exp_avg, exp_avg_sq, limiter_norm."""
        st = self.state[p]
        if "exp_avg" not in st:
            dt = self.state_dtype(task.opts, task.grad.dtype)
            dev = task.grad.device
            st["step"] = torch.tensor(0.0)
            st["projector"] = torch.zeros(projector_shape(task.shape, task.opts.rank, task.side), dtype=dt, device=dev)
            st["exp_avg"] = torch.zeros(lowrank_shape(task.shape, task.opts.rank, task.side), dtype=dt, device=dev)
            st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            st["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=dev)
        return st

    def init_adam_state(self, p: torch.Tensor, like: torch.Tensor, opts: GroupOptions) -> dict[str, Any]:
        st = self.state[p]
        if "exp_avg" not in st:
            dt = self.state_dtype(opts, like.dtype)
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros(like.shape, dtype=dt, device=like.device)
            st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
        return st

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but state tensors keep their saved dtype (fp32 moments stay fp32 beside bf16 weights),
        and a state whose shapes do not fit this optimizer's parameters is refused naming the parameter.
        A ``fira.FiraAdamW`` / galore-torch ``GaLoreAdamW`` state dict is converted first, and options a saved
        group lacks come from this optimizer's group (``fira_dist.reference_state.prepare_for_load``)."""
        state_dict = reference_state.prepare_for_load(self, state_dict)
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        id_map = dict(zip(ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        expected = self.layout.expected_state_shapes()
        for k, v in saved_state.items():
            if k not in id_map:
                raise ValueError(f"optimizer state dict has state for parameter index {k}, which this optimizer lacks")
            p = id_map[k]
            want = expected.get(p)
            for key, val in v.items():
                if want is not None and key in want and tuple(val.shape) != want[key]:
                    raise ValueError(
                        f"optimizer state {key!r} of {self._name_of(p)} has shape {tuple(val.shape)}, expected "
                        f"{want[key]} for this optimizer (different rank, proj_type or model?)"
                    )
            self.state[p] = {
                key: (val.clone() if key == "step" else val.to(device=p.device, copy=True))
                if isinstance(val, torch.Tensor) else val
                for key, val in v.items()
            }
        clocks = [int(g[CLOCK_KEY]) for g in self.param_groups if CLOCK_KEY in g]
        if clocks:  # the reset clock of a checkpoint written with momentum resets on
            self.global_step = max(clocks)
            if hasattr(self.layout, "engine_step"):  # a layout that counts engine steps itself (DeepSpeed)
                self.layout.engine_step = self.global_step
        if self.momentum_reset.enabled:
            for g in self.param_groups:
                g[CLOCK_KEY] = self.global_step
        after_load = getattr(self.layout, "after_load_state_dict", None)
        if after_load is not None:  # a distributed layout moves the loaded state where it lives (may be collective)
            after_load()

    def state_dict(self) -> dict[str, Any]:
        """As torch's; with momentum resets on, every saved group carries the engine-step count (``CLOCK_KEY``)."""
        sd = super().state_dict()
        if self.momentum_reset.enabled:
            for g in sd["param_groups"]:
                g[CLOCK_KEY] = self.global_step
        return sd

    def _name_of(self, p: torch.Tensor) -> str:
        for group in self.param_groups:
            for i, q in enumerate(group["params"]):
                if q is p:
                    return self.param_name(group, i, q)
        return f"parameter {tuple(p.shape)}"

    # ------------------------------------------------------------------ step
    def tasks(self) -> list[Task]:
        """The parameters with a gradient, in group order."""
        out = []
        for gi, group in enumerate(self.param_groups):
            opts = GroupOptions.from_group(group, where=f"param_groups[{gi}]")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = self.param_name(group, i, p)
                shape = self.layout.logical_shape(p)
                if opts.low_rank and len(shape) != 2:
                    self.warn_once(
                        f"nd:{name}", f"{name} has shape {tuple(shape)} in a group with 'rank': only 2-D weights are "
                        "projected; it gets plain Adam",
                    )
                out.append(Task(p, p.grad, opts, name, tuple(shape)))
        return out

    def finite_mask(self, grads: list[torch.Tensor], known: list[torch.Tensor | None] | None = None) -> list[bool]:
        """One host sync for all gradients: is each one free of NaN/Inf?

        known[i], where given, is a tensor computed from grads[i] that is finite iff grads[i] is (the squared row
        norms a Fira step needs anyway): it stands in for grads[i], which then is not read again.
        """
        if not self.skip_nonfinite or not grads:
            return [True] * len(grads)
        known = known or [None] * len(grads)
        todo = [g.float() if g.dtype not in (torch.float32, torch.float64) else g
                for g, k in zip(grads, known) if k is None]
        norms = iter(torch._foreach_norm(todo) if todo else [])
        sums = [next(norms) if k is None else k.sum() for k in known]
        return torch.isfinite(torch.stack([s.float().cpu() for s in sums])).tolist()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Under ZeRO, param_groups holds only the group (sub-group) DeepSpeed steps now: a reset zeroes the state of
        # what this call updates, before updating it, so every group is reset once per engine step before its update.
        completed = self.completed_steps()
        if self.momentum_reset.due(completed):
            self.reset_momentum_()
        factor = self.momentum_reset.lr_factor(completed)
        saved = [(g, g["lr"]) for g in self.param_groups] if factor != 1.0 else []
        try:
            for g, lr in saved:  # the recovery ramp, on top of whatever the scheduler set
                g["lr"] = lr * factor
            # A layout that sees something other than whole parameters (DeepSpeed ZeRO's flat partitions) builds
            # its own tasks, and counts engine steps itself (ZeRO calls step() once per group or sub-group).
            self.layout.step(self.layout.tasks() if hasattr(self.layout, "tasks") else self.tasks())
        finally:
            for g, lr in saved:
                g["lr"] = lr
        self.global_step = getattr(self.layout, "engine_step", self.global_step + 1)
        if self.momentum_reset.enabled:
            for g in self.param_groups:
                g[CLOCK_KEY] = self.global_step
        return loss

    # ------------------------------------------------------------------ momentum reset
    def completed_steps(self) -> int:
        """Engine steps completed before the coming update (the layout's count under DeepSpeed ZeRO)."""
        return int(getattr(self.layout, "engine_step", self.global_step))

    def momentum_reset_due(self) -> bool:
        """Whether the next step() starts with a momentum reset (e.g. to refactorize a low-rank model first)."""
        return self.momentum_reset.due(self.completed_steps())

    def lr_factor(self) -> float:
        """The recovery ramp's multiplier of ``lr`` for the next step() (1.0 outside a ramp)."""
        return self.momentum_reset.lr_factor(self.completed_steps())

    @torch.no_grad()
    def reset_momentum_(self) -> int:
        """Zero, in place, the state of every parameter in ``param_groups`` (all of them, or the group DeepSpeed is
        stepping): moments, limiter norms and step counters; projectors are kept until the next refresh, which the
        zero step count makes due. Walks nested dicts (the ZeRO layout keeps per-matrix state under the flat
        partition) and DTensors by their local tensor; other values (layout metadata) are left alone. No
        collectives: every rank zeroes what it holds. Returns the number of tensors zeroed."""
        count = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    count += _zero_state_(st)
        return count

    def comm_stats(self) -> dict[str, Any]:
        """Bytes moved by this optimizer's collectives (see fira_dist.comm)."""
        return self.layout.comm_stats()


def _zero_state_(st: dict[str, Any]) -> int:
    n = 0
    for key, val in st.items():
        if isinstance(val, dict):
            n += _zero_state_(val)
        elif isinstance(val, torch.Tensor) and key not in KEPT_AT_RESET:
            (val.to_local() if hasattr(val, "to_local") else val).zero_()
            n += 1
        elif key == "step" and isinstance(val, (int, float)):
            st[key] = type(val)(0)
    return n


def param_groups(
    model: nn.Module,
    target_modules: Iterable[str] = ("attn", "mlp"),
    rank: int = 128,
    update_proj_gap: int = 200,
    alpha: float = 0.25,
    proj_type: str = "std",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Two param groups: 2-D weights of ``nn.Linear`` modules whose name contains any of ``target_modules``
    (low rank, with ``rank`` etc.), and everything else (plain Adam). Parameters are given with their names
    so that warnings and checkpoints can name them. The choice is logged (INFO), never printed.
    """
    targets = tuple(target_modules)
    picked: dict[int, str] = {}
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in mname for t in targets) and module.weight.requires_grad:
            picked[id(module.weight)] = f"{mname}.weight"
    if not picked:
        raise ValueError(
            f"target_modules={targets!r} matched no nn.Linear module of {type(model).__name__}; module names look "
            f"like {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]}"
        )
    low, rest, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (low if id(p) in picked else rest).append((name, p))
    log.info("Fira low-rank (rank %d) for %d matrices: %s", rank, len(low), ", ".join(n for n, _ in low))
    log.info("plain Adam for %d tensors", len(rest))
    groups = [{"params": rest}] if rest else []
    groups.append({"params": low, "rank": rank, "update_proj_gap": update_proj_gap, "alpha": alpha,
                   "proj_type": proj_type, **group_options})
    return groups
