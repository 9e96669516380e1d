"""The "fira" ds_config block and fira_dist.deepspeed's checks: no process group, no DeepSpeed engine (fast)."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

import fira_dist.deepspeed as fds  # noqa: E402
from ds_common import tiny_llama  # noqa: E402
from ds_launch import REPO_ROOT  # noqa: E402

W = "ds_config optimizer.params"


@pytest.mark.parametrize("params, message", [
    ({"rnak": 8}, f"{W} has unknown key 'rnak' (did you mean 'rank'?); accepted keys: lr, betas"),
    ({"gamma": 1.1}, "unknown key 'gamma' (did you mean 'limiter_gamma'?)"),
    ({"adam_w_mode": True}, "unknown key 'adam_w_mode'; accepted keys:"),
    ({"rank": 0}, f"{W}['rank']=0 is not accepted; expected an integer >= 1"),
    ({"rank": 8.5}, f"{W}['rank']=8.5 is not accepted; expected an integer >= 1"),
    ({"update_proj_gap": 0}, f"{W}['update_proj_gap']=0 is not accepted; expected an integer >= 1"),
    ({"lr": -1}, f"{W}['lr']=-1 is not accepted; expected a number in [0.0, inf]"),
    ({"lr": "auto"}, f"{W}['lr']='auto' is not accepted here: 'auto' is filled in by the Hugging Face Trainer only"),
    ({"betas": [0.9]}, f"{W}['betas']=[0.9] is not accepted; expected a pair [beta1, beta2]"),
    ({"betas": [0.9, 1.0]}, f"{W}['betas'][1]=1.0 is not accepted; expected a number in [0.0, 1.0)"),
    ({"eps": "small"}, f"{W}['eps']='small' is not accepted"),
    ({"proj_type": "diagonal"}, f"{W}['proj_type']='diagonal' is not accepted; expected one of 'std', 'reverse_std', "
                                "'left', 'right'"),
    ({"algorithm": "adamw"}, f"{W}['algorithm']='adamw' is not accepted; expected one of 'fira', 'galore'"),
    ({"residual": "full"}, f"{W}['residual']='full' is not accepted; expected one of 'reference', 'orthogonal'"),
    ({"projector": "qr"}, f"{W}['projector']='qr' is not accepted; expected one of 'svd', 'randomized'"),
    ({"limiter_gamma": 1.0}, f"{W}['limiter_gamma']=1.0 is not accepted; expected a number in (1.0, inf]"),
    ({"limiter_gamma": True}, f"{W}['limiter_gamma']=True is not accepted"),
    ({"correct_bias": "yes"}, f"{W}['correct_bias']='yes' is not accepted; expected true or false"),
    ({"target_modules": "attn"}, f"{W}['target_modules']='attn' is not accepted; expected a non-empty list"),
    ({"target_modules": []}, f"{W}['target_modules']=[] is not accepted"),
    ({"comm_bucket_bytes": 0}, f"{W}['comm_bucket_bytes']=0 is not accepted; expected a number of bytes >= 1"),
    ({"comm_bucket_bytes": -1e6}, f"{W}['comm_bucket_bytes']=-1000000.0 is not accepted; expected a number of bytes >= 1"),
    ({"comm_bucket_bytes": "1GB"}, f"{W}['comm_bucket_bytes']='1GB' is not accepted; expected a number of bytes >= 1"),
    ({"comm_bucket_bytes": 1.5}, f"{W}['comm_bucket_bytes']=1.5 is not accepted"),
    ({"reduce_bucket_size": 5e8}, f"{W} has unknown key 'reduce_bucket_size' (did you mean 'comm_bucket_bytes'?)"),
    # impossible combinations
    ({"alpha": 0.25, "scale": 0.5}, f"{W} sets both 'alpha'=0.25 and 'scale'=0.5"),
    ({"algorithm": "galore", "limiter_gamma": 1.1}, f"{W}['limiter_gamma']=1.1 is only used by algorithm 'fira'"),
    ({"algorithm": "GaLore", "residual": "orthogonal"}, f"{W}['residual']='orthogonal' is only used by algorithm 'fira'"),
])
def test_bad_blocks_name_the_key_and_the_accepted_values(params, message):
    with pytest.raises(ValueError) as err:
        fds.parse_fira_block(params)
    assert message in str(err.value)


@pytest.mark.parametrize("value", [0, -1, "256MiB", None.__class__, True, float("inf"), 2.5])
def test_bad_budget_in_the_constructor_is_named(value):
    """Fira(comm_bucket_bytes=...) takes a number of bytes >= 1; anything else names the argument and the range."""
    model = tiny_llama(0)
    from fira_dist import Fira, param_groups

    with pytest.raises(ValueError, match=r"Fira\(comm_bucket_bytes\)=.* is not accepted; expected a number of bytes >= 1"):
        Fira(param_groups(model, rank=4), comm_bucket_bytes=value)


def test_budget_from_the_block_and_its_default():
    """The block's comm_bucket_bytes reaches Fira(...) (1e6 -> 1000000 bytes); without it the optimizer keeps its
    default until DeepSpeed binds it (then reduce_bucket_size x the gradients' element size)."""
    model = tiny_llama(0)
    opt = fds.build_optimizer(model, fds.parse_fira_block({"comm_bucket_bytes": 1e6}))
    assert opt.comm_bucket_bytes == 1_000_000 and opt.comm_bucket_bytes_explicit
    opt = fds.build_optimizer(model, fds.parse_fira_block({}))
    assert not opt.comm_bucket_bytes_explicit


def test_good_block_defaults_and_scale():
    b = fds.parse_fira_block({"rank": 16, "scale": 0.5, "update_proj_gap": 10, "algorithm": "GALORE",
                              "target_modules": ["q_proj", "v_proj"]})
    assert b.lowrank == {"rank": 16, "update_proj_gap": 10, "alpha": 0.5, "proj_type": "std"}
    assert b.target_modules == ("q_proj", "v_proj")
    assert b.defaults["lr"] == 1e-3 and b.defaults["betas"] == (0.9, 0.999) and b.defaults["eps"] == 1e-6
    assert fds.parse_fira_block(None).lowrank == {"rank": 128, "update_proj_gap": 200, "alpha": 0.25, "proj_type": "std"}
    assert fds.parse_fira_block({"limiter_gamma": None}).defaults["limiter_gamma"] is None


@pytest.mark.parametrize("zero, message", [
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_optimization.offload_optimizer device='cpu' is not "
                                                           "supported with the 'fira' optimizer; expected 'none'"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, "zero_optimization.offload_param device='nvme'"),
    ({"stage": 2, "elastic_checkpoint": True}, "zero_optimization.elastic_checkpoint=true is not supported"),
    ({"stage": 4}, "zero_optimization.stage=4 is not accepted; expected 0, 1, 2 or 3"),
])
def test_impossible_zero_settings(zero, message):
    with pytest.raises(ValueError) as err:
        fds.check_ds_config({"zero_optimization": zero, "optimizer": {"type": "fira"}})
    assert message in str(err.value)
    with pytest.raises(ValueError, match="checkpoint.load_universal=true is not accepted .* under ZeRO stage 0"):
        fds.check_ds_config({"zero_optimization": {"stage": 0}, "checkpoint": {"load_universal": True}})
    fds.check_ds_config({"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}})  # ds_universal
    fds.check_ds_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})


