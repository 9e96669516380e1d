"""torch.distributed.checkpoint with the distributed layouts: save at W=3, resume at W=3 bit-exactly, load at
W=2 (both layouts, from either layout's checkpoint) and train on.

Model and optimizer state go through get_/set_model_state_dict and get_/set_optimizer_state_dict(
flatten_optimizer_state_dict=True) + dcp.save / dcp.load (tests/dist_workers/ddp_fsdp_suite.py): train 12
steps, save, train 10 more (a projector refresh at step 20 included). The W=2 runs must match the
uninterrupted W=3 run within rtol 1e-4 (both match one process to that tolerance; see test_fsdp2.py).
"""

from __future__ import annotations

import pytest

from dist_workers.ddp_fsdp_common import assert_matches
from dist_workers.ddp_fsdp_launch import LAYOUTS, dcp_load, dcp_save

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_at_the_same_world_size_is_bit_exact(layout):
    """A fresh model and optimizer loaded from the step-12 checkpoint continue exactly as the run that saved it."""
    run = dcp_save(layout)
    assert_matches(run, run["resumed"], bitwise=True, what=f"{layout} W=3 resume")
    keys = run["resumed"]["state_keys"]
    assert all(k == keys[0] for k in keys), "every rank must have the same state keys"


@pytest.mark.parametrize("src", LAYOUTS)
@pytest.mark.parametrize("dst", LAYOUTS)
def test_load_a_3_rank_checkpoint_at_2_ranks(src, dst):
    """Saved by `src` at W=3, loaded by `dst` at W=2 (owners and shards all change), training goes on."""
    run, got = dcp_save(src), dcp_load(src, dst)
    worst = assert_matches(run, got, bitwise=False, what=f"{src} W=3 -> {dst} W=2")
    print(f"{src} W=3 -> {dst} W=2: {worst}")
    keys = got["state_keys"]
    assert all(k == keys[0] for k in keys), "every rank must have the same state keys"
    assert any(k[0] == "lm_head.weight" and "projector" in k[1] for k in keys[0])
