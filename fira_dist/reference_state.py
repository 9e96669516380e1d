"""Continue a run of the official optimizers: ``fira.FiraAdamW`` (fira 1.0.2) and galore-torch 1.0 ``GaLoreAdamW``
state dicts, converted to ``fira_dist.Fira``'s single-process state format. Also ``fira-dist convert-state``.

The reference's state per parameter (fira/fira_adamw.py, fira/gradient_projection.py, galore_torch/adamw.py,
galore_torch/galore_projector.py):

- ``step``: a Python int, the steps taken. The projector is refreshed when ``step % update_proj_gap == 0`` with
  step read BEFORE its increment; ``fira_dist`` keeps the same count and rule (layouts/single.py
  ``refresh_projector_``), so ``step`` carries over unchanged and the next refresh comes at the same step.
- ``projector`` (groups with ``rank``): a ``GradientProjector`` (fira; ``alpha``) or ``GaLoreProjector`` (galore;
  ``scale``) object holding ``rank``, ``update_proj_gap``, ``proj_type`` and the matrix ``ortho_matrix``, in the
  gradient's dtype. For a weight of shape (m, n) and k = min(rank, m, n): right projection (R = G Q^T)
  ``Vh[:rank, :]``, shape (k, n); left projection (R = P^T G) ``U[:, :rank]``, shape (m, k). Which side:
  ``std`` right if m >= n else left, ``reverse_std`` the opposite, ``left`` / ``right`` as named (``project``,
  from the gradient's shape; the same rule as ``projector.side_for``). ``full`` (two matrices) has no
  counterpart here. The projector object's own ``rank``, ``update_proj_gap``, ``alpha``/``scale`` and
  ``proj_type`` are what the reference uses, so they must equal their group's (one value per group here).
- ``exp_avg``, ``exp_avg_sq``: Adam moments of R, (m, k) right / (k, n) left, or of the whole gradient (plain
  Adam), in the gradient's dtype. The reference does not reset or rotate them at a refresh; nor does fira_dist.
- ``scaling_grad`` (fira only, from the first step on): the limiter's previous ||S|| (0-d).

The result (``convert_state_dict``) is the state format ``Fira.state_dict()`` gives on one process: per
parameter ``step`` (0-d float32, CPU), ``projector``, ``exp_avg``, ``exp_avg_sq`` (the state dtype) and
``limiter_norm`` (0-d float32; 0 for GaLore), or ``step``, ``exp_avg``, ``exp_avg_sq`` for plain Adam; plain
full tensors, which the distributed layouts take through ``load_state_dict`` too. Param groups keep the
reference's values; galore-torch's ``scale`` becomes ``alpha``, and each low-rank group gets the ``algorithm``
its source implies (``fira`` / ``galore``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fira_dist.config import GROUP_DEFAULTS, GroupOptions, StateDtype, normalize_group
from fira_dist.projector import lowrank_shape, projector_shape, side_for

# Projector classes by class name (the packages' modules, or a vendored copy of the paper's code) -> source.
PROJECTOR_CLASSES = {"GradientProjector": "fira", "GaLoreProjector": "galore"}
ACCEPTED_CLASSES = ("fira.gradient_projection.GradientProjector (fira.FiraAdamW), "
                    "galore_torch.galore_projector.GaLoreProjector (galore-torch GaLoreAdamW)")
SOURCES = {"fira": "fira.FiraAdamW", "galore": "galore-torch GaLoreAdamW"}
ALPHA_ATTR = {"fira": "alpha", "galore": "scale"}
PROJ_TYPES = ("std", "reverse_std", "left", "right")
LOW_RANK_KEYS = {"fira": {"step", "projector", "exp_avg", "exp_avg_sq", "scaling_grad"},
                 "galore": {"step", "projector", "exp_avg", "exp_avg_sq"}}
ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}


def is_reference_state_dict(state_dict: Any) -> bool:
    """Whether ``state_dict`` (an optimizer state dict) comes from the reference optimizers rather than from
    ``fira_dist.Fira``: a projector object (not a tensor), a ``scaling_grad`` key, a step that is a number
    rather than a tensor, or galore-torch's group key ``scale``."""
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        return False
    for st in state_dict["state"].values():
        if not isinstance(st, Mapping):
            continue
        if "scaling_grad" in st or ("projector" in st and not isinstance(st["projector"], torch.Tensor)):
            return True
        if "step" in st and isinstance(st["step"], (int, float)):
            return True
    return any(isinstance(g, Mapping) and "scale" in g for g in state_dict.get("param_groups") or [])


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def _step(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"reference state 'step' of {name} is {value!r}; expected a whole number >= 0")
    return value


