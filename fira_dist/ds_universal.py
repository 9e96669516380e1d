"""Fira's DeepSpeed checkpoints at another data-parallel world size or ZeRO stage: a universal checkpoint.

DeepSpeed (0.19) loads ZeRO-1/2/3 optimizer state only at the data-parallel world size that wrote it
(``ZeRORuntimeException: ... Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is
not currently supported``). Its own way across sizes is the universal checkpoint: ``python -m
deepspeed.checkpoint.ds_to_universal`` writes every parameter's fp32 weight and elementwise Adam moments whole
(``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``), and ``"checkpoint": {"load_universal": true}`` cuts them for the new
partitions. That converter cannot read Fira's state (it fails with ``KeyError: 'exp_avg'``: Fira keeps per-matrix
projectors and low-rank moments, not flat elementwise tensors). This module follows the same convention:

``convert(load_dir, tag)`` reads every rank's files of ``<load_dir>/<tag>`` and writes ``<load_dir>/<tag>_universal``
(through a temporary folder and a rename: a folder of that name is complete):

    zero/<param name>/fp32.pt    {"param": the whole fp32 master weight, "cat_dim": 0}: DeepSpeed's universal format,
                                 assembled from the fragments ds_to_universal reads (ZeRO-1/2, BF16_Optimizer, ZeRO-3)
    zero/optimizer_state.pt      rank 0's ZeRO optimizer entry without its partitions, with Fira's param groups
    mp_rank_00_model_states.pt   the engine's counters, scheduler and client state (rank 0's, weights dropped),
    zero_pp_rank_0_mp_rank_00_model_states.pt    under both names (ZeRO-1/2 and ZeRO-3 read different ones)
    fira_state.pt                Fira's whole state by parameter name (``read_fira_state``): matrices whole
                                 (projector, exp_avg, exp_avg_sq, limiter_norm, step), Adam moments whole (flattened),
                                 the param groups, the engine step, every parameter's shape, and the size and time of
                                 each source file (a folder converted from an older save of the same tag is redone)

``load_checkpoint(engine, load_dir, tag)`` is ``engine.load_checkpoint`` for an engine running ``fira_dist.Fira``
under ZeRO-1/2/3 (``fira_dist.deepspeed`` installs it as the engine's ``load_checkpoint``): at the world size and stage
that wrote the checkpoint it is DeepSpeed's own load; otherwise rank 0 converts the checkpoint (once), DeepSpeed's
universal loader puts the fp32 master weights (and the engine's counters) into the new partitions, and every rank
keeps its part of Fira's state under the current plan (``FlatState.load_full_state``).

Command line (converts ahead, and writes ``<load_dir>/latest_universal`` as DeepSpeed's converter does):
``fira-dist reshard LOAD_DIR [--tag TAG] [--output DIR]`` (or ``python -m fira_dist.ds_universal``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

from fira_dist.config import GroupOptions
from fira_dist.layouts import plan as P
from fira_dist.layouts.flat_state import LAYOUT_VERSION, META, UNITS
from fira_dist.projector import lowrank_shape, projector_shape, side_for

log = logging.getLogger(__name__)

FIRA_STATE = "fira_state.pt"
FORMAT = "fira_dist universal checkpoint"
FORMAT_VERSION = 1
SUFFIX = "_universal"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# the parts of a ZeRO optimizer entry that hold this rank's partitions (ds_to_universal drops the first three too)
_SHARDED = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings", "optimizer_state_dict",
            "fp32_flat_groups")


# ----------------------------------------------------------------------------------------------- the source
def optim_files(folder: Path) -> dict[int, Path]:
    """Data-parallel rank -> its ZeRO optimizer-state file in a checkpoint folder (model parallel size 1 only)."""
    out: dict[int, Path] = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _OPTIM.match(f.name)
        if m is None:
            continue
        if m.group(2) != "00":
            raise ValueError(f"{f}: a checkpoint of model (tensor) parallel rank {int(m.group(2))}; fira_dist reshards "
                             "data-parallel ZeRO checkpoints only (model parallel size 1)")
        out[int(m.group(1))] = f
    return out


def _fira_entry(sd: Any, path: Path) -> dict[str, Any]:
    """Fira's ``optimizer.state_dict()`` inside one DeepSpeed ZeRO optimizer-state file (ZeRO-1/2:
    ``base_optimizer_state``, ZeRO-3: ``optimizer_state_dict``), checked to be Fira's."""
    osd = sd.get("optimizer_state_dict") if isinstance(sd, Mapping) else None
    if not isinstance(osd, Mapping):
        raise ValueError(f"{path} is not a DeepSpeed ZeRO optimizer-state file (no 'optimizer_state_dict' entry)")
    inner = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
    if not (isinstance(inner, Mapping) and "state" in inner and "param_groups" in inner):
        raise ValueError(f"{path}: its ZeRO entry holds {sorted(map(str, osd))}, no client optimizer state dict "
                         "('base_optimizer_state' or 'optimizer_state_dict' with 'state' and 'param_groups')")
    keys = sorted({k for e in inner["state"].values() for k in e})
    if any(UNITS not in e or META not in e for e in inner["state"].values()) or \
            (not inner["state"] and not all("algorithm" in g for g in inner["param_groups"])):
        raise ValueError(f"{path}: the optimizer state is not fira_dist.Fira's (its entries have keys {keys}; expected "
                         f"{UNITS!r} and {META!r}, which Fira writes under DeepSpeed ZeRO-1/2/3). A checkpoint of "
                         "another optimizer converts with DeepSpeed's own "
                         "python -m deepspeed.checkpoint.ds_to_universal")
    return inner


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _assemble_matrix(name: str, shape: tuple[int, int], o: GroupOptions, parts: dict[int, dict], W: int,
                     sliced: bool) -> dict[str, torch.Tensor]:
    """A matrix's whole state from the ranks' parts: ZeRO-1/2 (and layout version 1) keep it whole on one rank;
    ZeRO-3 (version 2) slices it over all ranks (``layouts.sliced``: right projection Q by rows chunk_range(k, W, r)
    and the moments (m, k) by owned rows; left projection P (m, k) by touched rows and the moments (k, n) by columns
    chunk_range(n, W, r)), with the step and limiter norm the same on every rank."""
    side = side_for(shape, o.proj_type.value)
    want = {"projector": projector_shape(shape, o.rank, side), "exp_avg": lowrank_shape(shape, o.rank, side)}
    want["exp_avg_sq"] = want["exp_avg"]
    if not sliced:
        if len(parts) != 1:
            raise ValueError(f"{name}: the state of this low-rank matrix is on ranks {sorted(parts)}; a ZeRO-1/2 "
                             "checkpoint keeps it whole on one rank (damaged or mixed checkpoint files?)")
        full = dict(next(iter(parts.values())))
    else:
        if sorted(parts) != list(range(W)):
            raise ValueError(f"{name}: ZeRO-3 state slices on ranks {sorted(parts)}; expected one on each rank "
                             f"0..{W - 1}")
        m, n = shape
        ranges = P.zero3_ranges(m * n, W)  # each rank's elements of the flattened matrix
        for key in ("step", "limiter_norm"):
            if any(not torch.equal(parts[r][key], parts[0][key]) for r in range(W)):
                raise ValueError(f"{name}: {key!r} differs between ranks "
                                 f"({[float(parts[r][key]) for r in range(W)]}); every rank of a ZeRO-3 checkpoint "
                                 "holds the same value")
        full = {"step": parts[0]["step"], "limiter_norm": parts[0]["limiter_norm"]}
        if side == "right":
            full["projector"] = torch.cat([parts[r]["projector"] for r in range(W)])  # Q (k, n) by row chunks
            for key in ("exp_avg", "exp_avg_sq"):
                full[key] = torch.cat([parts[r][key] for r in range(W)])  # (m, k) by owned rows
        else:
            proj = parts[0]["projector"]
            full["projector"] = torch.zeros(want["projector"], dtype=proj.dtype)  # P (m, k) from touched rows
            for r in range(W):
                t0, t1 = P.touched_rows(*ranges[r], n)
                if parts[r]["projector"].shape[0] != t1 - t0:
                    raise ValueError(f"{name}: rank {r}'s projector slice has {parts[r]['projector'].shape[0]} rows; "
                                     f"its ZeRO-3 range touches rows {t0}..{t1 - 1}")
                full["projector"][t0:t1] = parts[r]["projector"]
            for key in ("exp_avg", "exp_avg_sq"):
                full[key] = torch.cat([parts[r][key] for r in range(W)], dim=1)  # (k, n) by column chunks
    for key, shp in want.items():
        if tuple(full[key].shape) != tuple(shp):
            raise ValueError(f"{name}: {key} assembles to shape {tuple(full[key].shape)}; its param group (rank "
                             f"{o.rank}, proj_type {o.proj_type.value}) and shape {tuple(shape)} give {tuple(shp)}")
    return {k: full[k].clone() for k in ("step", "projector", "exp_avg", "exp_avg_sq", "limiter_norm")}


