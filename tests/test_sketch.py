"""The distributed randomized projector (layouts/sketch.py) against one process's randomized projector.

Each rank holds only its slice of a gradient (FSDP2 whole-row shards, or ZeRO-3 flat slices with partial rows at
both ends) of right- and left-projected matrices with a decaying spectrum; the sketch's products are summed
across ranks and no rank sees another's gradient. At 2 and 3 ranks the projector each rank keeps equals its
piece of the single-process projector (same test matrix, same seed rule, same sign convention) within 1e-5 of
the projector's largest entry, and the bytes moved equal ``plan.sketch_comm_bytes``.
"""

from __future__ import annotations

import json

import pytest

from distributed_utils import run_torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_sketch_equals_single_process(tmp_path, world):
    out = tmp_path / "sketch.json"
    run_torchrun("tests/dist_workers/sketch_worker.py", world, [str(out)], timeout=300)
    cases = json.loads(out.read_text())
    assert {c["layout"] for c in cases} == {"fsdp2", "zero3"} and {c["side"] for c in cases} == {"left", "right"}
    for c in cases:
        print(f"W={world} {c['layout']} {c['shape']} rank {c['rank']} {c['side']}: max relative difference "
              f"{c['max_rel_err']:.1e}, {c['bytes']} bytes moved (an exact SVD gathers {c['exact_bytes']})")
        assert c["go"]
        assert c["max_rel_err"] <= 1e-5, c
        assert c["bytes"] == c["expected_bytes"], c
