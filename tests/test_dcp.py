"""torch.distributed.checkpoint with the distributed layouts: save at W=3, resume at W=3 bit-exactly, load at
W=2 (both layouts, from either layout's checkpoint) and train on.

Model and optimizer state go through get_/set_model_state_dict and get_/set_optimizer_state_dict(
flatten_optimizer_state_dict=True) + dcp.save / dcp.load (tests/dist_workers/ddp_fsdp_dcp.py): train 12
steps, save, train 10 more (a projector refresh at step 20 included). The W=2 runs must match the
uninterrupted W=3 run within rtol 1e-4 (both match one process to that tolerance; see test_fsdp2.py).
"""

from __future__ import annotations

import pytest
import torch

from dist_workers.ddp_fsdp_common import assert_matches
from dist_workers.ddp_fsdp_launch import launch

pytestmark = pytest.mark.slow

LAYOUTS = ("replicated", "row_sharded")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    saved = {}
    for layout in LAYOUTS:
        ckpt = str(root / layout)
        saved[layout] = (ckpt, launch("ddp_fsdp_dcp.py", 3, "save", "--ckpt", ckpt, "--layout", layout))
    sources = [f"--from={saved[src][0]}:{dst}" for src in LAYOUTS for dst in LAYOUTS]
    loaded = launch("ddp_fsdp_dcp.py", 2, "load", *sources)
    return saved, loaded


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_at_the_same_world_size_is_bit_exact(checkpoints, layout):
    """A fresh model and optimizer loaded from the step-12 checkpoint continue exactly as the run that saved it."""
    _, run = checkpoints[0][layout]
    assert_matches(run, run["resumed"], bitwise=True, what=f"{layout} W=3 resume")
    keys = run["resumed"]["state_keys"]
    assert all(k == keys[0] for k in keys), "every rank must have the same state keys"


@pytest.mark.parametrize("src", LAYOUTS)
@pytest.mark.parametrize("dst", LAYOUTS)
def test_load_a_3_rank_checkpoint_at_2_ranks(checkpoints, src, dst):
    """Saved by `src` at W=3, loaded by `dst` at W=2 (owners and shards all change), training goes on."""
    saved, loaded = checkpoints
    ckpt, run = saved[src]
    got = loaded[f"{ckpt}:{dst}"]
    worst = assert_matches(run, got, bitwise=False, what=f"{src} W=3 -> {dst} W=2")
    print(f"{src} W=3 -> {dst} W=2: {worst}")
    assert got["losses"][-1] < got["losses"][0] + 0.1  # still training, not diverged
    keys = got["state_keys"]
    assert all(k == keys[0] for k in keys)
    assert any(k[0] == "lm_head.weight" and "projector" in k[1] for k in keys[0])
