"""The replicated (DDP) layout against one process.

Multi-rank tests run torchrun workers (tests/dist_workers/ddp_fsdp_*.py, gloo on CPU) and compare with a
single-process run of the same global batch computed here. A tiny LLaMA (transformers, from a config;
hidden 32, 2 layers, GQA so k/v and down_proj are left-projected, an lm_head with 131 rows, plus one matrix
that never gets a gradient), fp32, 32 steps, rank 8, update_proj_gap 10 (refreshes at steps 0, 10, 20, 30).
"""

from __future__ import annotations

import pytest
import torch

from dist_workers.ddp_fsdp_common import TWO_VARIANTS, assert_matches, check_state_and_svd
from dist_workers.ddp_fsdp_launch import suite, single_reference, two_matrices_reference

N_MATRICES_WITH_GRAD = 2 * 7 + 1  # q k v o gate up down per layer, lm_head (unused_proj has no gradient)
N_REFRESH = 4  # steps 0, 10, 20, 30 of 32


# ---------------------------------------------------------------------- fast, one process
def test_row_range_is_torch_chunk():
    from fira_dist.layouts.replicated import row_range

    for rows in (0, 1, 2, 5, 11, 32, 131):
        for world in (1, 2, 3, 4, 7):
            chunks = torch.arange(rows).chunk(world) if rows else ()
            for r in range(world):
                a, b = row_range(rows, world, r)
                want = chunks[r].tolist() if r < len(chunks) else []
                assert list(range(a, b)) == want, (rows, world, r)


def test_replicated_needs_a_process_group():
    import fira_dist

    with pytest.raises(ValueError, match="process group"):
        fira_dist.Fira([torch.nn.Parameter(torch.zeros(4, 4))], layout="replicated")


def test_row_sharded_needs_dtensor_parameters():
    import fira_dist

    with pytest.raises(ValueError, match="DTensor"):
        fira_dist.Fira([torch.nn.Parameter(torch.zeros(4, 4))], layout="row_sharded")


# ---------------------------------------------------------------------- multi-process
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_matches_single_process(world):
    """DDP (micro-batches, gradients averaged by DDP) + replicated layout == one process, within rtol 1e-4."""
    ref = single_reference()
    run = suite(world)["train:replicated:ddp"]
    worst = assert_matches(ref, run, bitwise=False, what=f"DDP W={world}")
    print(f"DDP W={world}: {worst}; min spectral gap at the rank cut {ref['min_spectral_gap']:.3g}")
    assert ref["min_spectral_gap"] > 1e-3  # the data has a clear gap: see test_fsdp2.py for why it matters
    unused = "model.layers.0.mlp.unused_proj.weight"
    assert torch.equal(run["params"][unused], ref["params"][unused])  # never updated, on any rank


@pytest.mark.slow
def test_replicated_is_bitwise_with_identical_gradients():
    """Every rank computes the whole global batch (so every rank has exactly one process's gradient): the
    owners run the single-process code on the same numbers, so the result is bitwise the same."""
    run = suite(3)["train:replicated:exact"]
    assert_matches(single_reference(), run, bitwise=True, what="replicated W=3, identical gradients")


@pytest.mark.slow
def test_small_exchange_budget_changes_no_bit():
    """comm_bucket_bytes=256: the updated values reach every rank in all-gather rounds of 256 bytes (send and
    receive buffers together) instead of one: the same bits as one process, and the bytes of the formula."""
    run = suite(3)["train:replicated:exact:256"]
    assert_matches(single_reference(), run, bitwise=True, what="replicated W=3, 256-byte rounds")
    for r in run["ranks"]:
        assert r["measured"] == r["expected"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_state_and_svd_are_split(world):
    run = suite(world)["train:replicated:ddp"]
    print("\n".join(check_state_and_svd(run, world, N_MATRICES_WITH_GRAD * N_REFRESH)))
    # owner-computes: each state tensor lives on exactly one rank
    assert sum(r["state_bytes"] for r in run["ranks"]) == run["state_total"]
    keys = [r["state_keys"] for r in run["ranks"]]
    assert all(k == keys[0] for k in keys), "every rank must have the same state keys"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_comm_bytes_equal_formula(world):
    """Measured bytes per step == Replicated's docstring formula (one padded all-gather of parameter values)."""
    run = suite(world)["train:replicated:ddp"]
    ref = single_reference()
    numel = sum(p.numel() for p in ref["params"].values())
    for r in run["ranks"]:
        assert r["measured"] == r["expected"], r
        assert len(set(r["measured"])) == 1  # the same every step, refresh or not
        # one all-gather of all parameter values: at least the model, at most the model plus W times the padding
        assert 4 * numel <= r["measured"][0] < 4 * numel * 2
    print(f"DDP W={world}: {run['ranks'][0]['measured'][0]} B per step per rank for {numel} fp32 parameters")


@pytest.mark.slow
@pytest.mark.parametrize("variant", TWO_VARIANTS)
def test_a_rank_that_owns_nothing(variant):
    """Two matrices, three ranks: under the replicated layout rank 2 holds no state and computes no SVD; under
    FSDP2 it holds no row of the (2, 20) matrix and owns no SVD. Both still match one process, for Fira,
    GaLore, the randomized projector, and a NaN gradient (under FSDP2 in the last rank's rows only) that
    every rank must skip, as one process skips the whole matrix. Under FSDP2 the randomized projector of the
    (20, 12) matrix is the distributed sketch (every rank takes part, no SVD owner); the (2, 20) one, whose
    rank covers it whole, keeps the exact SVD."""
    ref = two_matrices_reference(variant)
    run = suite(3)["two"]
    rep, fs = run[f"replicated:{variant}"], run[f"row_sharded:{variant}"]
    assert [r["layout"] for r in rep["ranks"]] == ["Replicated"] * 3
    assert [r["layout"] for r in fs["ranks"]] == ["RowSharded"] * 3
    assert_matches(ref, rep, bitwise=True, what=f"replicated {variant}, rank owning nothing")
    assert_matches(ref, fs, bitwise=False, what=f"FSDP2 {variant}, rank owning nothing")
    assert [r["svd_count"] > 0 for r in rep["ranks"]].count(False) == 1
    assert min(r["state_bytes"] for r in rep["ranks"]) == 0
    if variant == "randomized":
        assert [r["svd_count"] > 0 for r in fs["ranks"]].count(True) == 1  # only b.weight's exact SVD
        assert all(r["sketch_count"] > 0 for r in fs["ranks"])
    else:
        assert [r["svd_count"] > 0 for r in fs["ranks"]].count(False) == 1
    assert sorted(r["local_rows"]["b.weight"] for r in fs["ranks"]) == [0, 1, 1]
    for r in fs["ranks"]:  # step counters are replicated under FSDP2: the same as one process's on every rank
        assert r["steps"] == ref["steps"], (r["steps"], ref["steps"])
    if variant == "nan":
        assert ref["steps"]["a.weight"] == ref["steps"]["b.weight"] - 1
        assert all(r["skipped"] == {"a.weight": 1} for r in fs["ranks"])
