"""The CUDA paths: every test here is marked ``gpu`` and skips without a CUDA device. ``make gpu`` runs them
(``pytest -m gpu tests/test_gpu.py`` inside benchmarks/gpu_check.py, under a time cap) on a GPU machine.

- the fused low-rank Adam kernel (``algorithm.lowrank_adam_``, torch's fused Adam with its bias corrections at 1)
  on CUDA against the elementwise form (``adam_normalized_``) on CUDA and on CPU, in fp32 and in bf16;
- ``fira_dist.Fira`` steps (both projections, projector refreshes, the limiter, a plain-Adam tensor) on CUDA with
  fp32 and with bf16 parameters against the same steps on CPU in fp32;
- ``fira-dist pretrain`` on one GPU: DeepSpeed ZeRO-2 (process group on NCCL) and FSDP2 (``fully_shard``, NCCL),
  each against a one-process run of the same batches; the three launches run side by side to keep the stage short.

No GPU in this session? ``FIRA_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu.py`` runs the same bodies on CPU
(gloo, ``DS_ACCELERATOR=cpu``): a check of the tests themselves, not of the CUDA paths.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_utils import REPO_ROOT, torchrun_command, worker_env

ON_CPU = os.environ.get("FIRA_GPU_TESTS_ON_CPU", "") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not ON_CPU and not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False); `make gpu` runs these on a GPU machine")]


@pytest.fixture(autouse=True)
def ieee_fp32_matmul():
    """fp32 products in full precision (no TF32) for the in-process comparisons, whatever the default."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


# ----------------------------------------------------------------------------------------------- the kernel
def _options(betas):
    from fira_dist.config import GroupOptions

    return GroupOptions.from_group({"lr": 1e-3, "betas": betas, "eps": 1e-6, "weight_decay": 0.0,
                                    "correct_bias": True, "rank": 4}, where="test_gpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, betas", [((13, 5), (0.9, 0.999)), ((64, 24), (0.0, 0.5)), ((128, 517), (0.9, 0.999)),
                                          ((24, 64), (0.95, 1.0 - 1e-12))])
def test_fused_lowrank_adam_on_device_matches_the_elementwise_form(shape, betas, dtype):
    """lowrank_adam_ on the device (the fused kernel; beta2 = 1 - 1e-12 takes the elementwise fallback) gives the
    moments and N of adam_normalized_ on the device over 5 steps, for a transposed-view gradient and sizes whose
    tail takes the kernel's scalar path; in fp32 also those of adam_normalized_ on CPU."""
    from fira_dist.algorithm import adam_normalized_, lowrank_adam_

    o = _options(betas)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(DEVICE)
    m1, v1, m2, v2 = (torch.zeros(shape, dtype=dtype, device=dev) for _ in range(4))
    mc, vc = torch.zeros(shape), torch.zeros(shape)
    out = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    # fp32: within a few ulps of the largest element. bf16: the elementwise form rounds to bf16 after each of its
    # ops and the kernel once (it computes in fp32), and the moments carry those roundings from step to step: a
    # few bf16 ulps (2^-8) of each element, a wrong formula is off by tens of percent
    rtol, tol = (0.0, 1e-6) if dtype == torch.float32 else (2.0**-5, 2.0**-7)
    for _ in range(5):
        g32 = torch.randn(shape[::-1], generator=gen).mT * 1e-3
        g = g32.to(dev, dtype)
        assert not g.is_contiguous()
        want = adam_normalized_(g, m1, v1, o)
        got = lowrank_adam_(g, m2, v2, o, out=out)
        assert got is out and got.dtype == dtype and got.device.type == dev.type
        for a, b in ((got, want), (m2, m1), (v2, v1)):
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=tol * float(b.float().abs().max()))
        if dtype == torch.float32:
            ref = adam_normalized_(g32, mc, vc, o)
            for a, b in ((got, ref), (m2, mc), (v2, vc)):
                torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6 * float(b.abs().max()))
    assert torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------------------------- the optimizer
SHAPES = {"right": (96, 48), "left": (48, 96), "bias": (48,)}


def _fira_run(device: str, dtype: torch.dtype, steps: int = 6) -> tuple[dict, dict, torch.optim.Optimizer]:
    """Fira on three tensors for `steps` steps (refresh every 3): {name: start}, {name: end}, the optimizer.
    Starts and gradients are drawn in fp32 on CPU and rounded to `dtype`, so every device and dtype sees the same
    values (up to that rounding)."""
    from fira_dist import Fira

    gen = torch.Generator().manual_seed(0)
    start = {k: (torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in SHAPES.items()}
    grads = [{k: (torch.randn(s, generator=gen) * 1e-3).to(dtype) for k, s in SHAPES.items()} for _ in range(steps)]
    params = {k: torch.nn.Parameter(v.to(device, copy=True)) for k, v in start.items()}
    opt = Fira([{"params": [params["right"], params["left"]], "rank": 8, "update_proj_gap": 3, "alpha": 0.25},
                {"params": [params["bias"]]}], lr=1e-2, weight_decay=0.01)
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].to(device)
        opt.step()
    return start, {k: p.detach() for k, p in params.items()}, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fira_steps_on_device_match_cpu_fp32(dtype):
    """Six Fira steps (two projector refreshes, the limiter on) on the device with `dtype` parameters and
    gradients: the change of every parameter equals the change of an fp32 run on CPU from the same (rounded)
    values; the state stays fp32 on the device."""
    start, end, opt = _fira_run(DEVICE, dtype)
    _, ref, _ = _fira_run("cpu", torch.float32)
    # bf16: the parameters are rounded to bf16 after each step (2^-9 relative of a value ~0.02, next to updates
    # ~1e-2 a step); fp32: the SVDs of two libraries (cuSOLVER, LAPACK) agree to ~1e-6 on these gaps
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for k in SHAPES:
        assert end[k].dtype == dtype and end[k].device.type == DEVICE
        got = end[k].float().cpu() - start[k].float()
        want = ref[k] - start[k].float()
        err = float((got - want).norm() / want.norm())
        assert err < tol, (k, err)
    for p, st in opt.state.items():
        for name in ("exp_avg", "exp_avg_sq", "projector"):
            if name in st:
                assert st[name].dtype == torch.float32 and st[name].device.type == DEVICE, (name, st[name].dtype)