def _compact(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, contiguous and owning no more storage than it shows (the reference's U[:, :rank] is a view of
    U: saved as it is, a file would carry all of U). Shares storage with t when nothing needs to change."""
    t = t.detach().to(dtype)
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _moments(st: Mapping[str, Any], name: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    m, v = st.get("exp_avg"), st.get("exp_avg_sq")
    if not (isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor)) or m.shape != v.shape:
        raise ValueError(
            f"reference state of {name} has exp_avg {_describe(m) if m is not None else 'missing'} and exp_avg_sq "
            f"{_describe(v) if v is not None else 'missing'}; {what} expects two tensors of one shape")
    return m, v


def _check_shapes(q: tuple[int, ...], e: tuple[int, ...], rank: int, proj_type: str, shape: tuple[int, ...] | None,
                  name: str) -> None:
    """That a projector of shape q and moments of shape e are those of a (m, n) weight with this rank and proj_type
    (the parameter's shape where known, else any): right q = (k, n), e = (m, k); left q = (m, k), e = (k, n);
    k = min(rank, m, n)."""
    def fits(side: str, full: tuple[int, int]) -> bool:
        return (side_for(full, proj_type) == side and projector_shape(full, rank, side) == q
                and lowrank_shape(full, rank, side) == e)

    if shape is not None and len(shape) != 2:
        raise ValueError(f"reference state of {name} has a projector, but the parameter has shape {tuple(shape)}: "
                         "only 2-D weights are projected (different model?)")
    if shape is not None:
        side = side_for(shape, proj_type)
        if not fits(side, tuple(shape)):
            raise ValueError(
                f"reference state of {name} (shape {tuple(shape)}) has a projector of shape {q} and moments of shape "
                f"{e}; with rank {rank} and proj_type {proj_type!r} ({side} projection) fira_dist expects "
                f"{projector_shape(shape, rank, side)} and {lowrank_shape(shape, rank, side)} (different rank, "
                "proj_type or model?)")
    elif not (fits("right", (e[0], q[1])) or fits("left", (q[0], e[1]))):
        raise ValueError(
            f"reference state of {name} has a projector of shape {q} and moments of shape {e}, which fit no (m, n) "
            f"weight with rank {rank} and proj_type {proj_type!r}: expected (k, n) and (m, k) for a right projection "
            "or (m, k) and (k, n) for a left one, k = min(rank, m, n)")


def _low_rank_entry(st: Mapping[str, Any], group: Mapping[str, Any], name: str, shape: tuple[int, ...] | None,
                    state_dtype: str) -> tuple[dict[str, torch.Tensor], str]:
    """(our state, source kind) for one parameter of a reference group with ``rank``."""
    proj = st.get("projector")
    if proj is None:
        raise ValueError(f"reference state of {name} (a param group with 'rank') has no 'projector' (keys "
                         f"{sorted(st)}); expected step, projector, exp_avg, exp_avg_sq")
    kind = PROJECTOR_CLASSES.get(type(proj).__name__)
    attrs = ("rank", "update_proj_gap", "proj_type", "ortho_matrix", ALPHA_ATTR.get(kind, "alpha"))
    if kind is None or not all(hasattr(proj, a) for a in attrs):
        raise ValueError(f"the projector of {name} is {_describe(proj)}, which cannot be carried over; accepted: "
                         f"{ACCEPTED_CLASSES}")
    extra = set(st) - LOW_RANK_KEYS[kind]
    if extra:
        raise ValueError(f"reference state of {name} has keys {sorted(extra)} that {SOURCES[kind]} does not write; "
                         f"accepted keys: {sorted(LOW_RANK_KEYS[kind])}")
    if proj.proj_type not in PROJ_TYPES:
        raise ValueError(f"the projector of {name} has proj_type={proj.proj_type!r}, which fira_dist does not "
                         f"support; accepted: {', '.join(PROJ_TYPES)}")
    for attr, key in (("rank", "rank"), ("update_proj_gap", "update_proj_gap"), ("proj_type", "proj_type"),
                      (ALPHA_ATTR[kind], "alpha")):
        mine, theirs = getattr(proj, attr), group.get(key, GROUP_DEFAULTS.get(key))
        if mine != theirs:
            raise ValueError(
                f"the projector of {name} has {attr}={mine!r} but its param group has {key}={theirs!r}; the reference "
                f"steps with the projector's value, fira_dist with one value per group, so this state cannot be "
                f"carried over as it is: set the group's {key!r} to {mine!r} in the state dict to keep the projector's")
    step = _step(st.get("step", 0), name)
    q = proj.ortho_matrix
    if not (isinstance(q, torch.Tensor) and q.dim() == 2):
        raise ValueError(f"the projector of {name} holds {_describe(q) if q is not None else 'no matrix'}; expected "
                         f"a 2-D tensor (proj_type {proj.proj_type!r})")
    m, v = _moments(st, name, f"a {SOURCES[kind]} low-rank state")
    _check_shapes(tuple(q.shape), tuple(m.shape), int(group["rank"]), proj.proj_type, shape, name)
    if kind == "fira" and "scaling_grad" in st:
        prev = st["scaling_grad"]
        if not (isinstance(prev, torch.Tensor) and prev.numel() == 1) and not isinstance(prev, (int, float)):
            raise ValueError(f"reference state 'scaling_grad' of {name} is {_describe(prev)}; expected one number "
                             "(the limiter's previous ||S||)")
        limiter_norm = torch.as_tensor(prev).detach().to(torch.float32).reshape(()).clone()
    elif kind == "fira" and step > 0:
        raise ValueError(f"reference state of {name} is at step {step} but has no 'scaling_grad' (the norm-growth "
                         f"limiter's previous ||S||, which fira.FiraAdamW stores at its first step)")
    else:  # GaLore has no limiter (and a fira state before its first step has no previous norm)
        limiter_norm = torch.zeros((), dtype=torch.float32, device=m.device)
    dt = torch.float32 if state_dtype == StateDtype.FLOAT32.value else m.dtype
    return {"step": torch.tensor(float(step)), "projector": _compact(q, dt), "exp_avg": _compact(m, dt),
            "exp_avg_sq": _compact(v, dt), "limiter_norm": limiter_norm}, kind


def _adam_entry(st: Mapping[str, Any], name: str, shape: tuple[int, ...] | None,
                state_dtype: str) -> dict[str, torch.Tensor]:
    extra = set(st) - ADAM_KEYS
    if extra:
        raise ValueError(f"reference state of {name} (a param group without 'rank': plain Adam) has keys "
                         f"{sorted(extra)}; accepted keys: {sorted(ADAM_KEYS)}")
    m, v = _moments(st, name, "plain Adam")
    if shape is not None and tuple(m.shape) != tuple(shape):
        raise ValueError(f"reference state 'exp_avg' of {name} has shape {tuple(m.shape)}, expected the parameter's "
                         f"{tuple(shape)} (different model?)")
    dt = torch.float32 if state_dtype == StateDtype.FLOAT32.value else m.dtype
    return {"step": torch.tensor(float(_step(st.get("step", 0), name))), "exp_avg": _compact(m, dt),
            "exp_avg_sq": _compact(v, dt)}


def convert_state_dict(
    state_dict: Mapping[str, Any],
    *,
    names: Mapping[Any, str] | None = None,
    shapes: Mapping[Any, tuple[int, ...]] | None = None,
    state_dtypes: str | Sequence[str] = StateDtype.FLOAT32.value,
) -> dict[str, Any]:
    """A ``fira.FiraAdamW`` / ``GaLoreAdamW`` state dict as ``fira_dist.Fira``'s single-process state dict.

    names, shapes: by the state dict's parameter index, the name for messages and the parameter's (m, n) shape to
    check against (``Fira.load_state_dict`` passes its own); without them, names come from the groups'
    ``param_names`` (else "parameter index K of param_groups[G]") and the shape is inferred from the projector and
    moments. state_dtypes: per param group (or one for all), "float32" casts moments and projectors to float32,
    "grad" keeps the reference's dtype (the gradient's). The input is not modified; output tensors may share
    storage with it. Raises ValueError, naming the parameter, the bad value and what is accepted, for anything
    that cannot be carried over exactly.
    """
    if not is_reference_state_dict(state_dict):
        raise ValueError("not a fira.FiraAdamW / galore-torch GaLoreAdamW state dict: no projector objects, "
                         "'scaling_grad', numeric steps or 'scale' group key found")
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        raise ValueError(f"the state dict's 'param_groups' is {_describe(groups)}; expected a list of dicts")
    dtypes = [state_dtypes] * len(groups) if isinstance(state_dtypes, str) else list(state_dtypes)
    state, out_state, out_groups, kinds = state_dict["state"], {}, [], set()
    for gi, group in enumerate(groups):
        where = f"param_groups[{gi}]"
        g = {k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in group.items()}
        source_galore = "scale" in g
        normalize_group(g, where)
        group_kinds = set()
        for i, pid in enumerate(g["params"]):
            if pid not in state:
                continue
            if names is not None and pid in names:
                name = names[pid]
            elif g.get("param_names") is not None:
                name = repr(g["param_names"][i])
            else:
                name = f"parameter index {pid} of {where}"
            shape = None if shapes is None else shapes.get(pid)
            if not isinstance(state[pid], Mapping):
                raise ValueError(f"reference state of {name} is {_describe(state[pid])}; expected a dict")
            if g.get("rank") is not None:
                out_state[pid], kind = _low_rank_entry(state[pid], g, name, shape, dtypes[gi])
                group_kinds.add(kind)
            else:
                out_state[pid] = _adam_entry(state[pid], name, shape, dtypes[gi])
        if g.get("rank") is not None:
            group_kinds = group_kinds or {"galore" if source_galore else "fira"}
            if len(group_kinds) > 1:
                raise ValueError(f"{where} holds both fira and galore-torch projectors; expected one source")
            g["algorithm"] = group_kinds.pop()
            kinds.add(g["algorithm"])
        GroupOptions.from_group(g, where=f"the converted state dict's {where}")
        out_groups.append(g)
    if len(kinds) > 1:
        raise ValueError("the state dict mixes fira.FiraAdamW and galore-torch GaLoreAdamW groups; expected one source")
    return {"state": out_state, "param_groups": out_groups}


def _rank_text(rank: Any) -> str:
    return "no 'rank' (plain Adam)" if rank is None else f"rank={rank!r}"


def prepare_for_load(opt: Any, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """What ``Fira.load_state_dict`` loads: a reference state dict converted (with ``opt``'s parameter names,
    shapes and state dtypes), and every saved group's missing Fira options (``algorithm``, ``state_dtype``,
    ``limiter_gamma``, ...) taken from ``opt``'s own group rather than from the library defaults, since torch's
    ``load_state_dict`` replaces whole groups. A state dict whose groups do not match ``opt``'s in number is
    returned as it is (torch's own check then says what is wrong)."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(opt.param_groups):
        return state_dict
    if is_reference_state_dict(state_dict):
        if any(len(s.get("params", ())) != len(g["params"]) for s, g in zip(saved, opt.param_groups)):
            return state_dict
        for gi, (s, g) in enumerate(zip(saved, opt.param_groups)):
            if s.get("rank") != g.get("rank"):
                theirs, ours = (_rank_text(x.get("rank")) for x in (s, g))
                raise ValueError(f"param_groups[{gi}] of the reference state dict has {theirs} and this optimizer's "
                                 f"has {ours}; its state was made for the former: build this optimizer's group with "
                                 f"{theirs} to continue the run")
        names, shapes = {}, {}
        for s, g in zip(saved, opt.param_groups):
            for i, (pid, p) in enumerate(zip(s["params"], g["params"])):
                names[pid] = repr(g["param_names"][i]) if g.get("param_names") else opt.param_name(g, i, p)
                shapes[pid] = tuple(opt.layout.logical_shape(p))
        dtypes = [s.get("state_dtype", g.get("state_dtype", GROUP_DEFAULTS["state_dtype"]))
                  for s, g in zip(saved, opt.param_groups)]
        state_dict = convert_state_dict(state_dict, names=names, shapes=shapes, state_dtypes=dtypes)
    filled = []
    for s, g in zip(state_dict["param_groups"], opt.param_groups):
        missing = {k: g[k] for k in GROUP_DEFAULTS if k in g and k not in s}
        filled.append({**s, **missing} if missing else s)
    return {**state_dict, "param_groups": filled}


# ---------------------------------------------------------------------------------------------- fira-dist convert-state
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fira-dist convert-state",
        description="Convert a checkpoint of fira.FiraAdamW (fira 1.0.2) or galore-torch 1.0 GaLoreAdamW into "
                    "fira_dist.Fira's state format (plain tensors), so that fira_dist.Fira.load_state_dict and "
                    "torch.load(..., weights_only=True) take it and the run continues as the reference's would.",
        epilog="IN is read with torch.load(weights_only=False): the reference keeps Python projector objects in its "
               "state, which weights_only=True refuses. Unpickling can run code from the file: convert only "
               "checkpoints you trust. Needs the package that wrote IN (fira or galore-torch) installed. OUT is "
               "written to a temporary file beside it, checked with torch.load(weights_only=True), then renamed: "
               "it is never left half-written. Exit status: 0 done, 2 bad input.")
    ap.add_argument("input", metavar="IN", help="a file holding a reference optimizer state dict, or a checkpoint "
                                                "dict holding one under --key")
    ap.add_argument("output", metavar="OUT", help="the file to write (replaced if it exists)")
    ap.add_argument("--key", default="optimizer",
                    help="the key of the optimizer state dict inside a checkpoint dict (default: %(default)s); "
                         "unused when IN is the optimizer state dict itself")
    ap.add_argument("--state-dtype", choices=[d.value for d in StateDtype], default=StateDtype.FLOAT32.value,
                    help="moments and projectors in float32 (default, as fira_dist.Fira's default) or in the dtype "
                         "the reference kept them in (the gradient's)")
    ap.add_argument("--only-optimizer", action="store_true",
                    help="write the converted optimizer state dict alone, not the whole checkpoint with it replaced")
    return ap


