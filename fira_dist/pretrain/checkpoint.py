"""Atomic, rotated training checkpoints with a manifest; DCP for single/DDP/FSDP2, DeepSpeed's own format.

Layout under ``OUTPUT/checkpoints``::

    step_00000120/                 a complete checkpoint (only complete ones carry this name)
        manifest.json              written last, before the rename: see ``Manifest fields`` below
        dcp/ ...                   torch.distributed.checkpoint: {"model", "optim"} (single / ddp / fsdp2)
        deepspeed/ ...             engine.save_checkpoint(tag="deepspeed") (strategy deepspeed)
        rank_00000.pt ...          per-rank RNG states (torch, CUDA, numpy, random)
    .tmp-step_00000180/            being written (or left by a crash): never picked by --resume auto

Saving is collective: rank 0 creates the temporary folder, every rank writes its part, a barrier, rank 0
lists the files with their sizes in ``manifest.json`` and renames the folder to ``step_N`` (an atomic
rename on one filesystem), deletes the oldest complete checkpoints beyond ``keep_last`` and any leftover
temporary folders, and a last barrier. A crash at any point leaves either the previous checkpoints or the
new complete one; :func:`find_latest` accepts a folder only when its manifest says complete and every
listed file exists with the listed size. Checkpoints must be on a filesystem every rank sees (the usual
shared filesystem of a cluster).

Manifest fields: ``format``, ``complete``, ``step`` (optimizer updates done, skipped ones included),
``world_size``, ``strategy``, ``zero_stage``, ``optimizer``, ``model`` (name and LlamaConfig dict),
``reason`` (periodic | final | preempted | bad_steps), ``files`` ({relative path: bytes}), ``data`` (every
rank's data-loader ``state_dict()``), ``rng`` (the per-rank files), ``counters`` (tokens, skipped steps,
...), ``args`` (the resolved command line), ``time``.

Model and optimizer state under single / ddp / fsdp2 go through ``get_state_dict`` / ``set_state_dict``
with ``flatten_optimizer_state_dict=True`` (optimizer state keyed by parameter name, so a checkpoint can be
loaded with another world size or among these three strategies), saved with ``dcp.save``. Under DeepSpeed,
``engine.save_checkpoint`` / ``load_checkpoint`` (every rank writes its ZeRO partition). DeepSpeed loads ZeRO-1/2/3
optimizer state at the same data-parallel world size only; a Fira run's checkpoint resumes at another world size or
ZeRO stage (1-3) through a universal checkpoint written once beside it, ``step_N/deepspeed_universal/``
(``fira_dist.ds_universal``); ZeRO-0 checkpoints hold the whole state and load at any world size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fira_dist.pretrain import distributed as D

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ----------------------------------------------------------------------------------------------- discovery
def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        with open(Path(path) / MANIFEST) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def incomplete_reason(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a complete checkpoint, else why not."""
    path = Path(path)
    m = read_manifest(path)
    if m is None:
        return f"{path} has no readable {MANIFEST}"
    if not m.get("complete") or m.get("format") != FORMAT:
        return f"{path}/{MANIFEST} does not mark a complete format-{FORMAT} checkpoint"
    for rel, size in m.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{path} lacks {rel}, listed in its manifest"
        if f.stat().st_size != size:
            return f"{path}/{rel} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def list_complete(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for child in root.iterdir():
            m = _NAME.match(child.name)
            if m and child.is_dir():
                why = incomplete_reason(child)
                if why is None:
                    out.append((int(m.group(1)), child))
                else:
                    log.warning("ignoring checkpoint %s: %s", child, why)
    return sorted(out)


def find_latest(root: str | os.PathLike) -> Path | None:
    done = list_complete(root)
    return done[-1][1] if done else None


