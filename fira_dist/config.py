"""Validated configuration for Fira parameter groups.

A param group is "low rank" when it carries a ``rank`` key (as in ``fira.FiraAdamW``); every other group
gets plain Adam in the same form. ``GroupOptions`` is the validated view of one group's keys; it is
rebuilt from the group dict at every step (cheap), so users may edit ``optimizer.param_groups`` freely,
as with any torch optimizer.

Every error names the bad value, the accepted values and where it came from (``where``: a param group
index, or a ds_config key path).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping


@enum.unique
class ProjType(str, enum.Enum):
    STD = "std"  # right projection if m >= n else left (the reference default)
    REVERSE_STD = "reverse_std"  # left if m >= n else right
    LEFT = "left"
    RIGHT = "right"


@enum.unique
class Algorithm(str, enum.Enum):
    FIRA = "fira"  # low-rank Adam + norm-scaled residual + norm-growth limiter
    GALORE = "galore"  # low-rank Adam only


@enum.unique
class Residual(str, enum.Enum):
    REFERENCE = "reference"  # S = (G - alpha * back(R)) * phi, as the official code
    ORTHOGONAL = "orthogonal"  # S = (G - back(R)) * phi = ((I - PP^T) G) * phi


@enum.unique
class ProjectorKind(str, enum.Enum):
    SVD = "svd"  # exact torch.linalg.svd, as the reference
    RANDOMIZED = "randomized"  # randomized range finder + small SVD


@enum.unique
class StateDtype(str, enum.Enum):
    FLOAT32 = "float32"  # moments and projector in fp32 whatever the gradient dtype
    GRAD = "grad"  # moments and projector in the gradient's dtype (the reference's behaviour)


# Keys a param group may carry beyond torch's own (params, lr, betas, eps, weight_decay, ...).
GROUP_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "alpha": 1.0,
    "proj_type": "std",
    "algorithm": "fira",
    "limiter_gamma": 1.01,
    "residual": "reference",
    "projector": "svd",
    "state_dtype": "float32",
}


def _enum(cls: type[enum.Enum], value: Any, where: str) -> Any:
    try:
        return cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{where}={value!r} is not accepted; expected one of {accepted}") from None


def check_positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}={value!r} is not accepted; expected an integer >= 1")
    return value


def check_float(value: Any, where: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{where}={value!r} is not accepted; expected a number in {rng}")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupOptions:
    """The validated options of one param group (low-rank or Adam)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    correct_bias: bool
    rank: int | None = None
    update_proj_gap: int = 200
    alpha: float = 1.0
    proj_type: ProjType = ProjType.STD
    algorithm: Algorithm = Algorithm.FIRA
    limiter_gamma: float | None = 1.01
    residual: Residual = Residual.REFERENCE
    projector: ProjectorKind = ProjectorKind.SVD
    state_dtype: StateDtype = StateDtype.FLOAT32

    @property
    def low_rank(self) -> bool:
        return self.rank is not None

    @classmethod
    def from_group(cls, group: Mapping[str, Any], where: str = "param group") -> "GroupOptions":
        """Validate a torch param-group dict. ``scale`` (galore-torch's name) is accepted for ``alpha``."""
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{where}['betas']={betas!r} is not accepted; expected a pair (beta1, beta2)")
        rank = group.get("rank")
        if rank is not None:
            rank = check_positive_int(rank, f"{where}['rank']")
        gamma = group.get("limiter_gamma", GROUP_DEFAULTS["limiter_gamma"])
        if gamma is not None:
            gamma = check_float(gamma, f"{where}['limiter_gamma']", 1.0, math.inf, lo_open=True)
        return cls(
            lr=check_float(group["lr"], f"{where}['lr']", 0.0, math.inf),
            beta1=check_float(betas[0], f"{where}['betas'][0]", 0.0, 1.0, hi_open=True),
            beta2=check_float(betas[1], f"{where}['betas'][1]", 0.0, 1.0, hi_open=True),
            eps=check_float(group["eps"], f"{where}['eps']", 0.0, math.inf),
            weight_decay=check_float(group["weight_decay"], f"{where}['weight_decay']", 0.0, math.inf),
            correct_bias=bool(group.get("correct_bias", True)),
            rank=rank,
            update_proj_gap=check_positive_int(
                group.get("update_proj_gap", GROUP_DEFAULTS["update_proj_gap"]), f"{where}['update_proj_gap']"
            ),
            alpha=check_float(group.get("alpha", GROUP_DEFAULTS["alpha"]), f"{where}['alpha']", 0.0, math.inf),
            proj_type=_enum(ProjType, group.get("proj_type", "std"), f"{where}['proj_type']"),
            algorithm=_enum(Algorithm, group.get("algorithm", "fira"), f"{where}['algorithm']"),
            limiter_gamma=gamma,
            residual=_enum(Residual, group.get("residual", "reference"), f"{where}['residual']"),
            projector=_enum(ProjectorKind, group.get("projector", "svd"), f"{where}['projector']"),
            state_dtype=_enum(StateDtype, group.get("state_dtype", "float32"), f"{where}['state_dtype']"),
        )