def _is_optimizer_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping) and isinstance(
        obj.get("param_groups"), list)


def _fail(message: str) -> int:
    print(f"fira-dist convert-state: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        return _fail(f"IN={str(src)!r} is not a file")
    if not dst.parent.is_dir():
        return _fail(f"OUT={str(dst)!r}: the folder {str(dst.parent)!r} does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        return _fail(f"OUT={str(dst)!r} is IN; write to another file (IN may be the only copy of the reference state)")
    try:  # the reference's state holds Python objects: only weights_only=False reads it (see --help)
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged file, or a class whose package is not installed
        return _fail(f"cannot read IN={str(src)!r} with torch.load: {type(err).__name__}: {err}")
    if _is_optimizer_state_dict(obj):
        sd, where = obj, str(src)
    elif isinstance(obj, Mapping) and _is_optimizer_state_dict(obj.get(args.key)):
        sd, where = obj[args.key], f"{src}[{args.key!r}]"
    elif isinstance(obj, Mapping):
        return _fail(f"IN={str(src)!r} is a dict whose key --key={args.key!r} holds "
                     f"{'nothing' if args.key not in obj else _describe(obj[args.key])}, not an optimizer state dict "
                     f"('state' and 'param_groups'); its keys: {sorted(map(str, obj))[:20]}")
    else:
        return _fail(f"IN={str(src)!r} holds {_describe(obj)}; expected an optimizer state dict or a dict holding one")
    if not is_reference_state_dict(sd):
        return _fail(f"{where} is not a fira.FiraAdamW / galore-torch GaLoreAdamW state dict (no projector objects, "
                     "'scaling_grad', numeric steps or 'scale' key); a fira_dist state dict loads as it is")
    try:
        converted = convert_state_dict(sd, state_dtypes=args.state_dtype)
    except ValueError as err:
        return _fail(f"{where}: {err}")
    result = converted if sd is obj or args.only_optimizer else {**obj, args.key: converted}
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(result, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            return _fail(f"the checkpoint's other entries hold objects that torch.load(weights_only=True) refuses "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}); use --only-optimizer to write the "
                         "converted optimizer state dict alone")
        os.replace(tmp, dst)
    except OSError as err:
        return _fail(f"cannot write OUT={str(dst)!r}: {err}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    low = sum("projector" in st for st in converted["state"].values())
    steps = sorted({int(st["step"]) for st in converted["state"].values()})
    algos = sorted({g["algorithm"] for g in converted["param_groups"] if "algorithm" in g})
    span = "no steps" if not steps else f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    print(f"fira-dist convert-state: {where} -> {dst}: {low} low-rank ({', '.join(algos) or 'none'}) and "
          f"{len(converted['state']) - low} plain-Adam parameter states, {span}")
    return 0
