"""fira_dist.memory on 2 CPU processes (torchrun, gloo): for DDP, FSDP2 and DeepSpeed ZeRO-1/2/3, each rank's
estimated optimizer-state bytes equal the bytes of the optimizer's actual state tensors exactly (projectors,
moments, scalars apart), and parameters + gradients agree within 1% (they agree exactly here).

All configurations run in ONE launch (``fira_dist.memory.measure.launch``, the code path of
``fira-dist memory --measure``), one configuration after another in the same two processes, to pay the
process start-up once. A configuration whose layout module is missing is skipped, naming the module.
"""

from __future__ import annotations

import importlib.util

import pytest

from fira_dist.memory import MemoryConfig, estimate

pytestmark = pytest.mark.slow

WORLD = 2
# (strategy, optimizer, precision); every strategy with Fira and AdamW, GaLore once, fp32 and bf16 mixed.
# ZeRO-3 comes last: its engine patches torch.nn.functional.linear for the rest of the process, which changes
# what autograd saves (and so the measured activations) of any configuration after it.
CASES = [
    ("ddp", "fira", "bf16-mixed"), ("ddp", "adamw", "fp32"),
    ("fsdp2", "fira", "fp32"), ("fsdp2", "galore", "bf16-mixed"), ("fsdp2", "adamw", "bf16-mixed"),
    ("zero1", "fira", "fp32"), ("zero1", "adamw", "bf16-mixed"),
    ("zero2", "fira", "bf16-mixed"), ("zero2", "adamw", "fp32"),
    ("zero3", "fira", "bf16-mixed"), ("zero3", "adamw", "bf16-mixed"),
]
NEEDS = {  # the modules a configuration's optimizer needs
    "ddp": ["fira_dist.layouts.replicated"],
    "fsdp2": ["fira_dist.layouts.row_sharded"],
    "zero1": ["fira_dist.layouts.flat_partition", "fira_dist.deepspeed"],
    "zero2": ["fira_dist.layouts.flat_partition", "fira_dist.deepspeed"],
    "zero3": ["fira_dist.layouts.flat_partition", "fira_dist.deepspeed"],
}


def missing(strategy: str, optimizer: str) -> str | None:
    if optimizer == "adamw" and not strategy.startswith("zero"):
        return None
    needs = NEEDS[strategy] if optimizer != "adamw" else []
    if strategy.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed"
    for mod in needs:
        if importlib.util.find_spec(mod) is None:
            return mod
    return None


def config(strategy: str, optimizer: str, precision: str) -> MemoryConfig:
    cfg = MemoryConfig(model="llama_tiny", optimizer=optimizer, strategy=strategy, world_size=WORLD,
                       precision=precision, micro_batch=2, seq_len=32, zero_reduce_bucket_size=1 << 20)
    filled = estimate(cfg, rank=0)["config"]
    return MemoryConfig(**{**filled, "target_modules": tuple(filled["target_modules"])})


@pytest.fixture(scope="module")
def measured():
    from fira_dist.memory.measure import launch

    runnable = [c for c in CASES if missing(c[0], c[1]) is None]
    if not runnable:
        pytest.skip("no layout module available")
    results = launch([config(*c) for c in runnable], steps=2, timeout=900)
    return dict(zip(runnable, results))


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_estimate_equals_measured_per_rank(case, measured):
    mod = missing(case[0], case[1])
    if mod is not None:
        pytest.skip(f"{mod} is not available")
    cfg = config(*case)
    for r, m in enumerate(measured[case]):
        assert m["rank"] == r and m["world_size"] == WORLD
        est = estimate(cfg, rank=r)
        for key, mkey in (("optimizer_projectors", "projectors"), ("optimizer_moments", "moments"),
                          ("optimizer_scalars", "scalars"), ("optimizer_states", "optimizer_states")):
            assert m[mkey] == est[key], f"rank {r} {key}: measured {m[mkey]} != estimated {est[key]}"
        assert m["other"] == 0, f"rank {r}: state tensors of unknown kind: {m['other']} bytes"
        pg_meas, pg_est = m["params"] + m["grads"], est["params"] + est["grads"]
        assert abs(pg_meas - pg_est) <= 0.01 * pg_est, f"rank {r} params+grads: measured {pg_meas}, estimated {pg_est}"
        assert m["master_params"] == est["master_params"], f"rank {r} master weights"
        assert m["activations_saved"] == est["activations_saved"], f"rank {r} saved activations"
