"""How the distributed layouts scale: per-rank optimizer state, step time, refresh-step time and bytes moved
per step, for W = 1, 2, 4 ranks on LLaMA-60M shapes (58M parameters; the 56 attention / MLP matrices low
rank with rank 128, embeddings, norms and lm_head plain Adam, as ``fira_dist.param_groups`` builds them).

Only the optimizer runs: every rank gets the same fixed random gradients (replicated: the whole gradient,
as DDP leaves it; row_sharded: its rows of it, as FSDP2 leaves it, with DTensor parameters), so the numbers
are the optimizer's own. Per (layout, W) it runs 7 steps with update_proj_gap 3: step 0 (first refresh,
warm-up), steps 1, 2, 4, 5 (ordinary) and 3, 6 (refresh: an SVD of every matrix); times are the minimum
over each kind (the least disturbed by other load on the machine), of the slowest rank.
Bytes are what ``optimizer.comm_stats()`` measured (per rank; the largest rank); state is projectors +
moments + limiter norms held by each rank (largest rank, and its share of the one-process total).

    python benchmarks/scaling.py                    # W = 1, 2, 4, both layouts; prints a Markdown table
    python benchmarks/scaling.py --worlds 1 2 --json results/scaling.json

Processes are torchrun ranks on gloo (CPU). On a machine with fewer cores than ranks the time columns show
oversubscription, not scaling; the state and byte columns do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

RANK, GAP, STEPS = 128, 3, 7  # refreshes at steps 0 (warm-up), 3 and 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of LLaMA-60M's parameters, from the model config on the meta device."""
    from transformers import LlamaForCausalLM

    from fira_dist.models import get_model_config

    with torch.device("meta"):
        model = LlamaForCausalLM(get_model_config("llama_60m"))
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _tensor(shape, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def worker(layout: str, out: str) -> None:
    import torch.distributed as dist

    import fira_dist
    from fira_dist.layouts.replicated import row_range

    world = 1
    if layout != "single":
        dist.init_process_group("gloo")
        world = dist.get_world_size()
    rank = dist.get_rank() if world > 1 else 0
    named = shapes()
    low = [n for n, s in named if len(s) == 2 and ("self_attn" in n or "mlp" in n)]
    params, grads = {}, {}
    mesh = None
    if layout == "row_sharded":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh("cpu", (world,))
    for i, (n, s) in enumerate(named):
        full, gfull = _tensor(s, 2 * i, 0.02), _tensor(s, 2 * i + 1, 1e-3)
        if mesh is not None:
            a, b = row_range(s[0], world, rank)
            stride = full.stride()
            params[n] = torch.nn.Parameter(DTensor.from_local(full[a:b].clone(), mesh, [Shard(0)], shape=full.shape,
                                                              stride=stride))
            grads[n] = DTensor.from_local(gfull[a:b].clone(), mesh, [Shard(0)], shape=gfull.shape, stride=stride)
        else:
            params[n], grads[n] = torch.nn.Parameter(full), gfull
    groups = [{"params": [(n, params[n]) for n, _ in named if n not in low]},
              {"params": [(n, params[n]) for n in low], "rank": RANK, "update_proj_gap": GAP, "alpha": 0.25}]
    opt = fira_dist.Fira(groups, lr=1e-3, layout=layout)
    times, nbytes = [], []
    for _ in range(STEPS):
        for n, p in params.items():
            p.grad = grads[n]
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        nbytes.append(opt.comm_stats()["bytes_per_step"])
    lay = opt.layout
    if hasattr(lay, "state_bytes"):
        state = lay.state_bytes()
    else:  # single process: everything
        state = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
                    if k in ("projector", "exp_avg", "exp_avg_sq", "limiter_norm"))
    plain = [i for i in range(1, STEPS) if i % GAP]
    refresh = [i for i in range(1, STEPS) if i % GAP == 0]
    mine = {"rank": rank, "state": state, "step_s": min(times[i] for i in plain),
            "refresh_s": min(times[i] for i in refresh), "bytes_step": max(nbytes[i] for i in plain),
            "bytes_refresh": max(nbytes[i] for i in refresh),
            "svd": getattr(lay, "svd_count", None)}
    info = [mine]
    if world > 1:
        info = [None] * world
        dist.all_gather_object(info, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"layout": layout, "world": world, "params": sum(p.numel() for p in params.values()),
                       "ranks": info}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # skip interpreter finalization: gloo's threads can abort it (pytorch/pytorch#179291)


def launch(layout: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        here = os.path.abspath(__file__)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if layout == "single":
            cmd = [sys.executable, here, "--worker", layout, out]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), here, "--worker", layout, out]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
        with open(out) as f:
            return json.load(f)


def table(results: list[dict]) -> str:
    total = next((r["ranks"][0]["state"] for r in results if r["world"] == 1), None)
    lines = ["| layout | W | state per rank, max (MiB) | share of 1-process state | step (s), max rank | "
             "refresh step (s), max rank | bytes per step per rank (MiB) | bytes on a refresh step (MiB) | SVDs per rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    mib = 2.0 ** 20
    for r in results:
        rs = r["ranks"]
        st = max(x["state"] for x in rs)
        share = f"{st / total:.2f}" if total else "-"
        svd = "/".join(str(x["svd"]) for x in rs) if rs[0]["svd"] is not None else "all"
        lines.append(f"| {r['layout']} | {r['world']} | {st / mib:.1f} | {share} | {max(x['step_s'] for x in rs):.3f} | "
                     f"{max(x['refresh_s'] for x in rs):.2f} | {max(x['bytes_step'] for x in rs) / mib:.1f} | "
                     f"{max(x['bytes_refresh'] for x in rs) / mib:.1f} | {svd} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layouts", nargs="+", default=["replicated", "row_sharded"])
    ap.add_argument("--json", help="also write the raw per-rank numbers here")
    args = ap.parse_args()
    results = []
    for world in args.worlds:
        for layout in (["single"] if world == 1 else args.layouts):
            t0 = time.time()
            results.append(launch(layout, world))
            print(f"# {layout} W={world}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"LLaMA-60M shapes ({results[0]['params'] / 1e6:.1f}M parameters), rank {RANK}, fp32, gloo on CPU, "
          f"{os.cpu_count()} cores")
    print(table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
