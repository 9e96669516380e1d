"""torch.distributed.checkpoint with the distributed layouts: save at W=3, resume at W=3 bit-exactly, load at
W=2 (both layouts, from either layout's checkpoint) and train on.

Model and optimizer state go through get_/set_model_state_dict and get_/set_optimizer_state_dict(
flatten_optimizer_state_dict=True) + dcp.save / dcp.load (tests/dist_workers/ddp_fsdp_suite.py): train 12
steps, save, train 10 more (a projector refresh at step 20 included). The W=2 runs must match the
uninterrupted W=3 run within rtol 1e-4 (both match one process to that tolerance; see test_fsdp2.py).
"""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_single_process_checkpoint_through_the_zero_lr_initialisation(tmp_path):
    """One process (no process group): a FRESH optimizer has no state, so get_/set_optimizer_state_dict first
    run DCP's zero-lr initialisation step on it; the loaded state then replaces all of it and the resumed run
    is bit-exact. (The distributed layouts create their state eagerly and never take that step.) A parameter
    that never got a gradient has no state in a one-process checkpoint but would get some from that step, so
    DCP would report it missing: this model has none (the distributed tests' unused matrix is removed)."""
    import torch.distributed.checkpoint as dcp

    from dist_workers.ddp_fsdp_common import RunConfig, batches, loss_of, make_optimizer, tiny_llama
    from dist_workers.ddp_fsdp_launch import one_thread
    from dist_workers.ddp_fsdp_suite import load

    cfg = RunConfig(steps=16)
    data = batches(cfg)

    def build(seed):
        model = tiny_llama(seed)
        del model.model.layers[0].mlp.unused_proj
        return model, make_optimizer(model, cfg, layout="single")

    def train(model, opt, chunk):
        out = []
        for tokens in chunk:
            loss = loss_of(model, tokens)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    @one_thread
    def run():
        from dist_workers.ddp_fsdp_suite import save

        model, opt = build(0)
        train(model, opt, data[:12])
        save(model, opt, str(tmp_path / "ckpt"))
        first = train(model, opt, data[12:])
        model2, opt2 = build(1)  # other initial weights: everything must come from the checkpoint
        assert not opt2.state
        load(model2, opt2, str(tmp_path / "ckpt"))
        return first, train(model2, opt2, data[12:]), model, model2

    first, resumed, model, model2 = run()
    assert first == resumed
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
