"""The benchmark drivers run end to end at toy size and write what the README's figures come from.

benchmarks/convergence.py --smoke: the learning-rate sweep, the seeds, Fira under DeepSpeed ZeRO-2 and FSDP2
(2 processes), the table, the JSON and the PNG plot; a second call reuses the finished runs.
benchmarks/optimizer_step.py at toy size (--sizes toy): prints and writes the ratios of the README's table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


@pytest.mark.slow
def test_convergence_smoke_writes_table_plot_and_reuses_runs(tmp_path):
    out, pub = tmp_path / "conv", tmp_path / "docs"
    args = ["--smoke", "--distributed", "--lr-grid", "0.003,0.01", "--out", str(out), "--publish", str(pub)]
    proc = bench("convergence.py", *args)
    assert proc.returncode == 0, proc.stdout[-6000:]
    res = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["adamw", "galore", "fira", "fira (deepspeed, 2 procs)", "fira (fsdp2, 2 procs)"]
    for opt in ("adamw", "galore", "fira"):  # the chosen lr is the sweep's best
        best_lr, _ = min(res["sweep"][opt], key=lambda t: t[1])
        assert rows[opt]["lr"] == best_lr
        assert [lr for lr, _ in res["sweep"][opt]] == [0.003, 0.01]
    first = math.log(8192)  # an untrained model's loss on the 8192-token vocabulary
    for r in rows.values():
        assert all(math.isfinite(x) and x < first for x in r["final_losses"]), r
        assert r["tokens"] == 6 * 4 * 32 and r["tokens_per_s"] > 0
    # Same global batch and seed: the distributed Fira runs land on the single-process loss.
    for key in ("fira (deepspeed, 2 procs)", "fira (fsdp2, 2 procs)"):
        assert rows[key]["val_loss_mean"] == pytest.approx(rows["fira"]["val_loss_mean"], abs=2e-3)
    # Low-rank state is smaller than AdamW's full-rank moments.
    assert rows["fira"]["optimizer_state_bytes"] < rows["adamw"]["optimizer_state_bytes"]
    table = (out / "results.md").read_text()
    assert table == (pub / "convergence.md").read_text()
    assert "| fira (fsdp2, 2 procs) |" in table and "Learning-rate sweep" in table
    for png in (out / "val_loss.png", pub / "convergence_val_loss.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.strip() in proc.stdout  # printed too

    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.log")}
    assert len(stamp) == 3 * 2 + 2  # the sweep (seed 0 is also the only seed) and the two distributed runs
    again = bench("convergence.py", *args)
    assert again.returncode == 0, again.stdout[-4000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.log")} == stamp  # nothing rerun
    assert not re.search(r"-s0: \d+ s$", again.stdout, re.M) and table.strip() in again.stdout

@pytest.mark.slow
def test_convergence_smoke_knows_lowrank_restarts_and_resets(tmp_path):
    """The methods of Glentis et al. 2025 at toy size (6 steps, resets after step 3 with a 1-step ramp): each run
    finishes below the untrained loss, restarts and resets show in the logged lr (0.001x at step 4), and lowrank's
    optimizer state is Adam's on the factorized model (smaller than AdamW's on the full one)."""
    out = tmp_path / "conv"
    methods = ["lowrank", "lowrank+restarts", "fira+reset"]
    proc = bench("convergence.py", "--smoke", "--optimizers", ",".join(methods), "--lr-grid", "0.003",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-6000:]
    res = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == methods
    assert [rows[m]["restart_every"] for m in methods] == [None, 3, 3]
    for m in methods:
        assert all(math.isfinite(x) and x < math.log(8192) for x in rows[m]["final_losses"]), rows[m]
        lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "runs" / f"{m}-single-lr0.003-s0" / "metrics.jsonl")
                                                .read_text().splitlines()) if r.get("kind", "train") == "train"}
        dip = lrs[4] / lrs[5]  # step 4: 0.001 x the scheduled lr; step 5: back to 1x (the cosine moves a little)
        assert (0.0005 < dip < 0.002) if "+" in m else (dip > 0.5), (m, lrs)
    assert "restarts / resets every 3 steps" in (out / "results.md").read_text()
    spec = importlib.util.spec_from_file_location("convergence", REPO / "benchmarks" / "convergence.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    adamw = conv.optimizer_state_bytes(argparse.Namespace(**res["settings"]), "adamw")
    assert rows["lowrank+restarts"]["optimizer_state_bytes"] == rows["lowrank"]["optimizer_state_bytes"] < adamw


@pytest.mark.parametrize("bad, says", [(["--lr", "sgd=0.1"], "--lr 'sgd=0.1' not accepted"),
                                       (["--lr", "fira=fast"], "--lr 'fira=fast' not accepted"),
                                       (["--lr-grid", "0.01,x"], "--lr-grid '0.01,x' not accepted"),
                                       (["--optimizers", "adamw,lion"], "'lion' is not one of adamw, galore, fira"),
                                       (["--optimizers", "lowrank+reset"], "'lowrank+reset' is not one of"),
                                       (["--restart-every", "4", "--recovery-steps", "4"],
                                        "--restart-every 4 / --recovery-steps 4 not accepted")])
def test_convergence_rejects_bad_flags_by_name(bad, says, tmp_path):
    proc = bench("convergence.py", "--smoke", "--out", str(tmp_path), *bad, timeout=120)
    assert proc.returncode == 2 and says in proc.stdout, proc.stdout
    assert not (tmp_path / "runs").exists()


def test_optimizer_step_benchmark_prints_and_writes_ratios(tmp_path):
    """The README's optimizer-step table at toy size: every optimizer, refresh kind and projector timed, the
    ratios printed, the JSON written; --moments times the elementwise and the fused low-rank Adam."""
    out = tmp_path / "step.json"
    proc = bench("optimizer_step.py", "--sizes", "toy", "--steps", "2", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    (row,) = json.loads(out.read_text())
    assert row["size"] == "toy" and row["matrices"] == 14
    for key in ("steady_fira_dist_s", "steady_reference_s", "steady_adamw_s", "products2_s", "products3_s",
                "refresh_fira_dist_svd_s", "refresh_fira_dist_randomized_s", "refresh_reference_svd_s",
                "projectors_svd_s", "projectors_randomized_s"):
        assert row[key] > 0, key
    assert 0.5 < row["randomized_captured_norm_decaying_min"] <= 1.0 + 1e-6
    assert re.search(r"^\| llama_toy r=16 \| 14 \| [\d.]+ / [\d.]+ / [\d.]+ \| [\d.]+x \| ", proc.stdout, re.M), proc.stdout

    proc = bench("optimizer_step.py", "--moments", "--sizes", "toy", "--steps", "2", "--json", str(out), timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    (row,) = json.loads(out.read_text())
    assert row["matrices"] == 14 and row["numbers"] == 2 * (4 * 64 * 16 + 3 * 172 * 16)
    assert row["elementwise_s"] > 0 and row["fused_s"] > 0 and "| llama_toy | 14 |" in proc.stdout

    proc = bench("optimizer_step.py", "--sizes", "7b", timeout=60)
    assert proc.returncode == 2 and "--sizes 7b not accepted" in proc.stdout
