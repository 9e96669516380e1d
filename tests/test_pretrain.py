"""Fast tests of ``fira-dist pretrain``: flag validation messages, the dry run (llama_7b in seconds), the
learning-rate schedule, launch-environment discovery and the checkpoint manager. In-process, no process
group. The end-to-end runs (one and two processes, every strategy, resume) are in test_pretrain_dist.py."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from fira_dist.pretrain import checkpoint as C
from fira_dist.pretrain import distributed as D
from fira_dist.pretrain.main import main
from fira_dist.pretrain.train_utils import EXIT_USAGE, Metrics, lr_factor, read_metrics


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_main(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------------------------- flags
def _ds_config(tmp_path, **over):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "zero_optimization": {"stage": 2}, "optimizer": {"type": "fira", "params": {"rank": 8}}}
    cfg.update(over)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["--model", "llama_5m"], ["--model='llama_5m'", "llama_60m", "llama_7b"]),
    (["--model", "/no/such/config.json"], ["--model=", "does not exist"]),
    (["--strategy", "zero9"], ["--strategy", "invalid choice", "'zero9'", "fsdp2"]),
    (["--optimizer", "sgd"], ["--optimizer", "'sgd'", "fira", "galore", "adamw"]),
    (["--strategy", "deepspeed"], ["--strategy=deepspeed needs --deepspeed"]),
    (["--deepspeed", "/no/such/ds.json"], ["--deepspeed='/no/such/ds.json'", "no such file"]),
    (["--strategy", "ddp", "--deepspeed", "x.json"], ["--deepspeed='x.json'", "only accepted with --strategy deepspeed"]),
    (["--lr", "-1"], ["--lr=-1.0", "> 0"]),
    (["--lr", "nan"], ["--lr=nan"]),
    (["--rank", "0"], ["--rank=0", ">= 1"]),
    (["--max-bad-steps", "0"], ["--max-bad-steps=0", ">= 1"]),
    (["--dist-timeout", "0"], ["--dist-timeout=0.0", "> 0"]),
    (["--grad-accum", "2", "--total-batch-size", "16"], ["--total-batch-size=16", "--grad-accum=2", "together"]),
    (["--total-batch-size", "12", "--micro-batch-size", "8"], ["--total-batch-size=12", "multiple of"]),
    (["--model", "llama_tiny", "--seq-len", "4096"], ["--seq-len=4096", "max_position_embeddings", "256"]),
    (["--max-steps", "10", "--warmup-steps", "11"], ["--warmup-steps=11", "[0, --max-steps=10]"]),
    (["--data", "/no/such/dir/*.jsonl"], ["--data='/no/such/dir/*.jsonl'", "matched no files", ".parquet"]),
    (["--data", "x.jsonl", "--dataset", "allenai/c4"], ["--data=", "--dataset=", "not accepted together"]),
    (["--eval-data", "x.jsonl"], ["--eval-data=", "only accepted with --data"]),
    (["--resume", "/no/such/ckpt"], ["--resume='/no/such/ckpt'", "auto, none"]),
    (["--init", "meta"], ["--init='meta'", "only accepted with --strategy fsdp2"]),
    (["--tokenizer", "/no/such/tokenizer"], ["--tokenizer='/no/such/tokenizer'", "could not be loaded"]),
    (["--dry-run-world-size", "8"], ["--dry-run-world-size is only accepted with --dry-run"]),
    (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
    (["--target-modules", "nothing_like_this", "--model", "llama_tiny", "--dry-run"],
     ["--target-modules='nothing_like_this'", "matched no nn.Linear", "self_attn"]),
])
def test_bad_flags_are_named(capsys, tmp_path, argv, expected):
    rc, out, err = run_main(capsys, *argv, "--output-dir", str(tmp_path / "out"))
    assert rc == EXIT_USAGE, (out, err)
    for piece in expected:
        assert piece in err, (piece, err)


def test_bad_ds_configs_are_named(capsys, tmp_path):
    base = ["--strategy", "deepspeed", "--model", "llama_tiny", "--output-dir", str(tmp_path / "o")]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    rc, _, err = run_main(capsys, *base, "--deepspeed", str(bad_json))
    assert rc == EXIT_USAGE and "cannot read it as JSON" in err
    cfg = _ds_config(tmp_path, optimizer={"type": "fira", "params": {"gamma": 1.01}})
    rc, _, err = run_main(capsys, *base, "--deepspeed", cfg)
    assert rc == EXIT_USAGE and "'gamma'" in err and "limiter_gamma" in err
    cfg = _ds_config(tmp_path, train_micro_batch_size_per_gpu=4)
    rc, _, err = run_main(capsys, *base, "--deepspeed", cfg, "--micro-batch-size", "2")
    assert rc == EXIT_USAGE and "train_micro_batch_size_per_gpu=4" in err and "--micro-batch-size=2" in err
    cfg = _ds_config(tmp_path, zero_optimization={"stage": 5})
    rc, _, err = run_main(capsys, *base, "--deepspeed", cfg)
    assert rc == EXIT_USAGE and "zero_optimization.stage=5" in err
    cfg = _ds_config(tmp_path, optimizer={"type": "Lamb"})
    rc, _, err = run_main(capsys, *base, "--deepspeed", cfg)
    assert rc == EXIT_USAGE and "optimizer.type='Lamb'" in err


def test_single_strategy_refused_with_several_processes(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    rc, _, err = run_main(capsys, "--strategy", "single", "--dry-run")
    assert rc == EXIT_USAGE and "--strategy=single is not accepted with 2 processes" in err


# ----------------------------------------------------------------------------------------------- dry run
def test_dry_run_llama_7b_in_seconds(capsys):
    t = time.perf_counter()
    rc, out, err = run_main(capsys, "--model", "llama_7b", "--strategy", "fsdp2", "--dry-run",
                            "--dry-run-world-size", "64", "--bf16", "--activation-checkpointing")
    elapsed = time.perf_counter() - t
    assert rc == 0, err
    assert elapsed < 60, elapsed
    assert "world size 64" in out
    assert "llama_7b: hidden 4096, intermediate 11008, heads 32, layers 32" in out
    assert "fira rank 64, update_proj_gap 500" in out  # the paper's 7B hyper-parameters
    assert "224 matrices" in out and "mlp.down_proj" in out and "left projection" in out
    assert "per-rank memory" in out and "peak" in out
    assert "checks       OK" in out
    assert "Traceback" not in err


def test_dry_run_deepspeed_merges_config(capsys, tmp_path):
    cfg = _ds_config(tmp_path)
    rc, out, err = run_main(capsys, "--model", "llama_tiny", "--strategy", "deepspeed", "--deepspeed", cfg,
                            "--dry-run", "--dry-run-world-size", "4", "--micro-batch-size", "2", "--grad-accum", "3",
                            "--lr", "0.002")
    assert rc == 0, err
    assert "deepspeed ZeRO-2" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("ds_config"))
    merged = json.loads(line[len("ds_config"):])
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["gradient_accumulation_steps"] == 3
    assert merged["train_batch_size"] == 24
    assert merged["optimizer"]["params"]["rank"] == 8  # the config's value
    assert merged["optimizer"]["params"]["lr"] == 0.002  # the CLI fills what the config lacks
    assert merged["bf16"] == {"enabled": False}


def test_ds_config_wins_over_flags_with_a_warning(capsys, tmp_path):
    cfg = _ds_config(tmp_path)
    rc, out, _ = run_main(capsys, "--model", "llama_tiny", "--strategy", "deepspeed", "--deepspeed", cfg,
                          "--dry-run", "--rank", "4")
    assert rc == 0
    assert "optimizer.params.rank=8 disagrees with --rank=4; the ds_config wins" in out
    assert "fira rank 8" in out


# ----------------------------------------------------------------------------------------------- pieces
def test_lr_schedule_is_galores():
    assert lr_factor(0, 10, 100) == 0.0
    assert lr_factor(5, 10, 100) == 0.5
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)
    vals = [lr_factor(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_launch_env_discovery():
    assert D.discover({}) == D.LaunchEnv()
    le = D.discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (le.rank, le.world_size, le.local_rank, le.local_world_size, le.launcher) == (3, 4, 1, 2, "torchrun")
    assert (le.master_addr, le.master_port, le.num_nodes) == ("h0", 1234, 2)
    le = D.discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1",
                     "SLURM_STEP_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "2"})
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (5, 6, 1, "slurm")
    assert le.master_addr == "gpu07" and le.master_port == 15000 + 4242
    assert D.first_host("n1,n2") == "n1" and D.first_host("a[3-4],b1") == "a3"
    # one Slurm task (e.g. torchrun under srun --ntasks-per-node 1): not a Slurm world of its own
    assert D.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"
    le = D.discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                     "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2000"})
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (1, 2, 1, "mpi")
    le = D.discover({"PMI_RANK": "0", "PMI_SIZE": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "2001"})
    assert (le.rank, le.world_size, le.launcher) == (0, 3, "mpi")
    with pytest.raises(ValueError, match="RANK='x'"):
        D.discover({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="no MASTER_ADDR"):
        D.discover({"RANK": "0", "WORLD_SIZE": "2"})


def _writer(folder):
    (folder / "dcp").mkdir()
    (folder / "dcp" / "weights.bin").write_bytes(b"x" * 100)


def test_checkpoints_atomic_rotated_and_incomplete_ones_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = C.CheckpointManager(root, keep_last=2, rank=0, world_size=1)
    for step in (10, 20, 30):
        mgr.save(step, _writer, {"reason": "periodic", "strategy": "single"})
    assert sorted(p.name for p in root.iterdir()) == ["step_00000020", "step_00000030"]
    m = C.read_manifest(root / "step_00000030")
    assert m["complete"] and m["step"] == 30 and m["world_size"] == 1 and m["strategy"] == "single"
    assert m["files"]["dcp/weights.bin"] == 100 and m["rng"] == ["rank_00000.pt"]
    # a crash mid-save leaves a temporary folder; a later folder without manifest or with a truncated file
    (root / ".tmp-step_00000040").mkdir()
    (root / ".tmp-step_00000040" / "manifest.json").write_text(json.dumps({**m, "step": 40}))
    (root / "step_00000050").mkdir()
    bad = root / "step_00000060"
    mgr.save(60, _writer, {"reason": "periodic"})
    (bad / "dcp" / "weights.bin").write_bytes(b"x" * 10)
    assert C.incomplete_reason(bad) is not None and "100" in C.incomplete_reason(bad)
    assert C.find_latest(root) == root / "step_00000030"
    assert C.resolve_resume("auto", root) == root / "step_00000030"
    assert C.resolve_resume("none", root) is None
    assert not (root / "step_00000020").exists()  # rotated when step 60 was written (keep_last 2)
    assert C.resolve_resume(str(root / "step_00000030"), root) == root / "step_00000030"
    assert C.resolve_resume(str(tmp_path), root) == root / "step_00000030"  # a run's output dir
    with pytest.raises(ValueError, match="lacks|bytes"):
        C.resolve_resume(str(bad), root)
    # the next save sweeps temporary leftovers
    mgr.save(70, _writer, {"reason": "final"})
    assert not (root / ".tmp-step_00000040").exists()


def test_rng_state_round_trip(tmp_path):
    st = C.rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    torch.save(st, tmp_path / "r.pt")
    C.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_metrics_jsonl_truncated_on_resume(tmp_path):
    m = Metrics(str(tmp_path), enabled=True, tensorboard=False)
    for s in range(1, 6):
        m.write({"step": s, "loss": float(s)})
    m.write({"step": 6, "loss": math.nan})
    m.close()
    assert read_metrics(str(tmp_path))[-1]["loss"] is None  # strict JSON
    m = Metrics(str(tmp_path), enabled=True, resume_step=3, tensorboard=False)
    m.write({"step": 4, "loss": 40.0})
    m.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    Metrics(str(tmp_path), enabled=True, resume_step=None, tensorboard=False).close()  # a fresh start: all dropped
    assert read_metrics(str(tmp_path)) == []