def resolve_resume(resume: str, root: str | os.PathLike) -> Path | None:
    """The checkpoint to start from: ``none`` -> None; ``auto`` -> the latest complete one under ``root`` (None
    when there is none); a PATH -> that checkpoint, or the latest complete one inside PATH. Raises
    ``ValueError`` for a PATH that holds no complete checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if (path / MANIFEST).exists():
        why = incomplete_reason(path)
        if why:
            raise ValueError(f"--resume={resume!r} is not accepted: {why}")
        return path
    for cand in (path, path / "checkpoints"):
        latest = find_latest(cand)
        if latest is not None:
            return latest
    raise ValueError(f"--resume={resume!r} is not accepted: no complete checkpoint there (expected 'auto', 'none', a "
                     f"checkpoint folder with {MANIFEST}, or a folder holding step_* checkpoints)")


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in st["python"]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------- backends
def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


@contextlib.contextmanager
def _one_process_quiet():
    """Without a process group, dcp.save / dcp.load warn "torch.distributed is ... uninitialized, assuming the
    intent is to save (load) in a single process" on every call; a one-process run means exactly that, so that
    one message is hidden (only then: with a process group it would point at a real mistake)."""
    with warnings.catch_warnings():
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield


def dcp_save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``dcp.save({"model", "optim"})`` into ``folder`` (collective; works without a process group too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_dcp_options())
    with _one_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))


def dcp_load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`dcp_save` wrote into ``model`` and ``optimizer`` (collective; resharding as needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_dcp_options())
    sd = {"model": msd, "optim": osd}
    with _one_process_quiet():
        dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_dcp_options())


DS_TAG = "deepspeed"


def deepspeed_save(folder: Path, engine: Any) -> None:
    engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)


def deepspeed_load(folder: Path, engine: Any) -> None:
    """``engine.load_checkpoint`` of ``folder/deepspeed``. A Fira run's ZeRO-1/2/3 checkpoint written at another
    data-parallel world size or ZeRO stage is resharded: rank 0 writes the universal checkpoint
    ``folder/deepspeed_universal`` once, and every rank loads its part from it (``fira_dist.ds_universal``)."""
    from fira_dist import ds_universal

    path, _ = ds_universal.load_checkpoint(engine, str(folder), tag=DS_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}/{DS_TAG}")


# ----------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Writes and finds checkpoints under ``root`` (see the module docstring). ``keep_last`` = 0 keeps all."""

    def __init__(self, root: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        self.root = Path(root)
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size

    def save(self, step: int, write_state: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
        """Collective. ``write_state(folder)`` writes the model/optimizer state (every rank calls it);
        ``manifest`` is the caller's part of the manifest (rank 0's is used). Returns the final folder."""
        t0 = time.perf_counter()
        name = step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        final = self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        D.barrier()
        write_state(tmp)
        torch.save(rng_state(), tmp / f"rank_{self.rank:05d}.pt")
        D.barrier()  # every rank's files are written
        if self.rank == 0:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            missing = [f"rank_{r:05d}.pt" for r in range(self.world_size) if f"rank_{r:05d}.pt" not in files]
            if missing:
                raise RuntimeError(f"checkpoint {tmp}: rank 0 does not see {missing}; checkpoints need a filesystem "
                                   "shared by every rank (--output-dir on shared storage)")
            full = {"format": FORMAT, **manifest, "step": step, "world_size": self.world_size,
                    "files": files, "rng": sorted(f for f in files if f.startswith("rank_")),
                    "time": time.time(), "complete": True}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(full, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # a checkpoint of an earlier run (--resume none) at the same step
                old = self.root / f"{TMP_PREFIX}old-{name}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._rotate()
            log.info("checkpoint %s written (%s, %.1f s)", final, manifest.get("reason", ""), time.perf_counter() - t0)
        D.barrier()
        return final

    def _rotate(self) -> None:
        for child in self.root.iterdir():  # leftovers of crashed saves (never the current one: it was renamed)
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
        if self.keep_last > 0:
            done = list_complete(self.root)
            for _, path in done[:-self.keep_last]:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed old checkpoint %s (--keep-last %d)", path, self.keep_last)

    def load_rank_state(self, folder: Path) -> None:
        """Restore this rank's RNG states when the checkpoint has a file for this rank."""
        f = Path(folder) / f"rank_{self.rank:05d}.pt"
        if f.exists():
            set_rng_state(torch.load(f, weights_only=True))
        else:
            log.warning("checkpoint %s has no RNG state for rank %d (saved with another world size): RNG not restored",
                        folder, self.rank)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
