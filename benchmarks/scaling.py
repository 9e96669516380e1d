"""How the distributed layouts scale: per-rank optimizer state, step time, refresh-step time and bytes moved
per step, for W = 1, 2, 4 ranks on LLaMA-60M shapes (58M parameters; the 56 attention / MLP matrices low
rank with rank 128, embeddings, norms and lm_head plain Adam, as ``fira_dist.param_groups`` builds them).

Only the optimizer runs: every rank gets the same fixed random gradients (replicated: the whole gradient,
as DDP leaves it; row_sharded: its rows of it, as FSDP2 leaves it, with DTensor parameters; zero3: its ZeRO-3
partition of each parameter in a flat fp32 tensor, read by the DeepSpeed layout from partition tables built by
ZeRO-3's rule, ceil(numel / W) elements per rank), so the numbers are the optimizer's own. Per (layout, W,
projector) it runs 7 steps with update_proj_gap 3: step 0 (first refresh, warm-up), steps 1, 2, 4, 5 (ordinary)
and 3, 6 (refresh: a new projector for every matrix, by exact SVD or by the randomized range finder, which the
sliced layouts compute in place: layouts/sketch.py); times are the minimum over each kind (the least disturbed
by other load on the machine), of the slowest rank. Bytes are what ``optimizer.comm_stats()`` measured (per
rank; the largest rank) next to the layout's formula (``expected_comm_bytes``) and next to what the framework
itself moves per step (ZeRO-3: gradient reduce-scatter + parameter all-gather for forward and for backward;
FSDP2: the same; DDP: the gradient all-reduce; fp32, Comm's convention); state is projectors + moments +
limiter norms held by each rank (largest rank, and its share of the one-process total). The same formulas
applied to LLaMA-7B at W = 8 and 64 follow (``fira_dist.memory.optimizer``, the layouts' plans).

    python benchmarks/scaling.py                    # W = 1, 2, 4; prints Markdown tables
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


def _zero3_stub(opt, params: dict, grads: dict, names: list[str], world: int, rank: int):
    """Bind the DeepSpeed layout to ZeRO-3 partition tables built by ZeRO-3's rule (what the engine would hold):
    one flat fp32 tensor per param group with this rank's ceil(numel / W) slice of each parameter and its grad."""
    from fira_dist.layouts.flat_partition import FlatPartition

    class Tables:
        pass

    z = Tables()
    z.fp16_groups, z.sub_group_to_group_id, z.fp32_partitioned_groups_flat = [], [], []
    full = {id(p): n for n, p in params.items()}
    for gi, g in enumerate(opt.param_groups):
        flat_parts, grad_parts = [], []
        for p in g["params"]:
            n = p.numel()
            pn = -(-n // world)
            lo, hi = min(rank * pn, n), min((rank + 1) * pn, n)
            piece = torch.zeros(pn)
            piece[:hi - lo] = p.detach().reshape(-1)[lo:hi]
            gp = torch.zeros(pn)
            gp[:hi - lo] = grads[full[id(p)]].reshape(-1)[lo:hi]
            flat_parts.append(piece)
            grad_parts.append(gp)
            p.ds_shape, p.ds_numel = p.shape, n
            p.partition_numel = lambda pn=pn: pn
        flat = torch.cat(flat_parts)
        flat.grad = torch.cat(grad_parts)
        z.fp16_groups.append(list(g["params"]))
        z.sub_group_to_group_id.append(gi)
        z.fp32_partitioned_groups_flat.append(flat)
    lay = FlatPartition(opt)
    lay.stage = 3
    lay.comm = __import__("fira_dist.comm", fromlist=["Comm"]).Comm(None)
    lay.checkpoint_comm = lay.comm
    lay._bind_zero3(z, {id(p): n for n, p in params.items()})
    flats = z.fp32_partitioned_groups_flat
    for g, flat in zip(opt.param_groups, flats):  # what DeepSpeed hands the client optimizer
        g["params"] = [flat]
    opt.layout = lay
    return lay


def worker(layout: str, out: str, projector: str = "svd") -> None:
    import torch.distributed as dist

    import fira_dist
    from fira_dist.layouts.replicated import row_range

    world = 1
    zero3 = layout == "zero3"
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
              {"params": [(n, params[n]) for n in low], "rank": RANK, "update_proj_gap": GAP, "alpha": 0.25,
               "projector": projector}]
    opt = fira_dist.Fira(groups, lr=1e-3, layout="single" if zero3 else layout)
    if zero3:
        _zero3_stub(opt, params, grads, [n for n, _ in named], world, rank)
    times, nbytes, expected = [], [], []
    for _ in range(STEPS):
        if not zero3:
            for n, p in params.items():
                p.grad = grads[n]
        if world > 1:
            dist.barrier()
        expected.append(opt.layout.expected_comm_bytes() if hasattr(opt.layout, "expected_comm_bytes") else 0)
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
            "formula_step": max(expected[i] for i in plain), "formula_refresh": max(expected[i] for i in refresh),
            "formula_matches": all(e == m for e, m in zip(expected, nbytes)),
            "svd": getattr(lay, "svd_count", None), "sketch": getattr(lay, "sketch_count", None)}
    info = [mine]
    if world > 1:
        info = [None] * world
        dist.all_gather_object(info, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"layout": layout, "world": world, "projector": projector,
                       "params": sum(p.numel() for p in params.values()), "ranks": info}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # skip interpreter finalization: gloo's threads can abort it (pytorch/pytorch#179291)