def _assemble_adam(name: str, numel: int, parts: dict[int, dict]) -> dict[str, torch.Tensor]:
    """Adam moments whole (flattened): each rank holds one contiguous piece, the pieces in rank order."""
    ranks = sorted(parts)
    steps = {float(parts[r]["step"]) for r in ranks}
    if len(steps) != 1:
        raise ValueError(f"{name}: the Adam pieces' step counts differ between ranks {ranks}: {sorted(steps)}")
    full = {"step": parts[ranks[0]]["step"].clone()}
    for key in ("exp_avg", "exp_avg_sq"):
        full[key] = torch.cat([parts[r][key].reshape(-1) for r in ranks])
        if full[key].numel() != numel:
            raise ValueError(f"{name}: the {key} pieces on ranks {ranks} hold {full[key].numel()} elements; the "
                             f"parameter has {numel} (a rank file from another save, or a missing piece?)")
    return full


def _fp32_weights(loaded: dict[int, Any], stage: int, param_shapes: list[dict], W: int) -> dict[str, torch.Tensor]:
    """Every parameter's whole fp32 master weight, from the fragments DeepSpeed's own universal converter
    (``ds_to_universal``) reads: ZeRO-1/2 and BF16_Optimizer: each rank's fragments (``param_slice_mappings``: start
    and numel in its fp32 partition ``single_partition_of_fp32_groups``), in rank order; ZeRO-3: each rank's
    ceil(numel / W)-element partition of every parameter, in sub-group order (``fp32_flat_groups``), in rank order,
    cut to numel. Not collective."""
    parts: dict[str, list[torch.Tensor]] = {}
    shapes = {n: tuple(int(x) for x in s) for group in param_shapes for n, s in group.items()}
    for r in range(W):
        osd = loaded[r]["optimizer_state_dict"]
        if stage == 3:
            for flat, group in zip(osd["fp32_flat_groups"], param_shapes):
                off = 0
                for name, shape in group.items():
                    numel = int(torch.Size(shape).numel())
                    pn = -(-numel // W)
                    parts.setdefault(name, []).append(flat.narrow(0, off, max(0, min(pn, numel - r * pn))))
                    off += pn
        else:
            for flat, mapping in zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]):
                for name, frag in mapping.items():
                    parts.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    out = {}
    for name, shape in shapes.items():
        whole = torch.cat(parts.get(name, [torch.empty(0)])).float()
        if whole.numel() != int(torch.Size(shape).numel()):
            raise ValueError(f"{name}: the ranks' fp32 partitions hold {whole.numel()} of its "
                             f"{int(torch.Size(shape).numel())} elements (a rank file from another save?)")
        out[name] = whole.view(shape).clone()
    return out


