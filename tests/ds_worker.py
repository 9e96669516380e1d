"""DeepSpeed worker for tests/test_deepspeed.py: runs a list of training jobs in ONE process group.

    <launcher> tests/ds_worker.py --jobs jobs.json --out OUTDIR [--local_rank K]

jobs.json is a list of jobs; each builds a fresh tiny LLaMA and engine and trains it:
    {"name", "stage", "dtype", "steps", "micro", "gas", "clip", "fira": {...} (optional),
     "entry": "initialize" (fira_dist.deepspeed.initialize) | "plain" (register() + deepspeed.initialize),
     "save_at": k (save a checkpoint after k steps) , "load": true (load it first and continue from there),
     "ckpt": dir, "expect_error": substring (the job must fail with it), "grad_accum_dtype": "fp32",
     "zero_init": true (build the model under deepspeed.zero.Init), "model": "llama" | "odd" (ds_common.OddMLP),
     "make_v1": true (before loading, rank 0 rewrites the checkpoint as fira_dist layout version 1 wrote it),
     "reshard": true (load through fira_dist.ds_universal's universal checkpoint even at the same size and stage),
     "stop_at": k (stop after k steps, on the data of a "steps"-step run),
     "load_universal": true (the ds_config's checkpoint.load_universal)}
Rank 0 writes OUTDIR/<name>.pt: losses per step, final full parameters (fp32), every rank's Fira state
bytes, per-matrix state bytes and owners, the comm stats and the engine step count, and per engine step each
rank's optimizer bytes measured (comm_stats) and by the layout's formula (expected_comm_bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ds_common import batches, build, ds_config, loss_of, rewrite_as_layout_v1  # noqa: E402


def full_params(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    model = engine.module
    params = list(model.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def run_job(job: dict, out: Path) -> None:
    import deepspeed

    import fira_dist.deepspeed as fds

    W, rank = dist.get_world_size(), dist.get_rank()
    kind = job.get("model", "llama")
    stage, steps, micro, gas = job["stage"], job["steps"], job.get("micro", 2), job.get("gas", 1)
    cfg = ds_config(stage, job.get("dtype", "fp32"), micro, gas, W, job.get("clip", 0.0), job.get("fira"),
                    grad_accum_dtype=job.get("grad_accum_dtype"))
    if job.get("load_universal"):  # DeepSpeed's switch: every load goes through the universal checkpoint
        cfg["checkpoint"] = {"load_universal": True}
    if job.get("zero_init"):  # parameters partitioned at construction (as from_pretrained does under ZeRO-3)
        import transformers.models.llama.modeling_llama  # noqa: F401  (import outside zero.Init: torch._dynamo)

        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = build(kind, job.get("seed", 0))
    else:
        model = build(kind, job.get("seed", 0))
    if job.get("entry", "initialize") == "plain":
        fds.register()
        cfg["zero_allow_untested_optimizer"] = False  # register() must set it itself
        engine, _, _, _ = deepspeed.initialize(model=model, config=cfg)
    else:
        engine, _, _, _ = fds.initialize(model=model, config=cfg)
    opt = engine.basic_optimizer
    init = full_params(engine, stage) if job.get("zero_init") else None  # zero.Init draws other initial weights
    start = 0
    if job.get("load"):
        if job.get("make_v1"):
            if rank == 0:
                shapes = {n: tuple(p.shape) for n, p in build(kind, job.get("seed", 0)).named_parameters() if p.ndim == 2}
                rewritten = rewrite_as_layout_v1(Path(job["ckpt"]) / "ckpt", W, shapes, cfg["optimizer"]["params"]["rank"])
                assert rewritten > 0
            dist.barrier()
        if job.get("reshard"):  # through the universal checkpoint even at the same world size and stage
            from fira_dist.ds_universal import load_checkpoint

            path, _ = load_checkpoint(engine, job["ckpt"], tag="ckpt", reshard=True)
        else:  # at another world size or stage engine.load_checkpoint reshards by itself (fira_dist.ds_universal)
            path, _ = engine.load_checkpoint(job["ckpt"], tag="ckpt")
        assert path is not None, "checkpoint not loaded"
        start = job["save_at"]
    data = batches(kind, steps, micro * gas * W, job.get("seed", 0))
    losses, norms, comm = [], [], []
    for step in range(start, job.get("stop_at", steps)):  # the data depends on "steps": stop_at ends a run early
        batch = data[step]
        acc = torch.zeros(())
        for k in range(gas):
            lo = (k * W + rank) * micro
            mb = batch[lo:lo + micro]
            loss = loss_of(engine, mb, kind)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            expected = opt.layout.expected_comm_bytes() if boundary else None
            engine.step()
            if boundary:
                comm.append((expected, opt.layout.comm_stats()["bytes_per_step"]))
            acc += loss.detach().float() / gas
        dist.all_reduce(acc)
        losses.append(float(acc) / W)
        gn = engine.get_global_grad_norm()
        norms.append(float(gn) if gn is not None else None)
        if job.get("save_at") == step + 1 and not job.get("load"):
            engine.save_checkpoint(job["ckpt"], tag="ckpt")
    params = full_params(engine, stage)
    layout = opt.layout
    mine = {"state_bytes": layout.state_bytes(), "unit_state_bytes": layout.unit_state_bytes(),
            "projectors": layout.projectors(), "comm_trace": comm,
            "straddlers": layout.straddlers() if layout.mode == "partitioned" else [],
            "budget": opt.comm_bucket_bytes,
            "placement": {u.name: (u.owner, [(pc.rank, pc.length) for pc in u.pieces]) for b in
                          getattr(layout, "buckets", {}).values() for u in b.units if u.low_rank}}
    gathered = [None] * W
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save({"losses": losses, "grad_norms": norms, "params": params, "init_params": init, "state": gathered, "owners": layout.owners(),
                    "comm": layout.comm_stats(), "engine_step": layout.engine_step, "global_step": opt.global_step,
                    "mode": layout.mode, "wrapper": type(engine.optimizer).__name__,
                    "global_steps": engine.global_steps}, out / f"{job['name']}.pt")
    dist.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()
    import deepspeed

    # Under mpirun DeepSpeed discovers ranks with mpi4py and takes its port from distributed_port.
    deepspeed.init_distributed(dist_backend="gloo", distributed_port=int(os.environ.get("FIRA_DS_PORT", "29500")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for job in json.loads(Path(args.jobs).read_text()):
        want = job.get("expect_error")
        try:
            run_job(job, out)
        except Exception as err:  # noqa: BLE001
            if want and want in f"{type(err).__name__}: {err}":
                if dist.get_rank() == 0:
                    (out / f"{job['name']}.err").write_text(f"{type(err).__name__}: {err}")
                continue
            traceback.print_exc()
            return 1
        if want:
            print(f"job {job['name']} was expected to fail with {want!r} and did not", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    from fira_dist.processes import destroy, exit_without_finalization

    code = main()
    destroy()
    exit_without_finalization(code)  # gloo's threads can abort interpreter finalization