def normalize_group(group: dict[str, Any], where: str) -> None:
    """Fold galore-torch's ``scale`` into ``alpha`` in place (both given and different is an error)."""
    if "scale" in group:
        scale = group.pop("scale")
        if "alpha" in group and group["alpha"] != scale:
            raise ValueError(
                f"{where} sets both 'alpha'={group['alpha']!r} and 'scale'={scale!r}; 'scale' is another name for "
                "'alpha': give one of them"
            )
        group["alpha"] = scale


# The learning-rate multiplier of the first update after a momentum reset (Glentis et al. 2025's recovery ramp
# starts at 0.001 x the scheduled value).
RECOVERY_START = 1e-3
DEFAULT_RECOVERY_STEPS = 10  # theirs; a recovery_steps left unset is min(10, interval - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MomentumReset:
    """When the optimizer forgets its moments, and how the learning rate recovers (arXiv 2505.22922).

    ``interval`` K: before update K + 1, 2K + 1, ... (i.e. after every K completed engine steps) every parameter's
    Adam moments and step count are zeroed (bias correction starts over), as if the optimizer were rebuilt.
    ``recovery_steps`` R: the j-th update after a reset (j = 0, 1, ...) runs at ``lr_factor`` = 0.001 + 0.999 j / R
    times the scheduled learning rate while j < R, then at 1x: a linear ramp applied inside the optimizer, on top of
    whatever scheduler sets ``lr``. ``interval=None``: never (the factor is always 1). ``recovery_steps`` left
    unset (None in ``from_values``): min(10, interval - 1).
    """

    interval: int | None = None
    recovery_steps: int = 10

    @classmethod
    def from_values(cls, interval: Any, recovery_steps: Any, where_interval: str, where_recovery: str
                    ) -> "MomentumReset":
        """Validated; errors name the key (``where_*``), the value and what is accepted."""
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"{where_interval}={interval!r} is not accepted; expected an integer >= 1 (reset every "
                             "that many steps) or None (never)")
        if recovery_steps is None:
            recovery_steps = DEFAULT_RECOVERY_STEPS if interval is None else min(DEFAULT_RECOVERY_STEPS, interval - 1)
        if isinstance(recovery_steps, bool) or not isinstance(recovery_steps, int) or recovery_steps < 0:
            raise ValueError(f"{where_recovery}={recovery_steps!r} is not accepted; expected an integer >= 0 (0: no "
                             "learning-rate ramp after a reset)")
        if interval is not None and recovery_steps >= interval:
            raise ValueError(f"{where_recovery}={recovery_steps!r} is not accepted with {where_interval}={interval}; "
                             f"expected an integer in [0, {interval - 1}] (the ramp must end before the next reset)")
        return cls(interval=interval, recovery_steps=recovery_steps)

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def due(self, completed: int) -> bool:
        """Whether the update that follows ``completed`` engine steps starts with a reset."""
        return self.interval is not None and completed > 0 and completed % self.interval == 0

    def lr_factor(self, completed: int) -> float:
        """The learning-rate multiplier of the update that follows ``completed`` engine steps."""
        if self.interval is None or completed < self.interval or self.recovery_steps == 0:
            return 1.0
        j = completed % self.interval  # updates since the last reset
        if j >= self.recovery_steps:
            return 1.0
        return RECOVERY_START + (1.0 - RECOVERY_START) * j / self.recovery_steps