def read_fira_state(folder: str | os.PathLike, fp32: bool = False) -> dict[str, Any]:
    """Fira's whole state from the rank files of a DeepSpeed ZeRO-1/2/3 checkpoint folder (``<load_dir>/<tag>``).

    Returns {"format", "version", "world_size", "zero_stage", "layout_version", "engine_step", "param_groups" (without
    params), "shapes" {name: shape}, "state" {name: whole state}, "sources" {file name: [bytes, mtime_ns]}}, and with
    ``fp32`` also "fp32" {name: whole fp32 master weight} (``_fp32_weights``). Raises ValueError naming the file or
    parameter when the folder is not a complete Fira checkpoint. Not collective."""
    folder = Path(folder)
    files = optim_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no ZeRO optimizer-state files (zero_pp_rank_<r>_mp_rank_00_optim_states.pt); "
                         "expected a DeepSpeed ZeRO-1/2/3 checkpoint folder (<load_dir>/<tag>)")
    loaded = {r: torch.load(f, map_location="cpu", weights_only=False, mmap=True) for r, f in files.items()}
    entries = {r: _fira_entry(sd, files[r]) for r, sd in loaded.items()}
    metas = {(r, i): e[META] for r, ent in entries.items() for i, e in ent["state"].items()}
    stages = {int(m["zero_stage"]) for m in metas.values()} or \
        {int(loaded[min(files)]["optimizer_state_dict"].get("zero_stage", 1))}
    if len(stages) > 1:
        raise ValueError(f"{folder}: rank files of ZeRO stages {sorted(stages)} mixed")
    stage = stages.pop()
    model_states = folder / (MODEL_STATES[1] if stage == 3 else MODEL_STATES[0])
    if not model_states.is_file():
        raise ValueError(f"{folder} lacks {model_states.name}, DeepSpeed's model-states file of rank 0")
    ms = torch.load(model_states, map_location="cpu", weights_only=False, mmap=True)
    W = int(ms["dp_world_size"])
    missing, extra = [r for r in range(W) if r not in files], [r for r in files if r >= W]
    if missing or extra:
        raise ValueError(f"{folder}: the checkpoint was written by {W} data-parallel ranks ({model_states.name}: "
                         f"dp_world_size {W}), but " + (f"the optimizer-state files of ranks {missing} are missing "
                         "(zero_pp_rank_<r>_mp_rank_00_optim_states.pt): copy every rank's file" if missing else
                         f"it holds optimizer-state files of ranks {extra} as well (files of another save mixed in?)"))
    for (r, i), meta in metas.items():
        if meta.get("rank") != r or meta.get("world_size") != W or meta.get("zero_stage") != stage:
            raise ValueError(f"{files[r]}: its Fira state says rank {meta.get('rank')} of {meta.get('world_size')} "
                             f"under ZeRO-{meta.get('zero_stage')}; expected rank {r} of {W} under ZeRO-{stage} "
                             "(files of different saves mixed?)")
    versions = {m.get("layout_version", 1) for m in metas.values()}
    steps = {m["engine_step"] for m in metas.values() if "engine_step" in m}
    if len(versions) > 1 or len(steps) > 1 or any(v > LAYOUT_VERSION for v in versions):
        raise ValueError(f"{folder}: rank files disagree or are too new: layout versions {sorted(versions)}, engine "
                         f"steps {sorted(steps)} (this fira_dist reads layout versions 1..{LAYOUT_VERSION})")
    version = versions.pop() if versions else LAYOUT_VERSION
    frozen = sorted(ms.get("frozen_param_shapes") or {})
    if frozen:  # DeepSpeed's universal loader restores trainable parameters only
        raise ValueError(f"{folder}: the model has frozen parameters ({frozen[:3]}{' ...' if len(frozen) > 3 else ''}"
                         "), which a universal checkpoint does not carry; resume at the world size and stage that "
                         "wrote it")
    if ms.get("buffer_names"):
        log.warning("fira: %s: buffers %s are not in the universal checkpoint; they keep the values the model is "
                    "built with", folder, list(ms["buffer_names"])[:5])
    shapes = {n: tuple(int(x) for x in s) for group in ms["param_shapes"] for n, s in group.items()}
    groups = entries[0]["param_groups"]
    parts: dict[str, dict[int, dict]] = {}
    group_of: dict[str, int] = {}
    for r, ent in entries.items():
        index_group = {idx: g for g, grp in enumerate(ent["param_groups"]) for idx in grp["params"]}
        for i, e in ent["state"].items():
            for name, st in e[UNITS].items():
                parts.setdefault(name, {})[r] = st
                group_of[name] = index_group[i]
    state = {}
    for name, by_rank in parts.items():
        if name not in shapes:
            raise ValueError(f"{folder}: Fira state for {name!r}, which the checkpoint's model ({model_states.name} "
                             "param_shapes) does not have")
        o = GroupOptions.from_group(groups[group_of[name]], where=f"{folder} param group {group_of[name]}")
        if "projector" in next(iter(by_rank.values())):
            state[name] = _assemble_matrix(name, shapes[name], o, by_rank, W, stage == 3 and version >= 2)
        else:
            state[name] = _assemble_adam(name, int(torch.Size(shapes[name]).numel()), by_rank)
    out = {"format": FORMAT, "version": FORMAT_VERSION, "world_size": W, "zero_stage": stage,
           "layout_version": version, "engine_step": steps.pop() if steps else 0,
           "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
           "shapes": shapes, "state": state,
           "sources": {f.name: _file_stamp(f) for f in [*files.values(), model_states]}}
    if fp32:
        out["fp32"] = _fp32_weights(loaded, stage, ms["param_shapes"], W)
    return out


