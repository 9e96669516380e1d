"""Bad input on every configuration path of ``fira-dist pretrain``, table-driven (issue 8).

Each case gives one bad value on one path and the message it must produce: the trainer exits 2 (EXIT_USAGE)
before anything is started, and its error names the key, the value and what is accepted. Paths:

- ``cli``: command-line flags (ranges, choices, combinations, ``--resume`` folders, ``--output-dir``);
- ``ds``: the ``--deepspeed`` ds_config, its ``optimizer`` "fira" block (``fira_dist.deepspeed``) and the rest;
- ``model``: a ``--model`` config.json;
- ``data``: ``--data`` / ``--eval-data`` globs, folders and files, ``--dataset``, ``--tokenizer``;
- ``resume``: a checkpoint that this run cannot continue (another optimizer, model, strategy, sequence length);
- ``env``: the launch environment (``RANK``, ``WORLD_SIZE``, ``MASTER_*``, Slurm and MPI variables);
- ``script``: the variables of the ``launch/`` scripts (they exit 2 before starting anything).

All in-process (``fira_dist.pretrain.main.main`` with ``--dry-run`` where the case allows) or ``bash`` on a
launch script that stops at its checks: a few seconds in all. ``test_bad_trainer_flag_through_launch_script``
starts torchrun and one trainer (slow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fira_dist.pretrain.main import main
from fira_dist.pretrain.train_utils import EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
               "SLURM_JOB_ID", "SLURM_NODELIST", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
               "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
               "PMIX_RANK")
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 256}


@dataclasses.dataclass
class Case:
    kind: str  # cli | ds | model | data | resume | env | script
    name: str
    value: Any  # argv, a ds_config / model config / manifest, env variables, (script, env)
    expected: tuple[str, ...]  # substrings of the error message
    argv: tuple[str, ...] = ()  # more flags
    dry_run: bool = True


def cli(name, argv, *expected, dry_run=True):
    return Case("cli", name, list(argv), expected, dry_run=dry_run)


def ds(name, cfg, *expected, argv=()):
    return Case("ds", name, cfg, expected, tuple(argv))


def model(name, cfg, *expected, argv=()):
    return Case("model", name, cfg, expected, tuple(argv))


def data(name, argv, *expected):
    return Case("data", name, list(argv), expected)


def resume(name, manifest, *expected):
    return Case("resume", name, manifest, expected)


def env(name, variables, *expected, argv=("--strategy", "ddp")):
    return Case("env", name, variables, expected, tuple(argv))


def script(name, script_name, variables, *expected):
    return Case("script", name, (script_name, variables), expected)


def fira(**params):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 2}, "optimizer": {"type": "fira", "params": params}}


MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SLURM = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "GPUS_PER_NODE": "1"}
HOSTS = {"HOSTFILE": "launch/hostfile.example"}

CASES = [
    # ------------------------------------------------------------------------------------------- CLI flags
    cli("keep-last", ["--keep-last", "-1"], "--keep-last=-1 is not accepted; expected an integer >= 0"),
    cli("save-every", ["--save-every", "-5"], "--save-every=-5 is not accepted; expected an integer >= 0"),
    cli("eval-batches", ["--eval-batches", "-1"], "--eval-batches=-1", ">= 0"),
    cli("log-every", ["--log-every", "0"], "--log-every=0 is not accepted; expected an integer >= 1"),
    cli("seed", ["--seed", "-1"], "--seed=-1", ">= 0"),
    cli("max-steps", ["--max-steps", "0"], "--max-steps=0", ">= 1"),
    cli("update-proj-gap", ["--update-proj-gap", "0"], "--update-proj-gap=0", ">= 1"),
    cli("seq-len", ["--seq-len", "1"], "--seq-len=1", ">= 2"),
    cli("seq-len-too-long", ["--seq-len", "4096"], "--seq-len=4096", "max_position_embeddings"),
    cli("max-documents", ["--max-documents", "0"], "--max-documents=0", ">= 1"),
    cli("max-bad-steps", ["--max-bad-steps", "0"], "--max-bad-steps=0 is not accepted; expected an integer >= 1"),
    cli("dist-timeout", ["--dist-timeout", "-5"], "--dist-timeout=-5.0 is not accepted; expected a finite number > 0"),
    cli("dist-timeout-inf", ["--dist-timeout", "inf"], "--dist-timeout=inf", "finite"),
    cli("lr-nan", ["--lr", "nan"], "--lr=nan is not accepted; expected a finite number > 0"),
    cli("alpha", ["--alpha", "0"], "--alpha=0.0", "> 0"),
    cli("weight-decay", ["--weight-decay", "-0.1"], "--weight-decay=-0.1", ">= 0"),
    cli("grad-clip", ["--grad-clip", "inf"], "--grad-clip=inf", "a finite number >= 0"),
    cli("min-lr-ratio", ["--min-lr-ratio", "1.5"], "--min-lr-ratio=1.5 is not accepted; expected a number in [0, 1]"),
    cli("val-fraction", ["--val-fraction", "1"], "--val-fraction=1.0", "[0, 1)"),
    cli("warmup", ["--max-steps", "10", "--warmup-steps", "11"], "--warmup-steps=11", "[0, --max-steps=10]"),
    cli("int-type", ["--micro-batch-size", "two"], "--micro-batch-size", "invalid int value: 'two'"),
    cli("choice-strategy", ["--strategy", "zero2"], "--strategy", "invalid choice: 'zero2'", "fsdp2"),
    cli("choice-optimizer", ["--optimizer", "sgd"], "--optimizer", "'sgd'", "galore"),
    cli("choice-attn", ["--attn-implementation", "flash"], "--attn-implementation", "'flash'", "sdpa"),
    cli("choice-device", ["--device", "tpu"], "--device", "'tpu'", "cuda"),
    cli("unknown-flag", ["--learning-rate", "1e-3"], "unrecognized arguments: --learning-rate"),
    cli("batch-pair", ["--grad-accum", "2", "--total-batch-size", "16"], "--total-batch-size=16", "--grad-accum=2",
        "not accepted together"),
    cli("total-batch", ["--total-batch-size", "12", "--micro-batch-size", "8"], "--total-batch-size=12",
        "multiple of --micro-batch-size x world size = 8 x 1"),
    cli("target-modules-empty", ["--target-modules", ","], "--target-modules=','", "module-name substrings"),
    cli("target-modules-nomatch", ["--target-modules", "conv"], "--target-modules='conv' matched no nn.Linear",
        "self_attn"),
    cli("inject-nan-at", ["--inject-nan-at", "3,x"], "--inject-nan-at='3,x' is not accepted",
        "comma-separated step numbers"),
    cli("deepspeed-without-path", ["--strategy", "deepspeed"], "--strategy=deepspeed needs --deepspeed PATH"),
    cli("deepspeed-wrong-strategy", ["--strategy", "fsdp2", "--deepspeed", "x.json"], "--deepspeed='x.json'",
        "only accepted with --strategy deepspeed"),
    cli("init-not-fsdp2", ["--init", "meta"], "--init='meta' is only accepted with --strategy fsdp2"),
    cli("dry-run-world-size", ["--dry-run-world-size", "0"], "--dry-run-world-size=0", ">= 1"),
    cli("dry-run-world-size-alone", ["--dry-run-world-size", "8"], "--dry-run-world-size is only accepted with "
        "--dry-run", dry_run=False),
    cli("resume-missing", ["--resume", "{tmp}/no/such/ckpt"], "--resume=", "/no/such/ckpt",
        "expected auto, none or an existing checkpoint folder"),
    cli("resume-empty-folder", ["--resume", "{tmp}"], "no complete checkpoint there",
        "a checkpoint folder with manifest.json"),
    cli("output-dir-under-file", ["--output-dir", "{tmp}/file.txt/run"], "--output-dir=", "cannot be created",
        dry_run=False),
    cli("momentum-reset-interval", ["--momentum-reset-interval", "0"], "--momentum-reset-interval=0 is not accepted; "
        "expected an integer >= 1"),
    cli("recovery-steps", ["--momentum-reset-interval", "50", "--recovery-steps", "-1"],
        "--recovery-steps=-1 is not accepted; expected an integer >= 0"),
    cli("recovery-steps-alone", ["--recovery-steps", "5"], "--recovery-steps=5 is only accepted with "
        "--momentum-reset-interval K"),
    cli("recovery-steps-too-long", ["--momentum-reset-interval", "5", "--recovery-steps", "5"],
        "--recovery-steps=5 is not accepted; expected an integer in [0, --momentum-reset-interval - 1 = 4]"),
    cli("lowrank-rank", ["--optimizer", "lowrank", "--rank", "65"], "--rank=65", "with --optimizer lowrank",
        "rank=65 is not accepted for model.layers.0.self_attn.q_proj.weight (64 x 64); expected an integer in [1, 64]"),
    # ------------------------------------------------------------------------------------------- ds_config
    ds("fira-unknown-key", fira(gamma=1.01), "has unknown key 'gamma'", "did you mean 'limiter_gamma'",
       "accepted keys"),
    ds("fira-auto", fira(rank="auto"), "optimizer.params['rank']='auto' is not accepted here", "give a value"),
    ds("fira-rank", fira(rank=0), "optimizer.params['rank']=0 is not accepted; expected an integer >= 1"),
    ds("fira-update-proj-gap", fira(update_proj_gap=0), "['update_proj_gap']=0 is not accepted", ">= 1"),
    ds("fira-lr", fira(lr=-1), "optimizer.params['lr']=-1 is not accepted", "[0.0, inf]"),
    ds("fira-eps", fira(eps=-1e-8), "['eps']=-1e-08 is not accepted"),
    ds("fira-betas", fira(betas=[0.9]), "['betas']=[0.9] is not accepted; expected a pair [beta1, beta2]"),
    ds("fira-gamma", fira(limiter_gamma=0.5), "['limiter_gamma']=0.5 is not accepted", "(1.0, inf]"),
    ds("fira-gamma-bool", fira(limiter_gamma=True), "['limiter_gamma']=True is not accepted", "or null"),
    ds("fira-proj-type", fira(proj_type="diag"), "['proj_type']='diag' is not accepted", "'std'", "'right'"),
    ds("fira-algorithm", fira(algorithm="sgd"), "['algorithm']='sgd' is not accepted", "'fira', 'galore'"),
    ds("fira-galore-limiter", fira(algorithm="galore", limiter_gamma=1.01), "['limiter_gamma']=1.01 is only used "
       "by algorithm 'fira'"),
    ds("fira-scale-and-alpha", fira(scale=0.5, alpha=0.25), "sets both 'alpha'=0.25 and 'scale'=0.5"),
    ds("fira-correct-bias", fira(correct_bias="yes"), "['correct_bias']='yes' is not accepted; expected true or false"),
    ds("fira-target-modules-str", fira(target_modules="attn"), "['target_modules']='attn' is not accepted",
       "non-empty list"),
    ds("fira-target-modules-nomatch", fira(target_modules=["conv"]), "matched no nn.Linear", "conv"),
    ds("fira-reset-interval", fira(momentum_reset_interval=0), "optimizer.params['momentum_reset_interval']=0 is not "
       "accepted; expected an integer >= 1"),
    ds("fira-recovery-steps", fira(momentum_reset_interval=100, recovery_steps=100),
       "optimizer.params['recovery_steps']=100 is not accepted with", "expected an integer in [0, 99]"),
    ds("lowrank-fira-rank", fira(rank=8), "optimizer.params.rank=8 is not accepted with --optimizer lowrank; "
       "expected null", argv=("--optimizer", "lowrank")),
    ds("reset-adamw-block", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "optimizer.type='AdamW' is "
       "not accepted with --momentum-reset-interval=10", "\"rank\": null", argv=("--momentum-reset-interval", "10")),
    ds("fira-params-not-object", {"optimizer": {"type": "fira", "params": [1]}},
       "optimizer.params must be a JSON object"),
    ds("optimizer-no-type", {"optimizer": {"params": {}}}, "optimizer must be an object with a \"type\""),
    ds("optimizer-type", {"optimizer": {"type": "Lamb"}}, "optimizer.type='Lamb' is not accepted", "\"fira\""),
    ds("zero-stage", {**fira(), "zero_optimization": {"stage": 5}}, "zero_optimization.stage=5 is not accepted",
       "0, 1, 2 or 3"),
    ds("zero-not-object", {**fira(), "zero_optimization": [2]}, "zero_optimization must be a JSON object"),
    ds("zero-offload", {**fira(), "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
       "offload_optimizer device='cpu' is not supported with the 'fira' optimizer", "expected 'none'"),
    ds("gradient-clipping", {**fira(), "gradient_clipping": "one"}, "gradient_clipping='one' is not accepted",
       ">= 0"),
    ds("micro-batch", {**fira(), "train_micro_batch_size_per_gpu": "four"},
       "train_micro_batch_size_per_gpu='four' is not accepted; expected an integer >= 1 or \"auto\""),
    ds("train-batch", {**fira(), "train_batch_size": 7}, "train_batch_size=7 is not a multiple of micro-batch x "
       "world size = 8 x 1"),
    ds("batch-conflict", {**fira(), "train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4 "
       "disagrees with --micro-batch-size=2", argv=("--micro-batch-size", "2")),
    ds("fp16-on-cpu", {**fira(), "fp16": {"enabled": True}}, "fp16.enabled=true is not accepted on CPU"),
    ds("not-an-object", [1, 2], "is not accepted: expected a JSON object, got list"),
    ds("not-json", "{\"zero_optimization\": ", "cannot read it as JSON"),
    ds("missing-file", None, "is not accepted: no such file; expected a ds_config JSON file"),
    # ------------------------------------------------------------------------------------------- model config
    model("not-json", "{hidden_size: 64", "--model=", "is not accepted", "Expecting property name"),
    model("not-an-object", [TINY], "--model=", "expected a JSON object"),
    model("model-type", {**TINY, "model_type": "bert"}, "model_type 'bert' is not 'llama'"),
    model("heads", {**TINY, "num_attention_heads": 5}, "--model=", "hidden size (64) is not a multiple of the "
          "number of attention heads (5)"),
    model("type", {**TINY, "hidden_size": "big"}, "--model=", "hidden_size", "'big'"),
    model("no-config-in-folder", "<dir>", "--model=", "does not exist", "llama_60m"),
    model("max-positions", {**TINY, "max_position_embeddings": 16}, "--seq-len=32", "[2, 16]",
          argv=("--seq-len", "32")),
    # ------------------------------------------------------------------------------------------- data
    data("glob-no-match", ["--data", "{tmp}/none/*.jsonl"], "--data=", "matched no files", ".parquet"),
    data("missing-path", ["--data", "{tmp}/corpus.jsonl.gz"], "data path", "does not exist"),
    data("file-type", ["--data", "{tmp}/docs.xml"], "--data=", "unsupported type '.xml'", ".jsonl"),
    data("empty-folder", ["--data", "{tmp}/empty"], "holds no supported files"),
    data("mixed-types", ["--data", "{tmp}/mixed"], "mixes file types (json, text)"),
    data("eval-glob", ["--data", "{tmp}/a.jsonl", "--eval-data", "{tmp}/val/*.jsonl"], "--eval-data=",
         "matched no files"),
    data("eval-without-data", ["--eval-data", "{tmp}/a.jsonl"], "--eval-data=", "only accepted with --data"),
    data("data-and-dataset", ["--data", "{tmp}/a.jsonl", "--dataset", "allenai/c4"], "not accepted together"),
    data("no-eval-split", ["--data", "{tmp}/a.jsonl", "--val-fraction", "0"], "--val-fraction=0",
         "leaves nothing to evaluate"),
    data("dataset-folder", ["--dataset", "{tmp}/no/such/saved"], "--dataset=", "no such folder"),
    data("tokenizer", ["--tokenizer", "{tmp}/no-tokenizer"], "--tokenizer=", "could not be loaded"),
    # ------------------------------------------------------------------------------------------- resume
    resume("optimizer", {"optimizer": "adamw"}, "holds --optimizer adamw state, this run uses --optimizer fira"),
    resume("model", {"model": {"config": {"hidden_size": 128}}}, "has hidden_size=128, --model gives 64"),
    resume("strategy", {"strategy": "deepspeed"}, "written by --strategy deepspeed and cannot be loaded by "
           "--strategy single"),
    resume("seq-len", {"seq_len": 64}, "trained with --seq-len 64, this run has 32"),
    resume("incomplete", {"complete": False}, "does not mark a complete format-1 checkpoint"),
    resume("truncated", {"files": {"dcp/__0_0.distcp": 999}}, "lacks dcp/__0_0.distcp"),
    # ------------------------------------------------------------------------------------------- launch environment
    env("rank-not-int", {"RANK": "x", "WORLD_SIZE": "2", **MASTER}, "launch environment",
        "environment variable RANK='x' is not an integer"),
    env("rank-out-of-range", {"RANK": "2", "WORLD_SIZE": "2", **MASTER}, "gives rank 2 and world size 2",
        "need 0 <= rank < world size"),
    env("world-zero", {"RANK": "0", "WORLD_SIZE": "0", **MASTER}, "world size 0"),
    env("no-master", {"RANK": "0", "WORLD_SIZE": "2"}, "no MASTER_ADDR/MASTER_PORT"),
    env("master-port-not-int", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"},
        "MASTER_PORT='http' is not an integer"),
    env("master-port-range", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
        "MASTER_PORT=70000 is not accepted", "1-65535"),
    env("local-rank", {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "a", **MASTER}, "LOCAL_RANK='a'"),
    env("local-rank-negative", {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1", **MASTER},
        "gives local rank -1", "expected an integer >= 0"),
    env("local-world-size", {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "x", **MASTER},
        "LOCAL_WORLD_SIZE='x'"),
    env("slurm-ntasks", {"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
    env("slurm-procid", {"SLURM_PROCID": "5", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1"}, "(slurm) gives rank 5"),
    env("slurm-job-id", {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1", "SLURM_JOB_ID": "abc"},
        "SLURM_JOB_ID='abc' is not an integer"),
    env("mpi-size", {"PMI_RANK": "0", "PMI_SIZE": "x", **MASTER}, "PMI_SIZE='x' is not an integer"),
    env("single-with-two", {"RANK": "0", "WORLD_SIZE": "2", **MASTER}, "--strategy=single is not accepted with 2 "
        "processes", argv=("--strategy", "single")),
    # ------------------------------------------------------------------------------------------- launch scripts
    script("torchrun-gpus", "torchrun_single_node.sh", {"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 is not accepted"),
    script("torchrun-model-file", "torchrun_single_node.sh", {"MODEL": "configs/none.json"},
           "MODEL=configs/none.json: no such config file"),
    script("torchrun-shutdown", "torchrun_single_node.sh", {"STRATEGY": "ddp", "SHUTDOWN_TIMEOUT": "soon"},
           "SHUTDOWN_TIMEOUT=soon is not accepted: expected seconds"),
    script("torchrun-python", "torchrun_single_node.sh", {"STRATEGY": "ddp", "PYTHON": "no-such-python"},
           "PYTHON=no-such-python not found"),
    script("deepspeed-hostfile-line", "deepspeed_multinode.sh", {"HOSTFILE": "{tmp}/hosts"}, "has no slots=<N>"),
    script("deepspeed-nodes", "deepspeed_multinode.sh", {**HOSTS, "NODES": "0"}, "NODES=0 is not accepted"),
    script("deepspeed-no-ssh", "deepspeed_multinode.sh", {**HOSTS, "NO_SSH": "2"}, "NO_SSH=2 is not accepted"),
    script("deepspeed-master-port", "deepspeed_multinode.sh", {**HOSTS, "MASTER_PORT": "http"},
           "MASTER_PORT=http is not accepted"),
    script("mpirun-gpus", "mpirun.sh", {"GPUS_PER_NODE": "-1"}, "GPUS_PER_NODE=-1 is not accepted"),
    script("mpirun-hostfile", "mpirun.sh", {"HOSTFILE": "/no/such/hosts"}, "HOSTFILE=/no/such/hosts: no such file"),
    script("mpirun-single", "mpirun.sh", {"STRATEGY": "single", "GPUS_PER_NODE": "2"},
           "STRATEGY=single runs one process"),
    script("slurm-torchrun-rdzv-port", "slurm_torchrun.sbatch", {**SLURM, "RDZV_PORT": "x"},
           "RDZV_PORT=x is not accepted"),
    script("slurm-torchrun-requeue", "slurm_torchrun.sbatch", {**SLURM, "REQUEUE": "yes"},
           "REQUEUE=yes is not accepted: expected 0 or 1"),
    script("slurm-torchrun-shutdown", "slurm_torchrun.sbatch", {**SLURM, "SHUTDOWN_TIMEOUT": "1m"},
           "SHUTDOWN_TIMEOUT=1m is not accepted"),
    script("slurm-torchrun-zero", "slurm_torchrun.sbatch", {**SLURM, "ZERO_STAGE": "7"},
           "ZERO_STAGE=7 is not accepted"),
    script("slurm-mpi-plugin", "slurm_mpi.sbatch", {**SLURM, "SRUN_MPI": "pmi 2"}, "SRUN_MPI=pmi 2 is not accepted"),
    script("slurm-mpi-master-port", "slurm_mpi.sbatch", {**SLURM, "MASTER_PORT": "x"},
           "MASTER_PORT=x is not accepted"),
    script("slurm-mpi-nodes", "slurm_mpi.sbatch", {**SLURM, "NODES": "zero"}, "NODES=zero is not accepted"),
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _files(tmp: Path) -> None:
    """What the data and script cases point at."""
    (tmp / "a.jsonl").write_text('{"text": "one document"}\n')
    (tmp / "docs.xml").write_text("<doc/>")
    (tmp / "empty").mkdir()
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp / "mixed" / "b.txt").write_text("x\n")
    (tmp / "file.txt").write_text("x")
    (tmp / "hosts").write_text("node1 slots=8\nnode2\n")


def _fake_checkpoint(tmp: Path, over: dict) -> Path:
    """A checkpoint folder whose manifest says what a fira / single / llama_tiny / seq-len 32 run writes, with
    ``over`` changed."""
    from fira_dist.pretrain import checkpoint as C
    from fira_dist.pretrain import data as DATA
    from fira_dist import models as M

    cfg = M.get_model_config("llama_tiny", tokenizer=DATA.load_tokenizer(None)).to_dict()
    folder = tmp / "ckpt"
    folder.mkdir()
    m = {"format": C.FORMAT, "complete": True, "step": 4, "world_size": 1, "strategy": "single", "zero_stage": None,
         "optimizer": "fira", "seq_len": 32, "model": {"name": "llama_tiny", "config": cfg}, "files": {}}
    for key, value in over.items():
        if key == "model":
            m["model"]["config"].update(value["config"])
        else:
            m[key] = value
    (folder / C.MANIFEST).write_text(json.dumps(m))
    return folder


def _script_env(variables: dict[str, str], tmp: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.update({k: v.replace("{tmp}", str(tmp)) for k, v in variables.items()})
    return e


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}-{c.name}" for c in CASES])
def test_bad_input_is_named(case: Case, tmp_path, monkeypatch, capsys):
    _files(tmp_path)
    sub = lambda xs: [str(x).replace("{tmp}", str(tmp_path)) for x in xs]  # noqa: E731
    if case.kind == "script":
        name, variables = case.value
        p = subprocess.run(["bash", str(REPO / "launch" / name)], cwd=REPO, env=_script_env(variables, tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        assert p.returncode == EXIT_USAGE, p.stdout
        for piece in case.expected:
            assert piece in p.stdout, (piece, p.stdout)
        return
    argv: list[str] = []
    if case.kind == "cli" or case.kind == "data":
        argv = sub(case.value)
    elif case.kind == "ds":
        path = tmp_path / "ds.json"
        if case.value is not None:
            path.write_text(case.value if isinstance(case.value, str) else json.dumps(case.value))
        argv = ["--strategy", "deepspeed", "--deepspeed", str(path)]
    elif case.kind == "model":
        if case.value == "<dir>":
            path = tmp_path / "empty"
        else:
            path = tmp_path / "config.json"
            path.write_text(case.value if isinstance(case.value, str) else json.dumps(case.value))
        argv = ["--model", str(path)]
    elif case.kind == "resume":
        argv = ["--resume", str(_fake_checkpoint(tmp_path, case.value)), "--seq-len", "32"]
    elif case.kind == "env":
        for key, value in case.value.items():
            monkeypatch.setenv(key, value)
    argv += list(case.argv)
    if "--model" not in argv:
        argv += ["--model", "llama_tiny"]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
    if case.dry_run:
        argv.append("--dry-run")
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == EXIT_USAGE, (argv, out.out[-2000:], out.err[-4000:])
    lines = [ln for ln in out.err.splitlines() if ln.startswith("fira-dist pretrain: error:")]
    assert len(lines) == 1, out.err[-4000:]  # one message, no traceback
    assert "Traceback" not in out.err
    for piece in case.expected:
        assert piece in out.err, (piece, out.err[-3000:])


def test_every_path_is_in_the_table():
    kinds = {c.kind for c in CASES}
    assert kinds == {"cli", "ds", "model", "data", "resume", "env", "script"}
    scripts = {c.value[0] for c in CASES if c.kind == "script"}
    assert scripts == {p.name for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch")}
    names = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(names) == len(set(names))


def test_usage_error_is_recorded_in_exit_status(tmp_path, capsys):
    """torchrun reports 1 for a failed worker: the launch scripts read the trainers' code from exit_status.json,
    so a bad flag must leave its 2 there (with the message)."""
    out_dir = tmp_path / "run"
    rc = main(["--model", "llama_tiny", "--lr", "-1", "--output-dir", str(out_dir)])
    assert rc == EXIT_USAGE
    st = json.loads((out_dir / "exit_status.json").read_text())
    assert st["exit_code"] == EXIT_USAGE and "--lr=-1.0 is not accepted" in st["reason"]
    # a dry run writes nothing
    rc = main(["--model", "llama_tiny", "--lr", "-1", "--output-dir", str(tmp_path / "dry"), "--dry-run"])
    assert rc == EXIT_USAGE and not (tmp_path / "dry").exists()
    capsys.readouterr()


@pytest.mark.slow
def test_bad_trainer_flag_through_launch_script(tmp_path):
    """A bad trainer flag given to a launch script: the script exits 2 (not torchrun's 1) with the message."""
    e = _script_env({"STRATEGY": "single", "GPUS_PER_NODE": "1", "MODEL": "llama_tiny",
                     "OUTPUT_DIR": str(tmp_path / "run"), "EXTRA_ARGS": "--lr -1"}, tmp_path)
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    p = subprocess.run(["bash", str(REPO / "launch" / "torchrun_single_node.sh")], cwd=REPO, env=e,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == EXIT_USAGE, p.stdout[-4000:]
    assert "--lr=-1.0 is not accepted; expected a finite number > 0" in p.stdout
    assert "the trainers exited 2" in p.stdout
