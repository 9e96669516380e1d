"""State of the DeepSpeed layout (``flat_partition.FlatPartition``): where it lives, checkpoints, older layouts.

Partitioned (ZeRO-1/2/3): ``opt.state[flat] = {"fira_units": {param name: state}, "fira_layout": meta}``.
- ZeRO-1/2: a matrix's whole state (step, projector, exp_avg, exp_avg_sq, limiter_norm) on the rank that updates
  it (the one whose partition holds it, or a straddler's largest holder); a non-matrix parameter's Adam state for
  the piece each rank holds.
- ZeRO-3: every rank holds, for every matrix, its slice of the state (``layouts.sliced``: Q's rows or P's
  touched rows; the moments by owned rows or by columns), a replicated limiter norm and step.
- meta: {"world_size", "rank", "zero_stage", "layout_version", "engine_step"}. DeepSpeed saves each rank's
  ``optimizer.state_dict()`` in its own ``zero_pp_rank_*`` file, so a checkpoint carries it as is and a resumed
  run continues exactly.

Layout versions: 1 = fira_dist 0.1.0 (every matrix's whole state on a greedy-LPT owner, under every stage),
2 = this module. A version-1 checkpoint loads at the same world size and stage: at the first step each matrix's
state is sent from the rank that holds it to where version 2 keeps it (one broadcast per matrix, counted on
``checkpoint_comm``). At another world size or stage (DeepSpeed refuses to load the files as they are),
``fira_dist.ds_universal`` assembles every matrix's and Adam parameter's whole state from all rank files, and
``load_full_state`` keeps this rank's part under the current plan (the slicing ``_part_of`` shares with version 1).

Replicated (ZeRO-0): ``opt.state[param]`` as the single-process layout, on the owner only; ``state_dict()``
gathers every rank's part (a collective: DeepSpeed calls it on every rank) because DeepSpeed writes ZeRO-0
optimizer state from rank 0 alone, and after ``load_state_dict`` each rank drops what it does not own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fira_dist.config import GroupOptions
from fira_dist.layouts.single import SingleProcess
from fira_dist.projector import lowrank_shape, projector_shape

UNITS = "fira_units"
META = "fira_layout"
LAYOUT_VERSION = 2
LOW_RANK_KEYS = ("projector", "exp_avg", "exp_avg_sq", "limiter_norm", "step")


class FlatState:
    """Mixin of FlatPartition: state entries, checks after loading, measurements. Needs opt, comm, checkpoint_comm,
    stage, mode, buckets, units, engine_step, _round, _checked, _just_loaded."""

    # ------------------------------------------------------------------ entries
    def _bucket_state(self, b: Any) -> dict[str, dict[str, Any]]:
        st = self.opt.state[b.flat]
        if UNITS not in st:
            st[UNITS] = {}
            st[META] = self._meta()
        return st[UNITS]

    def _meta(self) -> dict[str, Any]:
        return {"world_size": self.comm.world_size, "rank": self.comm.rank, "zero_stage": self.stage,
                "layout_version": LAYOUT_VERSION}

    def _unit_shapes(self, u: Any, o: GroupOptions, numel: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the state this rank keeps for a unit (a matrix it updates or slices, or an Adam piece)."""
        if not u.low_rank:
            return {"exp_avg": (numel,), "exp_avg_sq": (numel,)}
        if u.mat is not None:  # ZeRO-3: this rank's slice
            local = u.mat.local_shapes()
            return {"projector": local["projector"], "exp_avg": local["exp_avg"], "exp_avg_sq": local["exp_avg"]}
        lr = lowrank_shape(u.shape, o.rank, u.side)
        return {"projector": projector_shape(u.shape, o.rank, u.side), "exp_avg": lr, "exp_avg_sq": lr}

    def _unit_state(self, states: dict, u: Any, o: GroupOptions, dev: torch.device, numel: int) -> dict[str, Any]:
        st = states.get(u.name)
        if st is None:
            dt = self.opt.state_dtype(o, torch.float32)
            st = {"step": torch.tensor(0.0)}
            for key, shape in self._unit_shapes(u, o, numel).items():
                st[key] = torch.zeros(shape, dtype=dt, device=dev)
            if u.low_rank:
                st["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=dev)
            states[u.name] = st
        return st

    def _holds_state(self, u: Any) -> bool:
        """Whether this rank keeps state for unit u (ZeRO-1/2 matrices: their owner; ZeRO-3 matrices: every rank;
        Adam pieces: their holders)."""
        if not u.low_rank:
            return u.piece_of(self.comm.rank) is not None
        return u.mat is not None or u.owner == self.comm.rank

    def expected_state_shapes(self) -> dict[torch.Tensor, dict[str, tuple[int, ...]]]:
        if self.mode == "replicated":
            return SingleProcess(self.opt).expected_state_shapes()
        return {}  # partitioned: nested per-unit state, checked at the first step after loading (_check_loaded)

    # ------------------------------------------------------------------ loading
    def after_load_state_dict(self) -> None:
        """Called by Fira.load_state_dict: loaded state is checked (and, replicated, pruned) at the next step."""
        self._just_loaded = True
        self._checked.clear()

    def _check_loaded(self, b: Any, o: GroupOptions) -> None:
        """Once per bucket: state that came from a checkpoint must fit this layout; version 1 is converted."""
        if id(b.flat) in self._checked:
            return
        self._checked.add(id(b.flat))
        st = self.opt.state.get(b.flat)
        if not st:
            return
        extra = set(st) - {UNITS, META}
        if extra or UNITS not in st:
            raise ValueError(f"fira: optimizer state of ZeRO flat partition {b.index} has keys {sorted(st)}; expected "
                             f"{UNITS!r} and {META!r} (a checkpoint of another optimizer?)")
        meta = dict(st.get(META, {}))
        saved_step = meta.pop("engine_step", None)
        version = meta.pop("layout_version", 1)
        want = self._meta()
        want.pop("layout_version")
        if meta != want:
            raise ValueError(
                f"fira: the checkpoint's optimizer state was written by fira_dist layout version {version} with "
                f"{meta}; this run is {want}. Loaded as it is, Fira state fits the same data-parallel world size and "
                "ZeRO stage only; at another one load it with fira_dist.ds_universal.load_checkpoint(engine, dir, tag) "
                "(what engine.load_checkpoint does for an engine built by fira_dist.deepspeed), which reshards it")
        if saved_step is not None and not self._round:
            self.engine_step = int(saved_step)  # resume the engine-step count with the state
        if version == 1:
            self._import_v1(b, o, st[UNITS])
        elif version != LAYOUT_VERSION:
            raise ValueError(f"fira: the checkpoint's optimizer state has layout version {version}; this fira_dist "
                             f"reads versions 1 and {LAYOUT_VERSION} (a newer fira_dist wrote it: upgrade)")
        st[META] = {**self._meta(), **({"engine_step": saved_step} if saved_step is not None else {})}
        self._check_shapes(b, o, st[UNITS])

    def _check_shapes(self, b: Any, o: GroupOptions, units: dict[str, Any]) -> None:
        me = self.comm.rank
        want = {}
        for u in b.units:
            if self._holds_state(u):
                pc = u.piece_of(me)
                want[u.name] = self._unit_shapes(u, o, pc.length if pc is not None else 0)
        for name, ust in units.items():
            if name not in want:
                raise ValueError(f"fira: the checkpoint holds optimizer state for {name} on rank {me}, which this run "
                                 "does not assign to it (different model, rank or param groups?)")
            for key, shape in want[name].items():
                if key in ust and tuple(ust[key].shape) != tuple(shape):
                    raise ValueError(f"fira: optimizer state {key!r} of {name} has shape {tuple(ust[key].shape)}, "
                                     f"expected {tuple(shape)} (different rank, proj_type or model?)")
            for key, val in list(ust.items()):
                if isinstance(val, torch.Tensor) and key != "step" and val.device != b.flat.device:
                    ust[key] = val.to(b.flat.device)

    def _import_v1(self, b: Any, o: GroupOptions, units: dict[str, Any]) -> None:
        """Version 1 kept each matrix's whole state on one rank (greedy LPT). Collective: who holds what is
        all-gathered (names only), then each matrix's state is broadcast by its holder and every rank keeps what
        version 2 gives it (ZeRO-1/2: the owner the whole state; ZeRO-3: its slice)."""
        mats = [u for u in b.units if u.low_rank]
        held = sorted(u.name for u in mats if u.name in units)
        everyone: list[Any] = [None] * self.comm.world_size
        if self.comm.world_size > 1:
            dist.all_gather_object(everyone, held, group=self.comm.group)
        else:
            everyone = [held]
        source = {name: q for q, names in enumerate(everyone) for name in names}
        dev = b.flat.device
        for u in mats:
            old = units.pop(u.name, None)
            q = source.get(u.name)
            if q is None:
                continue  # never stepped before the checkpoint: fresh state
            shapes = self._whole_shapes(u, o)
            sizes = [int(torch.Size(shapes[k]).numel()) for k in LOW_RANK_KEYS]
            buf = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
            if q == self.comm.rank:
                buf.copy_(torch.cat([old[k].detach().float().reshape(-1).to(dev) for k in LOW_RANK_KEYS]))
            self.checkpoint_comm.broadcast(buf, q)
            full, off = {}, 0
            for k, size in zip(LOW_RANK_KEYS, sizes):
                full[k] = buf[off:off + size].view(shapes[k])
                off += size
            if self._holds_state(u):
                units[u.name] = self._part_of(u, o, full, dev)

    def _whole_shapes(self, u: Any, o: GroupOptions) -> dict[str, tuple[int, ...]]:
        """Shapes of a low-rank matrix's whole state (what one process holds)."""
        lr = lowrank_shape(u.shape, o.rank, u.side)
        return {"projector": projector_shape(u.shape, o.rank, u.side), "exp_avg": lr, "exp_avg_sq": lr,
                "limiter_norm": (), "step": ()}

    def _part_of(self, u: Any, o: GroupOptions, full: dict[str, torch.Tensor], dev: torch.device) -> dict[str, Any]:
        """This rank's part of unit u's whole state (new tensors on ``dev``; moments and projector in the state dtype):
        a ZeRO-1/2 matrix's owner the whole state, a ZeRO-3 matrix's holder its slice (``layouts.sliced``: Q's row
        chunk or P's touched rows, the moments by owned rows or by columns), an Adam piece's holder its range of the
        flattened moments. Not collective."""
        from fira_dist.layouts.sliced import projector_piece

        dt = self.opt.state_dtype(o, torch.float32)
        new: dict[str, Any] = {"step": full["step"].detach().cpu().float().clone()}
        if not u.low_rank:
            pc = u.piece_of(self.comm.rank)
            for k in ("exp_avg", "exp_avg_sq"):
                new[k] = full[k].reshape(-1)[pc.start:pc.start + pc.length].to(dev, dt).clone()
            return new
        new["limiter_norm"] = full["limiter_norm"].to(dev, torch.float32).clone()
        if u.mat is None:
            new.update({k: full[k].to(dev, dt).clone() for k in ("projector", "exp_avg", "exp_avg_sq")})
            return new
        m = u.mat  # ZeRO-3: this rank's slice
        new["projector"] = projector_piece(m, full["projector"], self.comm.rank).to(dev, dt).clone()
        for k in ("exp_avg", "exp_avg_sq"):
            part = full[k][m.own[0]:m.own[1]] if m.side == "right" else full[k][:, m.cols[0]:m.cols[1]]
            new[k] = part.to(dev, dt).clone()
        return new

    # ------------------------------------------------------------------ whole state (fira_dist.ds_universal)
    def check_full_state(self, full: Any, where: str) -> None:
        """Refuse, before anything is loaded, a whole Fira state (``ds_universal.read_fira_state``) that does not fit
        this run: other parameter names or shapes (another model, other trainable parameters), another number of
        param groups, another ``rank`` or ``proj_type`` in a group, a parameter low-rank here and plain Adam there."""
        if self.mode != "partitioned":
            raise ValueError(f"fira: {where} holds Fira state for ZeRO-1/2/3 partitions; this run is ZeRO-0 "
                             "(replicated), which loads ZeRO-0 checkpoints at any world size; use a ZeRO stage 1-3")
        units = {u.name: u for b in self.buckets.values() for u in b.units}
        saved = {n: tuple(s) for n, s in full["shapes"].items()}
        missing, extra = sorted(set(units) - set(saved)), sorted(set(saved) - set(units))
        other = sorted(n for n in set(units) & set(saved) if units[n].shape != saved[n])
        if missing or extra or other:
            shown = "; ".join(x for x in (
                f"this model's {missing[:3]} are not in it" if missing else "",
                f"it has {extra[:3]}, which this model lacks" if extra else "",
                "shapes differ: " + ", ".join(f"{n} {saved[n]} there, {units[n].shape} here" for n in other[:3])
                if other else "") if x)
            raise ValueError(f"fira: {where} was written for another model (or other trainable parameters): {shown}")
        groups = full["param_groups"]
        if len(groups) != len(self.opt.param_groups):
            raise ValueError(f"fira: {where} has {len(groups)} param groups, this optimizer "
                             f"{len(self.opt.param_groups)} (other target_modules, or a 'rank': null block?)")
        for i, (s, g) in enumerate(zip(groups, self.opt.param_groups)):
            for key in ("rank", "proj_type"):
                if s.get(key) != g.get(key):
                    raise ValueError(f"fira: {where} param group {i} has {key}={s.get(key)!r}, this run "
                                     f"{g.get(key)!r}: Fira's projectors and moments do not carry over to another rank "
                                     "or projection side; "
                                     f"use {key}={s.get(key)!r}, or load the weights only "
                                     "(engine.load_checkpoint(..., load_optimizer_states=False))")
        for name, st in full["state"].items():
            if units[name].low_rank != ("projector" in st):
                kind = ("a low-rank matrix here, plain Adam there" if units[name].low_rank else
                        "plain Adam here, a low-rank matrix there")
                raise ValueError(f"fira: {where}: {name} is {kind} (other target_modules?)")

    def load_full_state(self, full: Any) -> None:
        """Keep this rank's part of a whole Fira state (``ds_universal.read_fira_state``, checked by
        ``check_full_state``) under the current plan, whatever world size and ZeRO stage wrote it, and resume its
        engine-step count. Replaces the state of every flat partition. Not collective: each rank reads what it keeps."""
        step = int(full["engine_step"])
        for b in self.buckets.values():
            units: dict[str, Any] = {}
            o = None
            for u in b.units:
                o = self.opt.group_options(u.group)
                st = full["state"].get(u.name)
                if st is not None and self._holds_state(u):  # never stepped before the save: fresh state
                    units[u.name] = self._part_of(u, o, st, b.flat.device)
            self.opt.state[b.flat] = {UNITS: units, META: {**self._meta(), "engine_step": step}}
            if o is not None:
                self._check_shapes(b, o, units)
            self._checked.add(id(b.flat))
        self.engine_step = step

    # ------------------------------------------------------------------ ZeRO-0 checkpoints
    def _gather_state_dict(self, opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """state_dict() post-hook (replicated): every rank's owned state in one dict. A collective."""
        if self.mode != "replicated" or self.comm.world_size == 1 or not dist.is_initialized():
            return state_dict
        parts: list[Any] = [None] * self.comm.world_size
        local = {k: {kk: (vv.cpu() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()}
                 for k, v in state_dict["state"].items()}
        dist.all_gather_object(parts, local, group=self.comm.group)
        merged: dict[Any, Any] = {}
        for part in parts:
            merged.update(part)
        state_dict["state"] = dict(sorted(merged.items()))
        return state_dict

    # ------------------------------------------------------------------ measurements
    def state_bytes(self) -> int:
        """Bytes of Fira state tensors held by this rank (all buckets / parameters)."""
        def size(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, dict):
                return sum(size(v) for v in x.values())
            return 0
        return sum(size(v) for v in self.opt.state.values())

    def unit_state_bytes(self) -> dict[str, int]:
        """Per parameter name: bytes of the state this rank holds for it."""
        out: dict[str, int] = {}
        for key, v in self.opt.state.items():
            if self.mode == "partitioned":
                for name, ust in v.get(UNITS, {}).items():
                    out[name] = out.get(name, 0) + sum(t.numel() * t.element_size() for t in ust.values()
                                                       if isinstance(t, torch.Tensor))
            else:
                u = self.units.get(id(key))
                if u is not None:
                    out[u.name] = sum(t.numel() * t.element_size() for t in v.values() if isinstance(t, torch.Tensor))
        return out

    def projectors(self) -> dict[str, torch.Tensor]:
        """Per matrix this rank keeps a projector (or, ZeRO-3, a projector slice) of: a copy, on CPU."""
        out = {}
        for key, v in self.opt.state.items():
            if self.mode == "partitioned":
                for name, ust in v.get(UNITS, {}).items():
                    if "projector" in ust:
                        out[name] = ust["projector"].detach().cpu().clone()
            elif "projector" in v and id(key) in self.units:
                out[self.units[id(key)].name] = v["projector"].detach().cpu().clone()
        return out