# ----------------------------------------------------------------------------------------------- conversion
def universal_dir(load_dir: str | os.PathLike, tag: str) -> Path:
    """Where ``convert`` writes the universal checkpoint of ``<load_dir>/<tag>`` (DeepSpeed's naming)."""
    return Path(load_dir) / f"{tag}{SUFFIX}"


def is_current(universal: Path, source: Path) -> bool:
    """Whether ``universal`` is a complete conversion of the checkpoint files now in ``source``."""
    if not (universal / FIRA_STATE).is_file():
        return False
    try:
        saved = torch.load(universal / FIRA_STATE, map_location="cpu", weights_only=True, mmap=True)["sources"]
    except Exception:  # noqa: BLE001  (an unreadable file: convert again)
        return False
    return all((source / n).is_file() and _file_stamp(source / n) == list(s) for n, s in saved.items())


def convert(load_dir: str | os.PathLike, tag: str, output: str | os.PathLike | None = None) -> Path:
    """Write the universal checkpoint of ``<load_dir>/<tag>`` (module docstring) to ``output`` (default
    ``<load_dir>/<tag>_universal``) and return its path. Reads every rank's files on this process (the fp32 master
    weights and Fira's state of the whole model are held in CPU memory, as DeepSpeed's zero_to_fp32 does). Writes
    into a temporary folder beside ``output`` and renames it: ``output`` is complete or absent. Not collective."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    source = Path(load_dir) / tag
    out = Path(output) if output is not None else universal_dir(load_dir, tag)
    fira = read_fira_state(source, fp32=True)
    fp32 = fira.pop("fp32")
    files = optim_files(source)
    head = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    optim = {k: v for k, v in head["optimizer_state_dict"].items() if k not in _SHARDED}
    optim["param_groups"] = fira["param_groups"]
    optim.setdefault("ds_version", head.get("ds_version"))
    model = torch.load(source / (MODEL_STATES[1] if fira["zero_stage"] == 3 else MODEL_STATES[0]), map_location="cpu",
                       weights_only=False, mmap=True)
    model["module"] = {}  # the universal loader reads the weights from zero/; the engine's counters stay
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name in fira["shapes"]:
            (tmp / "zero" / name).mkdir(parents=True)
            torch.save({PARAM: fp32[name], CAT_DIM: 0}, tmp / "zero" / name / "fp32.pt")
        torch.save(optim, tmp / "zero" / "optimizer_state.pt")
        for fname in MODEL_STATES:
            torch.save(model, tmp / fname)
        torch.save(fira, tmp / FIRA_STATE)  # last: its presence marks a complete folder
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fira: converted %s (%d ranks, ZeRO-%d) to the universal checkpoint %s (%d parameters)", source,
             fira["world_size"], fira["zero_stage"], out, len(fira["shapes"]))
    return out


# ----------------------------------------------------------------------------------------------- loading
def describe(folder: Path) -> dict[str, Any] | None:
    """What wrote a checkpoint folder, read cheaply (rank 0's optimizer entry, memory-mapped): {"kind": "universal"}
    for a converted folder, {"kind": "zero", "world_size", "zero_stage"} for a Fira ZeRO-1/2/3 checkpoint, None for
    anything else (ZeRO-0, another optimizer, no such folder: DeepSpeed's own load decides)."""
    if (folder / FIRA_STATE).is_file():
        return {"kind": "universal"}
    files = optim_files(folder)
    if not files:
        return None
    sd = torch.load(files[min(files)], map_location="cpu", weights_only=False, mmap=True)
    try:
        inner = _fira_entry(sd, files[min(files)])
    except ValueError:
        return None
    metas = [e[META] for e in inner["state"].values()]
    if not metas:  # saved before Fira's first step: nothing of Fira's to move
        return {"kind": "zero", "world_size": len(files),
                "zero_stage": int(sd["optimizer_state_dict"].get("zero_stage", 1))}
    return {"kind": "zero", "world_size": int(metas[0]["world_size"]), "zero_stage": int(metas[0]["zero_stage"])}


def _zero0_optimizer_state(folder: Path) -> bool:
    """Whether ``folder`` is a ZeRO-0 checkpoint with optimizer state (in rank 0's model-states file, no ZeRO files)."""
    path = folder / MODEL_STATES[0]
    if optim_files(folder) or not path.is_file():
        return False
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("optimizer") is not None


def _collective_convert(source: Path, load_dir: Path, tag: str) -> Path:
    """Rank 0 converts (unless a current conversion is there), every rank learns the outcome: the path, or rank 0's
    error, raised on every rank (no rank is left waiting in a collective)."""
    import torch.distributed as dist

    out = universal_dir(load_dir, tag)
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            if is_current(out, source):
                log.info("fira: using the universal checkpoint %s converted earlier", out)
            else:
                convert(load_dir, tag)
            verdict[0] = ("ok", str(out))
        except Exception as err:  # noqa: BLE001  (sent to every rank, raised there)
            verdict[0] = ("error", f"{type(err).__name__}: {err}")
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    kind, text = verdict[0]
    if kind == "error":
        raise ValueError(f"fira: converting {source} to a universal checkpoint failed on rank 0: {text}")
    return Path(text)


@contextlib.contextmanager
def _universal_mode(engine: Any):
    """DeepSpeed's ``checkpoint.load_universal`` switched on for one load (the ds_config's value afterwards)."""
    before = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = before


def _restore_engine(engine: Any, client: dict[str, Any], load_lr_scheduler_states: bool) -> dict[str, Any]:
    """What DeepSpeed's _load_checkpoint restores besides the module and the optimizer (see load_checkpoint)."""
    if load_lr_scheduler_states and engine.lr_scheduler is not None and client.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(client["lr_scheduler"])
    engine.global_steps = client["global_steps"]
    engine.global_samples = client.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = client["skipped_steps"]
    engine.loaded_checkpoint_mp_world_size = client["mp_world_size"]
    engine.loaded_checkpoint_dp_world_size = client["dp_world_size"]
    if engine.training_dataloader is not None and engine.curriculum_learning_enabled() and "data_sampler" in client:
        engine.training_dataloader.data_sampler.load_state_dict(client["data_sampler"])
    if engine.random_ltd_enabled() and engine.random_ltd_scheduler is not None and "random_ltd" in client:
        engine.random_ltd_scheduler.load_state_dict(client["random_ltd"])
    done = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps", "dp_world_size", "mp_world_size",
            "data_sampler", "random_ltd", "optimizer")
    return {k: v for k, v in client.items() if k not in done}


def _restore_groups(opt: Any, saved: list[dict[str, Any]], where: str) -> None:
    """The saved param groups' values win (as in torch's load_state_dict); the keys that place Fira's state (rank,
    proj_type) must agree, and were checked by FlatState.check_full_state."""
    from fira_dist.optimizer import CLOCK_KEY

    if len(saved) != len(opt.param_groups):
        raise ValueError(f"fira: {where} has {len(saved)} param groups, this optimizer {len(opt.param_groups)}")
    for g, s in zip(opt.param_groups, saved):
        g.update({k: v for k, v in s.items() if k not in ("params", "param_names")})
    clocks = [int(g[CLOCK_KEY]) for g in opt.param_groups if CLOCK_KEY in g]
    opt.global_step = max([opt.layout.engine_step, *clocks])
    opt.layout.engine_step = opt.global_step
    if opt.momentum_reset.enabled:
        for g in opt.param_groups:
            g[CLOCK_KEY] = opt.global_step


def load_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: str | None = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, custom_load_fn: Any = None, *, reshard: bool | None = None):
    """``engine.load_checkpoint`` (same arguments and return value) that also loads a ZeRO-1/2/3 checkpoint of a Fira
    run at another data-parallel world size or ZeRO stage. Collective: call it on every rank.

    ``reshard``: None (default) reshards when the checkpoint's world size or stage differs from the engine's, or when
    the ds_config sets ``checkpoint.load_universal`` or ``<load_dir>/<tag>`` is a converted folder; True always (also
    at the same size: the result is bitwise what DeepSpeed's own load gives); False never. Resharding: rank 0 writes
    ``<load_dir>/<tag>_universal`` once (``convert``), DeepSpeed's universal loader fills this rank's fp32 master
    partitions and the 16-bit weights from it, the engine's counters and scheduler come from its model-states file,
    and Fira keeps this rank's part of every matrix and Adam piece (``FlatState.load_full_state``; no collective).
    Other loads (ZeRO-0, weights only, optimizers other than Fira) are DeepSpeed's own."""
    import torch.distributed as dist

    original = getattr(engine, "_fira_original_load_checkpoint", None) or engine.load_checkpoint
    call = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                custom_load_fn=custom_load_fn)
    opt = getattr(engine, "basic_optimizer", None)
    layout = getattr(opt, "layout", None)
    universal_cfg = bool(engine._config.load_universal_checkpoint)
    mode = getattr(layout, "mode", None)
    if mode is None or not load_optimizer_states or load_module_only or reshard is False:
        return original(load_dir, tag, **call)
    if tag is None:  # as DeepSpeed: the tag named in 'latest' ('latest_universal' with load_universal)
        latest = Path(load_dir) / ("latest_universal" if universal_cfg else "latest")
        if not latest.is_file():
            return original(load_dir, tag, **call)  # DeepSpeed's own answer (a warning and (None, None), or an error)
        tag = latest.read_text().strip()
    folder = Path(load_dir) / str(tag)
    src = describe(folder)
    W, stage = layout.comm.world_size, layout.stage
    if src is None and mode == "partitioned" and _zero0_optimizer_state(folder):
        raise ValueError(f"fira: {folder} is a ZeRO-0 checkpoint (the optimizer state is in {MODEL_STATES[0]}); this "
                         f"run is ZeRO-{stage}: Fira's state does not carry over between ZeRO-0 and ZeRO-1/2/3. Resume "
                         "under ZeRO-0 (at any world size), or load the weights only "
                         "(engine.load_checkpoint(..., load_optimizer_states=False))")
    if src is not None and mode == "replicated":
        raise ValueError(f"fira: {folder} holds Fira state of ZeRO-1/2/3 partitions; this run is ZeRO-0: Fira's state "
                         "does not carry over between ZeRO-1/2/3 and ZeRO-0. Resume under ZeRO stage 1-3 (at any world "
                         "size), or load the weights only (engine.load_checkpoint(..., load_optimizer_states=False))")
    if src is None or mode == "replicated":
        return original(load_dir, tag, **call)  # not a Fira ZeRO checkpoint, or ZeRO-0: DeepSpeed's own load
    if reshard is None:
        reshard = universal_cfg or src["kind"] == "universal" or (src["world_size"], src["zero_stage"]) != (W, stage)
    if not reshard:
        return original(load_dir, tag, **call)
    uni = folder if src["kind"] == "universal" else _collective_convert(folder, Path(load_dir), str(tag))
    full = torch.load(uni / FIRA_STATE, map_location="cpu", weights_only=True, mmap=True)
    if full.get("format") != FORMAT or full.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"fira: {uni / FIRA_STATE} is format {full.get('format')!r} version {full.get('version')}; "
                         f"this fira_dist reads {FORMAT!r} versions up to {FORMAT_VERSION}")
    layout.check_full_state(full, str(uni))
    if dist.get_rank() == 0:
        log.info("fira: checkpoint %s was written by %d rank(s) under ZeRO-%d; this run has %d under ZeRO-%d: "
                 "resharded through the universal checkpoint %s", folder, full["world_size"], full["zero_stage"], W,
                 stage, uni)
    # load_module_only=True: the universal loader reads the weights from zero/ and skips the module state dict; with
    # load_optimizer_states=False DeepSpeed would first rebuild the weights from the ZeRO-3 files of <load_dir>/latest
    # (deepspeed.runtime.engine _load_checkpoint), and with True its ZeRO-3 loader wants elementwise Adam files.
    # The engine's counters and scheduler then come from the returned client state (_restore_engine).
    with _universal_mode(engine):
        path, client = original(str(uni.parent), uni.name, load_module_strict=load_module_strict,
                                load_optimizer_states=True, load_lr_scheduler_states=False, load_module_only=True,
                                custom_load_fn=custom_load_fn)
    if path is None:
        raise RuntimeError(f"fira: DeepSpeed could not load the universal checkpoint {uni}")
    client = _restore_engine(engine, client, load_lr_scheduler_states)
    layout.load_full_state(full)
    _restore_groups(opt, full["param_groups"], str(uni / FIRA_STATE))
    return path, client