# ----------------------------------------------------------------------------------------------- pretraining
TOY = ["--model", "llama_tiny", "--seq-len", "32", "--max-documents", "100", "--eval-every", "0", "--save-every", "0",
       "--no-tensorboard", "--log-every", "1", "--rank", "8", "--update-proj-gap", "2", "--alpha", "0.25",
       "--lr", "0.003", "--weight-decay", "0.0", "--grad-clip", "0", "--max-steps", "4", "--micro-batch-size", "4",
       "--device", DEVICE, "--resume", "none", "--dist-timeout", "120"]
DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
             "steps_per_print": 10**9,
             "optimizer": {"type": "fira", "params": {"lr": 0.003, "rank": 8, "update_proj_gap": 2, "alpha": 0.25,
                                                     "weight_decay": 0.0}}}
# on a GPU: under the tests stage's cap in benchmarks/gpu_check.py (120 s); the CPU rehearsal on 2 shared cores
# needs longer (DeepSpeed's CPU op build, three processes at once)
LAUNCH_TIMEOUT = 300 if ON_CPU else 100


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """One-process runs on the device, started side by side: single, deepspeed (ZeRO-2, torchrun), fsdp2 (torchrun).
    {name: (process with stdout+stderr, output dir)}."""
    pytest.importorskip("datasets", reason="fira-dist pretrain needs the datasets package")
    pytest.importorskip("transformers", reason="fira-dist pretrain needs the transformers package")
    root = tmp_path_factory.mktemp("gpu_pretrain")
    cfg = root / "ds_zero2.json"
    cfg.write_text(json.dumps(DS_CONFIG))
    env = worker_env({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FIRA_DIST_NO_TQDM": "1",
                      "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu" if ON_CPU else "cuda"})
    runs = {"single": [sys.executable, "-m", "fira_dist.pretrain", *TOY, "--strategy", "single"],
            "fsdp2": torchrun_command("fira_dist.pretrain", 1, [*TOY, "--strategy", "fsdp2"], module=True)}
    if importlib.util.find_spec("deepspeed") is not None:  # else test_deepspeed_zero2_one_gpu skips
        runs["deepspeed"] = torchrun_command("fira_dist.pretrain", 1, [*TOY, "--strategy", "deepspeed",
                                                                        "--deepspeed", str(cfg)], module=True)
    procs = {}
    for name, cmd in runs.items():
        out = root / name
        log = open(root / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([*cmd, "--output-dir", str(out)], env=env, cwd=REPO_ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True), out, log, cmd)
    done, deadline = {}, time.monotonic() + LAUNCH_TIMEOUT
    for name, (proc, out, log, cmd) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # SIGTERM (torchrun passes it on to its trainers), then SIGKILL
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        log.close()
        text = (root / f"{name}.log").read_text()
        done[name] = (subprocess.CompletedProcess(cmd, proc.returncode, text), out)
    return done


def _finished(launched, name: str) -> dict:
    proc, out = launched[name]
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["end_step"] == 4 and summary["world_size"] == 1, summary
    mem = summary["memory_per_rank"][0]
    assert ("cuda_peak_mb" in mem) == (DEVICE == "cuda"), mem
    return summary


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r.get("kind", "train") == "train" and "loss" in r]


def _same_losses(launched, name: str) -> None:
    got, want = _losses(launched[name][1]), _losses(launched["single"][1])
    assert len(got) == len(want) == 4, (got, want)
    # the same global batch and schedule on one device: equal up to summation order (atomics in CUDA backward)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (name, got, want)
    assert want[-1] < want[0]


def test_single_process_pretrain_on_device(launched):
    s = _finished(launched, "single")
    assert s["strategy"] == "single" and s["tokens_per_s"] > 0


def test_deepspeed_zero2_one_gpu(launched):
    """DeepSpeed ZeRO-2 on one GPU: the process group is NCCL (gloo on the CPU rehearsal), the flat-partition
    layout is bound, and the losses are the one-process run's."""
    if "deepspeed" not in launched:
        pytest.skip("deepspeed is not installed in this environment")
    s = _finished(launched, "deepspeed")
    assert s["strategy"] == "deepspeed" and s["zero_stage"] == 2, s
    assert s["backend"] == ("gloo" if ON_CPU else "nccl"), s["backend"]
    assert "DeepSpeed layout bound (partitioned, ZeRO stage 2, 1 ranks)" in launched["deepspeed"][0].stdout
    _finished(launched, "single")
    _same_losses(launched, "deepspeed")


def test_fsdp2_one_gpu(launched):
    """FSDP2 (fully_shard) on one GPU, NCCL: the losses are the one-process run's."""
    s = _finished(launched, "fsdp2")
    assert s["strategy"] == "fsdp2" and ("gloo" if ON_CPU else "nccl") in (s["backend"] or ""), s["backend"]
    _finished(launched, "single")
    _same_losses(launched, "fsdp2")