def test_initialize_fails_before_any_process_group():
    """A bad block is refused by fira_dist.deepspeed.initialize before DeepSpeed starts (no process group)."""
    import torch.distributed as dist

    cfg = {"train_batch_size": 2, "optimizer": {"type": "FIRA", "params": {"rank": 8, "update_proj_gap": -3}}}
    with pytest.raises(ValueError, match=re.escape(f"{W}['update_proj_gap']=-3 is not accepted")):
        fds.initialize(model=tiny_llama(0), config=cfg)
    cfg = {"train_batch_size": 2, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
           "optimizer": {"type": "fira", "params": {"rank": 8}}}
    with pytest.raises(ValueError, match="offload_optimizer"):
        fds.initialize(model=tiny_llama(0), config=cfg)
    assert not (dist.is_available() and dist.is_initialized())


def test_build_optimizer_groups():
    """target_modules picks the attention and MLP projections; everything else gets Adam; a Trainer-style group's
    weight_decay (0 for norms and biases) is kept per parameter."""
    model = tiny_llama(0)
    block = fds.parse_fira_block({"rank": 8, "weight_decay": 0.1})
    opt = fds.build_optimizer(model, block)
    names = {id(p): n for n, p in model.named_parameters()}
    low = [names[id(p)] for g in opt.param_groups if g.get("rank") for p in g["params"]]
    assert len(low) == 14 and all(("self_attn" in n or "mlp" in n) and n.endswith("_proj.weight") for n in low)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    nodecay = [p for n, p in model.named_parameters() if "norm" in n]
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    opt = fds.build_optimizer(model, block, [{"params": decay, "weight_decay": 0.1},
                                             {"params": nodecay, "weight_decay": 0.0}])
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(wd[id(p)] == 0.0 for p in nodecay) and all(wd[id(p)] == 0.1 for p in decay)
    with pytest.raises(ValueError, match="matched no nn.Linear module"):
        fds.build_optimizer(model, fds.parse_fira_block({"target_modules": ["conv"]}))


def test_unbound_layout_skips_the_zero_gradient_init_step_and_refuses_real_steps():
    """DeepSpeed's ZeRO-0 bf16 wrapper runs one step() with zero gradients while it wraps the optimizer: not a
    training step for Fira (no decay, no state). A real step before DeepSpeed bound the layout is an error."""
    model = tiny_llama(0)
    opt = fds.build_optimizer(model, fds.parse_fira_block({"rank": 8, "weight_decay": 0.5}))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not opt.state
    assert opt.global_step == 0
    next(model.parameters()).grad[0, 0] = 1.0
    with pytest.raises(RuntimeError, match="not bound to an engine"):
        opt.step()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_configs(stage):
    """ds_configs/zero{1,2,3}_fira_bf16.json: a valid "fira" block, bf16, the right stage, nothing fira refuses."""
    cfg = json.loads((REPO_ROOT / "ds_configs" / f"zero{stage}_fira_bf16.json").read_text())
    assert fds.is_fira_config(cfg)
    fds.parse_fira_block(cfg["optimizer"]["params"])
    fds.check_ds_config(cfg)
    assert cfg["zero_optimization"]["stage"] == stage and cfg["bf16"]["enabled"] is True


def test_docs_cover_every_key():
    """docs/deepspeed.md documents every key the block accepts and the three launchers."""
    doc = (REPO_ROOT / "docs" / "deepspeed.md").read_text()
    for key in fds.ACCEPTED_KEYS:
        assert f"`{key}`" in doc, key
    for launcher in ("deepspeed --num_gpus", "torchrun", "mpirun -np"):
        assert launcher in doc, launcher