def install(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` this module's ``load_checkpoint`` (idempotent; fira_dist.deepspeed.attach)."""
    if getattr(engine, "_fira_original_load_checkpoint", None) is not None:
        return
    engine._fira_original_load_checkpoint = engine.load_checkpoint

    def load(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=True,
             load_module_only=False, custom_load_fn=None):
        return load_checkpoint(engine, load_dir, tag, load_module_strict, load_optimizer_states,
                               load_lr_scheduler_states, load_module_only, custom_load_fn)

    load.__doc__ = load_checkpoint.__doc__
    engine.load_checkpoint = load


# ----------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fira-dist reshard", description=(
        "Convert a DeepSpeed ZeRO-1/2/3 checkpoint of a fira_dist.Fira run into a universal checkpoint "
        "(<LOAD_DIR>/<TAG>_universal) that loads at any data-parallel world size and ZeRO stage. Loading converts "
        "by itself when the world size or stage changed; this command does it ahead, on one process."))
    ap.add_argument("load_dir", help="the folder given to engine.save_checkpoint (holds <TAG>/ and 'latest')")
    ap.add_argument("--tag", help="the checkpoint's tag (default: the one named in LOAD_DIR/latest)")
    ap.add_argument("--output", help="where to write (default LOAD_DIR/<TAG>_universal; then LOAD_DIR/latest_universal "
                                     "names it, as DeepSpeed's ds_to_universal does)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_dir = Path(args.load_dir)
    tag = args.tag
    if tag is None:
        if not (load_dir / "latest").is_file():
            print(f"error: LOAD_DIR={str(load_dir)!r} has no 'latest' file; give --tag", file=sys.stderr)
            return 2
        tag = (load_dir / "latest").read_text().strip()
    try:
        out = convert(load_dir, tag, args.output)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output is None or Path(args.output).parent.resolve() == load_dir.resolve():
        tmp = load_dir / f".latest_universal.{uuid.uuid4().hex[:8]}"
        tmp.write_text(out.name)
        os.replace(tmp, load_dir / "latest_universal")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
