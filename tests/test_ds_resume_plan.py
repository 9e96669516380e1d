"""What ``fira-dist pretrain --resume`` decides for a DeepSpeed checkpoint written at another world size or ZeRO stage,
before anything starts (``fira_dist.pretrain.plan._check_resume_compat`` on a checkpoint's manifest): a Fira run's
ZeRO-1/2/3 checkpoint is resharded (a note says how), ZeRO-0 loads at any world size, and anything else is refused
naming both sides. The resharding itself: tests/test_deepspeed.py and tests/test_pretrain_dist.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fira_dist import models as M
from fira_dist.pretrain import checkpoint as C
from fira_dist.pretrain import data as DATA
from fira_dist.pretrain.plan import UsageError, _check_resume_compat

FIRA = {"optimizer": {"type": "fira", "params": {"rank": 8}}}
ADAMW = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


@pytest.fixture(scope="module")
def config():
    return M.get_model_config("llama_tiny", tokenizer=DATA.load_tokenizer(None))


def _checkpoint(tmp: Path, world: int, stage: int, optimizer: str = "fira") -> Path:
    folder = tmp / f"w{world}_z{stage}" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / C.MANIFEST).write_text(json.dumps({
        "format": C.FORMAT, "complete": True, "step": 4, "world_size": world, "strategy": "deepspeed",
        "zero_stage": stage, "optimizer": optimizer, "seq_len": 32, "files": {}, "data": [{"kind": "map"}]}))
    return folder


def _check(path, config, world, stage, ds_config, optimizer="fira"):
    return _check_resume_compat(path, "deepspeed", optimizer, config, world, 32, "auto", stage, ds_config)


@pytest.mark.parametrize("saved,now", [((2, 2), (1, 2)), ((1, 2), (2, 3)), ((8, 3), (8, 1))])
def test_fira_checkpoint_at_another_size_or_stage_is_resharded(tmp_path, config, saved, now):
    note = _check(_checkpoint(tmp_path, *saved), config, *now, FIRA)
    assert note is not None
    assert f"written by {saved[0]} ranks under ZeRO-{saved[1]}, this job has {now[0]} under ZeRO-{now[1]}" in note
    assert "resharded through a universal checkpoint" in note and "step_00000004/deepspeed_universal" in note


def test_same_size_and_stage_needs_no_note_and_zero0_loads_anywhere(tmp_path, config):
    path = _checkpoint(tmp_path, 2, 2)
    assert _check(path, config, 2, 2, FIRA) is None
    path = _checkpoint(tmp_path, 4, 0, "adamw")
    assert "ZeRO-0 checkpoint holds the whole optimizer state" in _check(path, config, 2, 0, ADAMW, "adamw")


@pytest.mark.parametrize("saved,now,ds_config,optimizer,why", [
    ((2, 2), (1, 2), ADAMW, "adamw", "for the \"fira\" optimizer only"),  # DeepSpeed's own Adam
    ((2, 0), (2, 2), FIRA, "fira", "ZeRO-0 checkpoints load at any world size under ZeRO-0"),
    ((2, 2), (2, 0), FIRA, "fira", "reshards it between ZeRO stages 1-3"),
])
def test_what_cannot_be_resharded_is_refused(tmp_path, config, saved, now, ds_config, optimizer, why):
    with pytest.raises(UsageError) as err:
        _check(_checkpoint(tmp_path, *saved, optimizer), config, *now, ds_config, optimizer)
    msg = str(err.value)
    assert f"written by {saved[0]} ranks under ZeRO-{saved[1]}, this job has {now[0]} under ZeRO-{now[1]}" in msg
    assert why in msg and f"Expected {saved[0]} ranks under ZeRO-{saved[1]}" in msg
