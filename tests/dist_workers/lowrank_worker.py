"""Worker for tests/test_lowrank.py: every job of a list in ONE torchrun launch (one process group).

    torchrun --nproc-per-node W tests/dist_workers/lowrank_worker.py --jobs jobs.json --out OUTDIR

Jobs (tests/lowrank_common.py): strategy "fsdp2" (fully_shard on each decoder layer and the root), "ddp", or
"deepspeed" (ZeRO "stage"); method "lowrank" (factorized model, plain Adam with momentum resets, refactorized at
each reset) or "fira" (Fira's low-rank groups with momentum resets). "save_at": k writes a checkpoint after step k
(DCP for fsdp2/ddp, DeepSpeed's otherwise) and keeps training; "resume": k builds a fresh model and optimizer, loads
it and trains [k, steps). Rank 0 writes OUTDIR/<name>.pt: losses, full parameters, the optimizer's clock, and
every rank's state keys and step counters after the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowrank_common import build_model, build_optimizer, ds_job_config, full_params, train  # noqa: E402


def state_summary(opt) -> dict:
    """Per state entry (a parameter, or a ZeRO flat partition's units): the sorted keys and the step counters."""
    def walk(d, prefix=""):
        keys, steps = [], []
        for k, v in sorted(d.items()):
            if isinstance(v, dict):
                kk, ss = walk(v, f"{prefix}{k}.")
                keys += kk
                steps += ss
            else:
                keys.append(prefix + k)
                if k == "step" and isinstance(v, torch.Tensor) and v.numel() == 1:
                    steps.append(float(v))
        return keys, steps

    keys, steps = [], []
    for st in opt.state.values():
        k, s = walk(st)
        keys.append(k)
        steps += s
    return {"keys": keys, "steps": sorted(set(steps))}


def build(j: dict, world: int):
    """(model, forward module, optimizer, engine or None)."""
    model = build_model(j)
    if j["strategy"] == "deepspeed":
        import fira_dist.deepspeed as fds

        engine, _, _, _ = fds.initialize(model=model, config=ds_job_config(j, world))
        return engine.module, engine, engine.basic_optimizer, engine
    fwd = model
    if j["strategy"] == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        fwd = torch.nn.parallel.DistributedDataParallel(model)
    return model, fwd, build_optimizer(model, j, "auto"), None


def run_job(j: dict, out: Path) -> None:
    from fira_dist.pretrain import checkpoint as C

    rank, world = dist.get_rank(), dist.get_world_size()
    model, fwd, opt, engine = build(j, world)
    start = 0
    ckpt = Path(j["ckpt"]) if "ckpt" in j else None
    if j.get("resume"):
        start = j["resume"]
        if engine is not None:
            C.deepspeed_load(ckpt, engine)
        else:
            C.dcp_load(ckpt / "dcp", model, opt)

    def on_step(done: int) -> None:
        if j.get("save_at") == done:
            if engine is not None:
                C.deepspeed_save(ckpt, engine)
            else:
                C.dcp_save(ckpt / "dcp", model, opt)

    losses = train(j, model, fwd, opt, rank=rank, world=world, engine=engine, start=start, on_step=on_step)
    params = full_params(model, engine, j.get("stage"))
    fira = engine.basic_optimizer if engine is not None else opt
    summaries = [None] * world
    dist.all_gather_object(summaries, state_summary(fira))
    if rank == 0:
        torch.save({"losses": losses, "params": params, "global_step": fira.global_step, "ranks": summaries,
                    "layout": type(fira.layout).__name__}, out / f"{j['name']}.pt")
    dist.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    jobs = json.loads(Path(args.jobs).read_text())
    if any(j["strategy"] == "deepspeed" for j in jobs):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for j in jobs:
        t0 = time.perf_counter()
        run_job(j, out)
        if dist.get_rank() == 0:
            print(f"job {j['name']}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    from fira_dist.pretrain.distributed import destroy, exit_without_finalization

    code = main()
    destroy()
    exit_without_finalization(code)
