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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def load_convergence():
    """benchmarks/convergence.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("convergence", REPO / "benchmarks" / "convergence.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    return conv


@pytest.mark.slow
def test_convergence_smoke_writes_table_plot_and_reuses_runs(tmp_path):
    out, pub = tmp_path / "conv", tmp_path / "docs"
    args = ["--smoke", "--distributed", "--lr-grid", "0.003,0.01", "--extend-grid", "1", "--out", str(out),
            "--publish", str(pub)]
    proc = bench("convergence.py", *args)
    assert proc.returncode == 0, proc.stdout[-6000:]
    res = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["adamw", "galore", "fira", "fira (deepspeed, 2 procs)", "fira (fsdp2, 2 procs)"]
    extra = 0
    for opt in ("adamw", "galore", "fira"):  # the chosen lr is the sweep's best
        best_lr, _ = min(res["sweep"][opt], key=lambda t: t[1])
        assert rows[opt]["lr"] == best_lr
        tried = [lr for lr, _ in res["sweep"][opt]]
        # The grid, plus one rate beyond the end where the grid's best sat (--extend-grid 1).
        grid_best = min(((lr, loss) for lr, loss in res["sweep"][opt] if lr in (0.003, 0.01)), key=lambda t: t[1])[0]
        assert tried == sorted({0.003, 0.01, {0.003: 0.0015, 0.01: 0.02}[grid_best]}), (opt, res["sweep"][opt])
        extra += len(tried) - 2
    first = math.log(8192)  # an untrained model's loss on the 8192-token vocabulary
    for r in rows.values():
        assert all(math.isfinite(x) and x < first for x in r["final_losses"]), r
        assert r["tokens"] == 6 * 4 * 32 and r["tokens_per_s"] > 0
    # Same global batch and seed: the distributed Fira runs land on the single-process loss.
    for key in ("fira (deepspeed, 2 procs)", "fira (fsdp2, 2 procs)"):
        assert rows[key]["val_loss_mean"] == pytest.approx(rows["fira"]["val_loss_mean"], abs=2e-3)
    # Low-rank state is smaller than AdamW's full-rank moments.
    assert rows["fira"]["optimizer_states_bytes"] < rows["adamw"]["optimizer_states_bytes"]
    table = (out / "results.md").read_text()
    assert table == (pub / "convergence.md").read_text()
    assert "| fira (fsdp2, 2 procs) |" in table and "Learning-rate sweep" in table
    for png in (out / "val_loss.png", pub / "convergence_val_loss.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.strip() in proc.stdout  # printed too

    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.log")}
    assert len(stamp) == 3 * 2 + extra + 2  # the sweep (seed 0 is also the only seed) and the two distributed runs
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
                 "--extend-grid", "0", "--out", str(out))
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
    conv = load_convergence()
    adamw = conv.memory_bytes(argparse.Namespace(**res["settings"]), "adamw")
    assert rows["lowrank+restarts"]["optimizer_states_bytes"] == rows["lowrank"]["optimizer_states_bytes"]
    assert rows["lowrank"]["optimizer_states_bytes"] < adamw["optimizer_states"]
    assert rows["lowrank"]["weights_bytes"] < adamw["weights"]  # the factorized model is smaller


def test_convergence_sweep_extends_past_the_end_holding_the_best():
    """The same rule for every method: a best rate at the grid's low (high) end is followed by half (twice) of it;
    a best inside the grid ends the sweep."""
    conv = load_convergence()
    assert conv.next_rate({0.0025: 5.8, 0.005: 5.9, 0.01: 6.1}) == 0.00125
    assert conv.next_rate({0.0025: 6.0, 0.005: 5.9, 0.01: 5.7}) == 0.02
    assert conv.next_rate({0.0025: 6.0, 0.005: 5.3, 0.01: 5.7}) is None
    assert conv.next_rate({0.00125: 5.9, 0.0025: 5.8, 0.005: 5.9}) is None
    assert conv.next_rate({0.003: 5.0}) == 0.0015


def test_convergence_ordering_says_which_gaps_exceed_the_seed_spread():
    conv = load_convergence()
    row = lambda name, m, s, n=3: {"config": name, "val_loss_mean": m, "val_loss_std": s, "seeds": n}
    lines = conv.ordering([row("adamw", 5.0, 0.01), row("fira", 4.80, 0.03), row("galore", 4.82, 0.03),
                           row("fira (fsdp2, 2 procs)", 4.0, 0.0, 1)])
    body = [ln for ln in lines if ln.startswith("| fira") or ln.startswith("| galore")]
    se = math.sqrt(2 * 0.03**2 / 3)
    assert body[0] == f"| fira | galore | 0.0200 | {se:.4f} | no |"  # 0.02 < 2 x 0.0245
    assert body[1].startswith("| galore | adamw | 0.1800 |") and body[1].endswith("| yes |")
    assert len(body) == 2  # one-seed and distributed rows are not ranked
    assert conv.ordering([row("fira", 4.8, 0.0, 1)]) == []


@pytest.mark.parametrize("bad, says", [(["--lr", "sgd=0.1"], "--lr 'sgd=0.1' not accepted"),
                                       (["--lr", "fira=fast"], "--lr 'fira=fast' not accepted"),
                                       (["--lr-grid", "0.01,x"], "--lr-grid '0.01,x' not accepted"),
                                       (["--extend-grid", "-1"], "--extend-grid -1 not accepted"),
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


# ----------------------------------------------------------------------------------------------- make gpu
NO_GPU_HERE = not (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"))


def _no_cuda_torch() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not NO_GPU_HERE, reason="this machine has an NVIDIA GPU: `make gpu` runs for real here")
def test_gpu_check_without_cuda_exits_3_and_installs_nothing(tmp_path):
    """benchmarks/gpu_check.py (`make gpu`) on a machine without CUDA: says so, exits 3, creates neither the GPU
    venv nor the results folder; `make gpu` reports the script's "Error 3"."""
    assert _no_cuda_torch()
    venv, results = tmp_path / "venv-gpu", tmp_path / "results"
    proc = bench("gpu_check.py", "--venv", str(venv), "--json", str(results / "gpu.json"), timeout=120)
    assert proc.returncode == 3, proc.stdout
    assert "no CUDA GPU on this machine" in proc.stdout and "Nothing was installed or run (exit 3)" in proc.stdout
    assert not venv.exists() and not results.exists()
    make = subprocess.run(["make", "gpu", f"GPU_VENV={venv}", f"PYTHON={sys.executable}"], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert make.returncode == 2 and "Error 3" in make.stdout and "no CUDA GPU" in make.stdout, make.stdout
    assert not venv.exists()


def test_gpu_check_rejects_bad_flags_by_name(tmp_path):
    for bad, says in ((["--stages", "tests,probes"], "--stages 'tests,probes' not accepted"),
                      (["--sizes", "7b"], "--sizes '7b' not accepted"),
                      (["--steps", "0"], "--steps=0 not accepted"),
                      (["--wheels", str(tmp_path / "none")], "no such folder")):
        proc = bench("gpu_check.py", *bad, timeout=60)
        assert proc.returncode == 2 and says in proc.stdout, (bad, proc.stdout)


def test_gpu_check_stages_fit_in_8_minutes():
    """Every stage's cap, and the overall budget that also bounds them, leave room under 8 minutes."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    assert sum(gpu_check.CAPS.values()) <= gpu_check.BUDGET <= 8 * 60 - 25
    assert set(gpu_check.CAPS) == {"probe", *gpu_check.STAGES}


@pytest.mark.slow
def test_gpu_check_cpu_rehearsal_prints_its_tables_and_keeps_its_caps(tmp_path):
    """The rehearsal (CPU, toy size) runs the bench and pretrain stages and prints the README's GPU-figures
    formats; a stage over its cap is killed, reported TIMED OUT and the check exits 1."""
    out = tmp_path / "r" / "gpu.json"
    proc = bench("gpu_check.py", "--cpu-rehearsal", "--stages", "bench,pretrain", "--steps", "2", "--json", str(out),
                 timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    rep = json.loads(out.read_text())
    assert rep["exit_code"] == 0 and rep["rehearsal"] and set(rep["stages"]) == {"bench", "pretrain"}
    (row,) = rep["bench"]["rows"]
    assert row["size"] == "toy" and row["matrices"] == 14
    assert all(row[f"step_{k}_ms"] > 0 for k in ("fira_dist", "reference", "adamw_fused"))
    assert set(row["projector_ms"]["svd"]) == {"64x64", "64x172", "172x64"}
    assert rep["pretrain"]["tokens_per_s"] > 0 and rep["pretrain"]["steps"] == 3
    text = proc.stdout
    for piece in ("| stage | result | time (s) | cap (s) |", "| bench | ok: 1 of 1 sizes |",
                  "| model | matrices | rank | fira_dist (ms) | fira.FiraAdamW (ms) | AdamW fused (ms) |",
                  "| model | params | steps | tokens/step | tokens/s | peak CUDA memory (MiB) | loss first -> last |",
                  "Pretraining: fira-dist pretrain --model llama_tiny --strategy single --device cpu"):
        assert piece in text, piece
    assert re.search(r"^\| llama_toy \| 14 \| 16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+x \|", text, re.M)

    t0 = time.monotonic()
    proc = bench("gpu_check.py", "--cpu-rehearsal", "--stages", "bench", "--sizes", "60m", "--steps", "50",
                 "--budget", "8", "--json", str(out), timeout=120)  # 150 steps of ~0.1 s: far over 8 s
    assert proc.returncode == 1 and "| bench | TIMED OUT (0 of 1 sizes measured) |" in proc.stdout, proc.stdout[-3000:]
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
@pytest.mark.skipif(not NO_GPU_HERE, reason="this machine has an NVIDIA GPU")
def test_gpu_check_setup_falls_back_when_pip_fails_and_says_why(tmp_path, monkeypatch):
    """The setup stage where pip cannot install (no index reachable: here an empty --find-links): it says what
    failed, removes the half-made venv, looks for a CUDA torch already on the machine and names where it looked
    (none here: the check then exits 4); with --offline it does not try pip at all."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured indexes or wheel folders: pip finds nothing
    for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(key, raising=False)
    venv, log = tmp_path / "venv-gpu", tmp_path / "setup.log"
    args = gpu_check.parse(["--venv", str(venv), f"--pip-args=--no-index --find-links {tmp_path}"])
    notes: list[str] = []
    assert gpu_check.setup_env(args, time.monotonic() + 240, log, notes) is None
    assert notes[0].startswith("pip install torch==2.13.0 failed (exit 1)"), notes
    assert notes[-1].startswith("no CUDA-enabled torch found in ") and sys.executable in notes[-1], notes
    assert not venv.exists() and "pip install" in log.read_text()
    notes = []
    args = gpu_check.parse(["--venv", str(venv), "--offline"])
    assert gpu_check.setup_env(args, time.monotonic() + 120, log, notes) is None
    assert notes[0] == "--offline: pip not tried" and not venv.exists(), notes


def _tiny_wheel(folder: Path, name: str = "fira_gpu_probe_pkg") -> Path:
    """A minimal valid wheel of a one-module package (stands for a carried deepspeed / datasets wheel)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}.py": b"VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n"}

    def digest(d: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()

    record = "".join(f"{p},sha256={digest(d)},{len(d)}\n" for p, d in files.items()) + \
        f"{name}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return path


def test_gpu_check_offline_uses_the_machines_torch_and_carried_wheels(tmp_path, monkeypatch):
    """--offline --wheels DIR, where this interpreter's torch is taken to see a GPU (torch_probe stands in for
    the CUDA check, which this machine cannot pass): the environment is this interpreter with the repository
    and the carried wheels on PYTHONPATH, the notes say so, and a later run with pip may reuse the folder."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    fake = {"torch": "2.x+cu", "cuda": "12.8", "available": True, "devices": 1, "name": "a GPU"}
    monkeypatch.setattr(gpu_check, "torch_probe", lambda python, env=None, timeout=60: fake)
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _tiny_wheel(wheels)
    venv = tmp_path / "venv-gpu"
    args = gpu_check.parse(["--venv", str(venv), "--offline", "--wheels", str(wheels)])
    notes: list[str] = []
    env = gpu_check.setup_env(args, time.monotonic() + 120, tmp_path / "setup.log", notes)
    assert env is not None and env.python == sys.executable and env.how == "machine", notes
    assert env.pythonpath == [str(REPO), str(venv / "wheels-site")]
    assert notes[0] == "--offline: pip not tried" and notes[1].startswith("installed 1 wheels from"), notes
    assert notes[2].startswith(f"used the CUDA torch already on this machine: {sys.executable}"), notes
    env.check_modules("cpu")
    assert env.modules["fira_dist"] and env.modules["torch"]
    out = subprocess.run([env.python, "-c", "import fira_gpu_probe_pkg as m; print(m.VALUE)"], text=True,
                         env=env.environ("cpu"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert out.stdout.strip() == "42", out.stdout
    assert {p.name for p in venv.iterdir()} == {"wheels-site"}  # removed by a later run that makes a venv