def launch(layout: str, world: int, projector: str = "svd") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        here = os.path.abspath(__file__)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        if layout == "single":
            cmd = [sys.executable, here, "--worker", layout, out, projector]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), here, "--worker", layout, out, projector]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
        with open(out) as f:
            return json.load(f)


FRAMEWORK = {"replicated": "DDP all-reduce", "row_sharded": "FSDP2", "zero3": "ZeRO-3"}


def framework_bytes(layout: str, params: int) -> int:
    """What the framework itself moves per step and rank in fp32 (Comm's convention): DDP all-reduces the gradients
    (4 N); FSDP2 and ZeRO-3 reduce-scatter them (4 N) and all-gather the parameters for forward and backward (8 N)."""
    return 4 * params if layout == "replicated" else 12 * params


def table(results: list[dict]) -> str:
    total = next((r["ranks"][0]["state"] for r in results if r["world"] == 1), None)
    lines = ["| layout | W | projector | state per rank, max (MiB) | share of 1-process state | step (s), max rank | "
             "refresh step (s), max rank | bytes per step per rank, measured / formula (MiB) | framework's own "
             "(MiB) | share | bytes on a refresh step, measured / formula (MiB) | SVDs per rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = 2.0 ** 20
    for r in results:
        rs = r["ranks"]
        st = max(x["state"] for x in rs)
        share = f"{st / total:.2f}" if total else "-"
        svd = "/".join(str(x["svd"]) for x in rs) if rs[0]["svd"] is not None else "all"
        ok = all(x.get("formula_matches", True) for x in rs)
        step_b = max(x["bytes_step"] for x in rs)
        fw = framework_bytes(r["layout"], r["params"]) if r["world"] > 1 else 0
        lines.append(f"| {r['layout']} | {r['world']} | {r.get('projector', 'svd')} | {st / mib:.1f} | {share} | "
                     f"{max(x['step_s'] for x in rs):.3f} | {max(x['refresh_s'] for x in rs):.2f} | "
                     f"{step_b / mib:.2f} / {max(x.get('formula_step', 0) for x in rs) / mib:.2f}{'' if ok else ' (!)'} | "
                     f"{fw / mib:.0f} | {f'{100 * step_b / fw:.1f} %' if fw else '-'} | "
                     f"{max(x['bytes_refresh'] for x in rs) / mib:.2f} / "
                     f"{max(x.get('formula_refresh', 0) for x in rs) / mib:.2f} | {svd} |")
    return "\n".join(lines)


def table_7b() -> str:
    """The same formulas for LLaMA-7B (rank 64, fp32 here as above; bf16 halves the framework's bytes)."""
    from fira_dist.memory import MemoryConfig, estimate, model_info
    from fira_dist.memory.optimizer import optimizer_comm_bytes

    mib = 2.0 ** 20
    lines = ["| strategy | W | optimizer, regular step (MiB) | framework's own (MiB) | share | refresh, exact SVD (MiB) | "
             "refresh, randomized sketch (MiB) | sketch / exact |", "|---|---|---|---|---|---|---|---|"]
    for strategy in ("zero3", "fsdp2"):
        for W in (8, 64):
            cfg = MemoryConfig(model="llama_7b", optimizer="fira", strategy=strategy, world_size=W, precision="fp32")
            d = estimate(cfg)
            full = MemoryConfig(**{**d["config"], "target_modules": tuple(d["config"]["target_modules"])})
            info = model_info("llama_7b", "fira", full.rank)
            r = d["rank"]
            reg = optimizer_comm_bytes(info, full, r, full.rank)
            ex = optimizer_comm_bytes(info, full, r, full.rank, refresh="svd") - reg
            sk = optimizer_comm_bytes(info, full, r, full.rank, refresh="randomized") - reg
            fw = d["framework_comm_bytes"]
            lines.append(f"| {strategy} | {W} | {reg / mib:.0f} | {fw / mib:.0f} | {100 * reg / fw:.2f} % | "
                         f"{ex / mib:.0f} | {sk / mib:.0f} | {sk / ex:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        worker(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "svd")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layouts", nargs="+", default=["replicated", "row_sharded", "zero3"])
    ap.add_argument("--projectors", nargs="+", default=["svd", "randomized"],
                    help="projector kinds for the sliced layouts (row_sharded, zero3); replicated runs svd")
    ap.add_argument("--json", help="also write the raw per-rank numbers here")
    args = ap.parse_args()
    results = []
    for world in args.worlds:
        for layout in (["single"] if world == 1 else args.layouts):
            for projector in (args.projectors if layout in ("row_sharded", "zero3") else ["svd"]):
                t0 = time.time()
                results.append(launch(layout, world, projector))
                print(f"# {layout} W={world} {projector}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"LLaMA-60M shapes ({results[0]['params'] / 1e6:.1f}M parameters), rank {RANK}, fp32, gloo on CPU, "
          f"{os.cpu_count()} cores")
    print(table(results))
    print("\nThe formulas at LLaMA-7B (rank 64, fp32; bytes per step and rank, the largest rank):\n")
    print(table_7b())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
