"""No deprecation warning from fira_dist's own code in `fira-dist demo` or a short `fira-dist pretrain` run.

The runs are real launches with ``tests/own_warnings.py`` installed in every process through a
``sitecustomize.py`` on ``PYTHONPATH``: a deprecation warning (Deprecation-, PendingDeprecation-, FutureWarning)
whose emitter or direct caller is fira_dist raises there, as ``-W error`` would; one caused by DeepSpeed or
transformers (DeepSpeed 0.19 itself calls torch 2.13's deprecated ``all_gather_into_tensor`` and
``torch.jit.script_method``) is only logged, so the test does not depend on third-party hygiene. The log must
also hold no warning of any category attributed to fira_dist.

The strategies cover every collective fira_dist issues: the demo (DeepSpeed ZeRO-2), FSDP2 (``row_sharded``:
all-gather and reduce-scatter), DDP (``replicated``: all-gather), one process (dcp checkpoint save and resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

import own_warnings
from distributed_utils import REPO_ROOT, torchrun_command, worker_env

TOY = ["--model", "llama_tiny", "--seq-len", "32", "--max-documents", "100", "--eval-batches", "1",
       "--log-every", "1", "--rank", "8", "--update-proj-gap", "2", "--eval-every", "2", "--no-tensorboard"]


# ------------------------------------------------------------------------------- the attribution itself
def _frame(filename: str, lineno: int = 1) -> traceback.FrameSummary:
    return traceback.FrameSummary(filename, lineno, "f", lookup_line=False)


SP = "/venv/lib/python3.11/site-packages"


@pytest.mark.parametrize("stack, ours", [
    # fira_dist/comm.py -> torch's c10d_logger wrapper -> typing_extensions' deprecated wrapper: ours
    ([f"{SP}/fira_dist/pretrain/main.py", "/repo/fira_dist/comm.py", f"{SP}/torch/distributed/c10d_logger.py",
      f"{SP}/typing_extensions.py"], True),
    # the same torch collective called by DeepSpeed, itself called from our training loop: DeepSpeed's
    (["/repo/fira_dist/pretrain/main.py", f"{SP}/deepspeed/runtime/engine.py", f"{SP}/deepspeed/comm/torch.py",
      f"{SP}/torch/distributed/c10d_logger.py", f"{SP}/typing_extensions.py"], False),
    # a transformers warning about an argument fira_dist passed: ours
    (["/repo/fira_dist/models.py", f"{SP}/transformers/modeling_utils.py",
      f"{SP}/transformers/utils/import_utils.py"], True),
    # fira_dist's own warnings.warn: ours
    (["/repo/fira_dist/optimizer.py", "/usr/lib/python3.11/warnings.py"], True),
    # torch warning while DeepSpeed imports a module: DeepSpeed's
    (["/repo/fira_dist/deepspeed.py", "<frozen importlib._bootstrap>", f"{SP}/deepspeed/runtime/zero/muon/x.py",
      f"{SP}/torch/jit/_script.py"], False),
])
def test_attribution_names_the_caller_of_the_library_that_warned(stack, ours):
    emitter, caller = own_warnings.culprit([_frame(f) for f in stack])
    assert own_warnings.is_ours(emitter, caller, stack[-1]) is ours, (emitter, caller)


def _call_from(filename: str) -> None:
    """Call the deprecated torch collective from code whose file name is ``filename`` (no process group: the call
    itself fails after the warning, which is all this needs)."""
    code = compile("import torch\ntorch.distributed.all_gather_into_tensor(torch.zeros(2), torch.zeros(1))\n",
                   filename, "exec")
    exec(code, {})


def test_strict_hook_raises_for_fira_dist_only(tmp_path):
    log = tmp_path / "w.jsonl"
    with warnings.catch_warnings():
        own_warnings.install(str(log), strict=True)
        with pytest.raises(FutureWarning, match="all_gather_into_tensor.*fira_dist's own deprecated call"):
            _call_from(str(REPO_ROOT / "fira_dist" / "fake_module.py"))
        with pytest.raises(Exception) as err:  # DeepSpeed's call: the warning is shown, the call goes on and fails
            _call_from(f"{SP}/deepspeed/comm/torch.py")
        assert not isinstance(err.value, Warning), err.value
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["ours"] for r in recs] == [True, False], recs
    assert recs[1]["caller"].startswith("deepspeed ")


# ------------------------------------------------------------------------------- the real runs
@pytest.fixture
def strict_env(tmp_path):
    """Environment for a launch with the hook in strict mode; returns (env, log path)."""
    site = own_warnings.write_sitecustomize(tmp_path / "site")
    log = tmp_path / "warnings.jsonl"
    env = worker_env({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                      "FIRA_DIST_NO_TQDM": "1", "TOKENIZERS_PARALLELISM": "false",
                      "FIRA_WARNINGS_STRICT": "1", "FIRA_WARNINGS_LOG": str(log)})
    env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
    return env, log


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-8000:]}"
    return proc.stdout


def _check_log(log: Path) -> list[dict]:
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    ours = [r for r in recs if r["ours"]]
    assert not ours, "warnings caused by fira_dist:\n" + "\n".join(json.dumps(r) for r in ours)
    return recs


@pytest.mark.slow
def test_demo_shows_no_warning_of_ours(strict_env, tmp_path):
    env, log = strict_env
    out = _run([sys.executable, "-m", "fira_dist.cli", "demo", "--steps", "2", "--model", "llama_tiny",
                "--seq-len", "32", "--micro-batch-size", "2", "--output-dir", str(tmp_path / "demo"), "--",
                "--max-documents", "100"], env)
    assert "fira-dist demo: done in" in out
    recs = _check_log(log)
    assert any(r["caller"].startswith("deepspeed ") for r in recs), "the hook saw none of DeepSpeed's warnings"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_process_pretrain_shows_no_warning_of_ours(strict_env, tmp_path, strategy):
    env, log = strict_env
    args = [*TOY, "--strategy", strategy, "--max-steps", "3", "--save-every", "3", "--output-dir",
            str(tmp_path / strategy)]
    _run(torchrun_command("fira_dist.pretrain", 2, args, module=True), env)
    _check_log(log)


@pytest.mark.slow
def test_one_process_pretrain_and_resume_show_no_warning_of_ours(strict_env, tmp_path):
    env, log = strict_env
    args = [*TOY, "--output-dir", str(tmp_path / "single"), "--save-every", "2"]
    _run([sys.executable, "-m", "fira_dist.pretrain", *args, "--max-steps", "2"], env)
    out = _run([sys.executable, "-m", "fira_dist.pretrain", *args, "--max-steps", "3"], env)
    assert "resumed from" in out
    _check_log(log)
