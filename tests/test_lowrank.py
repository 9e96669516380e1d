"""Glentis et al. 2025 (arXiv 2505.22922) in fira_dist: low-rank factorized training (fira_dist.lowrank), weight
refactorization, and Fira's momentum reset with its learning-rate recovery ramp.

One-process tests here; the multi-rank ones (FSDP2 at 2 and 3 ranks, ZeRO-1/2/3 and DDP at 2 ranks, each against
one process, plus resumes across a reset) read two torchrun launches of tests/dist_workers/lowrank_worker.py.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import fira_dist
from fira_dist import lowrank
from fira_dist.config import MomentumReset


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def factors(m: int, n: int, r: int, seed: int = 0, deficient: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbalanced fp32 factors B (m, r), A_T (n, r) with spread-out scales (and `deficient` zero columns of B)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g) * torch.logspace(0, 2, r)
    A_T = torch.randn(n, r, generator=g) * 0.01
    if deficient:
        B[:, :deficient] = 0
    return B, A_T


SHAPES = [(64, 32, 8), (32, 96, 16), (96, 64, 64), (512, 1376, 128)]  # m > n, m < n, r = min(m, n), LLaMA-60M MLP


@pytest.mark.parametrize("m, n, r", SHAPES)
def test_refactorization_keeps_the_product_and_balances_the_factors(m, n, r):
    """fp32 factors: B' A_T'^T = B A_T^T within 1e-5 relative, and B'^T B' = A_T'^T A_T' (= S_r, diagonal)."""
    B, A_T = factors(m, n, r)
    B2, A2 = lowrank.refactor_pair(B, A_T)
    assert B2.dtype == A2.dtype == torch.float32 and B2.shape == B.shape and A2.shape == A_T.shape
    P = B.double() @ A_T.double().t()
    err = rel(B2.double() @ A2.double().t(), P)
    GB, GA = B2.double().t() @ B2.double(), A2.double().t() @ A2.double()
    balance = rel(GB, GA)
    off = float((GB - torch.diag(torch.diagonal(GB))).abs().max() / GB.abs().max())
    print(f"{m}x{n} r={r}: product {err:.1e}, B^T B vs A A^T {balance:.1e}, off-diagonal {off:.1e}")
    assert err < 1e-5 and balance < 1e-5 and off < 1e-5


@pytest.mark.parametrize("m, n, r", SHAPES[:3])
def test_qr_route_equals_the_direct_svd_of_the_product(m, n, r):
    """Gram / r x r-core route = the authors' merge_and_reinit (SVD of the (m, n) product), pair signs aligned:
    within 1e-5 of a float64 SVD, and within 1e-3 of their fp32 one (its own rounding error is ~1e-4)."""
    B, A_T = factors(m, n, r, seed=1)
    B2, A2 = lowrank.refactor_pair(B, A_T)
    U, S, Vh = torch.linalg.svd(B.double() @ A_T.double().t(), full_matrices=False)
    for Bs, As, tol in ((U[:, :r] * S[:r].sqrt(), Vh[:r].t() * S[:r].sqrt(), 1e-5),
                        (*lowrank.refactor_by_svd(B, A_T), 1e-3)):
        sign = torch.sign((Bs.double() * B2.double()).sum(0))
        eb, ea = rel(B2.double(), Bs.double() * sign), rel(A2.double(), As.double() * sign)
        print(f"{m}x{n} r={r}: against {Bs.dtype} SVD: B {eb:.1e}, A {ea:.1e}")
        assert eb < tol and ea < tol


def test_rank_deficient_and_zero_factors():
    """Zero directions of a factor are dropped, not divided by: the product is kept and no NaN appears."""
    B, A_T = factors(80, 40, 8, deficient=3)
    B2, A2 = lowrank.refactor_pair(B, A_T)
    assert torch.isfinite(B2).all() and torch.isfinite(A2).all()
    assert rel(B2.double() @ A2.double().t(), B.double() @ A_T.double().t()) < 1e-5
    assert int((B2.norm(dim=0) > 0).sum()) == 5  # rank of the product
    Z2, Y2 = lowrank.refactor_pair(torch.zeros(6, 2), torch.zeros(5, 2))
    assert not Z2.any() and not Y2.any()


def tiny_llama(seed: int = 0):
    from ds_common import tiny_llama as build

    return build(seed)


def test_factorize_replaces_the_targets_and_matches_factorized_shapes():
    """Exactly the nn.Linear modules fira_dist.param_groups would pick become LowRankLinear (the rest, e.g.
    lm_head, untouched); parameter shapes are what factorized_shapes predicts from the original shapes; the
    forward is x (scale B A)^T; the initialisation is the authors' (A ~ U(+-1/sqrt(n)), B ~ U(+-1/sqrt(r)))."""
    model = tiny_llama()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    picked = {n for g in fira_dist.param_groups(model, rank=4) if g.get("rank") for n, _ in g["params"]}
    names = lowrank.factorize(model, rank=8, alpha=16)
    assert {f"{n}.weight" for n in names} == picked and len(names) == 14
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == lowrank.factorized_shapes(shapes, 8)
    assert isinstance(model.lm_head, nn.Linear)
    mod = model.model.layers[0].mlp.down_proj  # 64 x 128
    assert mod.B.shape == (64, 8) and mod.A_T.shape == (128, 8) and mod.scale == 2.0
    assert float(mod.A_T.detach().abs().max()) <= 1 / math.sqrt(128)
    assert float(mod.B.detach().abs().max()) <= 1 / math.sqrt(8)
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(mod(x), x @ mod.weight().t(), rtol=1e-5, atol=1e-6)


def test_refactorize_leaves_the_model_function_unchanged():
    model = tiny_llama()
    lowrank.factorize(model, rank=8, alpha=16)
    with torch.no_grad():  # unbalance the factors as training does
        for _, m in lowrank.lowrank_modules(model):
            m.B.mul_(torch.logspace(-1, 1, 8))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    stats = lowrank.refactorize(model)
    after = model(input_ids=ids).logits
    assert stats["matrices"] == 14 and stats["allreduce_bytes"] == 0 and stats["gathered_bytes"] == 0
    assert rel(after, before) < 1e-5
    for _, m in lowrank.lowrank_modules(model):
        assert rel(m.B.t() @ m.B, m.A_T.t() @ m.A_T) < 1e-5


@pytest.mark.parametrize("call, says", [
    (lambda: lowrank.factorize(tiny_llama(), rank=65), "rank=65 is not accepted for model.layers.0.self_attn.q_proj "
                                                       "(64 x 64); expected an integer in [1, 64]"),
    (lambda: lowrank.factorize(tiny_llama(), rank=0), "rank=0 is not accepted"),
    (lambda: lowrank.factorize(tiny_llama(), target_modules=("nothing",)), "matched no nn.Linear"),
    (lambda: lowrank.factorized_shapes({"a.mlp.weight": (10, 4)}, 5), "rank=5 is not accepted for a.mlp.weight (10 x 4)"),
    (lambda: lowrank.LowRankLinear(4, 10, 2, alpha=0), "alpha=0 is not accepted"),
])
def test_bad_lowrank_values_are_named(call, says):
    with pytest.raises(ValueError, match=None) as err:
        call()
    assert says in str(err.value)


# ----------------------------------------------------------------------------------------------- momentum reset
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp_a = nn.Linear(12, 24)  # right projection (24 x 12)
        self.mlp_b = nn.Linear(24, 6)  # left projection (6 x 24)

    def forward(self, x):
        return self.mlp_b(torch.tanh(self.mlp_a(x)))


def small_data(steps: int):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)) for _ in range(steps)]


def small_opt(model, algorithm: str, **kw):
    groups = fira_dist.param_groups(model, target_modules=("mlp",), rank=3, update_proj_gap=4, alpha=0.5,
                                    algorithm=algorithm)
    return fira_dist.Fira(groups, lr=2e-2, weight_decay=0.01, **kw)


def small_train(model, opt, data, sched=None):
    losses = []
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def test_recovery_ramp_values():
    """K = 4, R = 2: resets before updates 5 and 9 (after 4 and 8 completed steps), which run at 0.001x, then 0.5005x."""
    mr = MomentumReset.from_values(4, 2, "K", "R")
    assert [mr.due(c) for c in range(10)] == [c in (4, 8) for c in range(10)]
    assert [mr.lr_factor(c) for c in range(10)] == [1, 1, 1, 1, 0.001, 0.5005, 1, 1, 0.001, 0.5005]
    assert MomentumReset.from_values(4, 0, "K", "R").lr_factor(4) == 1.0
    assert MomentumReset.from_values(None, 10, "K", "R").lr_factor(400) == 1.0


@pytest.mark.parametrize("algorithm", ["fira", "galore"])
def test_a_reset_is_a_fresh_optimizer_on_the_current_weights(algorithm):
    """With K = 3, updates 4 and 5 equal those of a NEW optimizer built on the weights after update 3, whose lr is
    scaled by the ramp (0.001, then 0.5005): moments, step counts, projectors (refreshed at the new step 0) and the
    limiter (no previous norm) all start over, for the low-rank and the plain-Adam (bias) parameters alike.
    Bitwise. Keys and shapes of the state stay as they were."""
    data = small_data(5)
    model = Small()
    opt = small_opt(model, algorithm, momentum_reset_interval=3, recovery_steps=2)
    small_train(model, opt, data[:3])
    shapes = {id(p): {k: tuple(v.shape) for k, v in st.items()} for p, st in opt.state.items()}
    fresh = Small()
    fresh.load_state_dict(model.state_dict())
    opt2 = small_opt(fresh, algorithm)
    for (x, y), factor in zip(data[3:], (0.001, 0.5005)):
        for o, mdl, f in ((opt, model, 1.0), (opt2, fresh, factor)):
            for g in o.param_groups:
                g["lr"] = 2e-2 * f
            nn.functional.mse_loss(mdl(x), y).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert {k: tuple(v.shape) for k, v in opt.state[p].items()} == shapes[id(p)]
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k
    assert all(g["lr"] == 2e-2 for g in opt.param_groups)  # the ramp never shows in what a scheduler sees


def test_ramp_multiplies_what_the_scheduler_sets():
    """Under a torch LambdaLR the update after a reset moves the weights by ~0.001x of a scheduled update, and the
    scheduler's own lr sequence is untouched."""
    data = small_data(6)
    runs = {}
    for K in (None, 4):
        model = Small()
        opt = small_opt(model, "galore", momentum_reset_interval=K, recovery_steps=1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        lrs, moves = [], []
        for x, y in data:
            before = model.mlp_a.bias.detach().clone()
            lrs.append(opt.param_groups[0]["lr"])
            small_train(model, opt, [(x, y)], sched)
            moves.append(float((model.mlp_a.bias - before).abs().max()))
        runs[K] = (lrs, moves)
    assert runs[None][0] == runs[4][0]
    assert runs[4][1][4] < 0.002 * runs[None][1][4] and runs[4][1][5] > 0.1 * runs[None][1][5]


@pytest.mark.parametrize("save_at", [3, 4, 5])
def test_resume_across_a_reset_is_exact(save_at):
    """K = 4, R = 2: a run saved after 3 (before the reset), 4 (the reset is next) or 5 steps (mid-ramp) and resumed
    from `torch.load(weights_only=True)` into a new model and optimizer ends bitwise equal to one that never stopped."""
    data = small_data(10)
    model = Small()
    opt = small_opt(model, "fira", momentum_reset_interval=4, recovery_steps=2)
    straight = small_train(model, opt, data)
    model2 = Small()
    opt2 = small_opt(model2, "fira", momentum_reset_interval=4, recovery_steps=2)
    first = small_train(model2, opt2, data[:save_at])
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert all(g["global_step"] == save_at for g in ckpt["opt"]["param_groups"])
    model3 = Small()
    model3.load_state_dict(ckpt["model"])
    opt3 = small_opt(model3, "fira", momentum_reset_interval=4, recovery_steps=2)
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.global_step == save_at
    assert first + small_train(model3, opt3, data[save_at:]) == straight
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kw, says", [
    ({"momentum_reset_interval": 0}, "Fira(momentum_reset_interval)=0 is not accepted; expected an integer >= 1"),
    ({"momentum_reset_interval": True}, "Fira(momentum_reset_interval)=True is not accepted"),
    ({"momentum_reset_interval": 10, "recovery_steps": -1}, "Fira(recovery_steps)=-1 is not accepted; expected an integer >= 0"),
    ({"momentum_reset_interval": 10, "recovery_steps": 10}, "Fira(recovery_steps)=10 is not accepted with "
                                                            "Fira(momentum_reset_interval)=10; expected an integer in [0, 9]"),
])
def test_bad_reset_values_are_named(kw, says):
    with pytest.raises(ValueError) as err:
        small_opt(Small(), "fira", **kw)
    assert says in str(err.value)


@pytest.mark.parametrize("params, says", [
    ({"momentum_reset_interval": 0}, "ds_config optimizer.params['momentum_reset_interval']=0 is not accepted"),
    ({"momentum_reset_interval": 5, "recovery_steps": -2}, "ds_config optimizer.params['recovery_steps']=-2 is not accepted"),
    ({"cycle_length": 200}, "unknown key 'cycle_length' (did you mean 'momentum_reset_interval'?)"),
])
def test_bad_ds_config_reset_keys_are_named(params, says):
    from fira_dist.deepspeed import parse_fira_block

    with pytest.raises(ValueError) as err:
        parse_fira_block(params)
    assert says in str(err.value)


def test_ds_config_block_builds_adam_with_resets():
    """"rank": null: every parameter in one plain-Adam group; the reset keys reach the optimizer."""
    from fira_dist.deepspeed import build_optimizer, parse_fira_block

    model = tiny_llama()
    lowrank.factorize(model, rank=8)
    opt = build_optimizer(model, parse_fira_block({"rank": None, "momentum_reset_interval": 50, "recovery_steps": 5}))
    assert len(opt.param_groups) == 1 and "rank" not in opt.param_groups[0]
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    assert opt.momentum_reset == MomentumReset(interval=50, recovery_steps=5)


# ----------------------------------------------------------------------------------------------- multi-rank
# Lowrank jobs: factorized tiny LLaMA (rank 8), plain Adam, K = 3, R = 2: resets (and refactorizations) after steps
# 3 and 6 of 8, ramps on updates 4-5 and 7-8. Fira jobs: Fira's low-rank groups (rank 8, update_proj_gap 5), reset
# after step 10 of 12 (its projector refresh coincides with the scheduled one, whose conditioning at global batch 16
# tests/test_deepspeed.py checks; W=3 needs batch 12: measured as close). Saves at 3 (the reset is the next update)
# and 4 (mid-ramp).
W2_JOBS = [
    ("fsdp2_lowrank", "fsdp2", "lowrank", {"save_at": 4}), ("fsdp2_lowrank_resumed", "fsdp2", "lowrank", {"resume": 4}),
    ("z1_lowrank", "deepspeed", "lowrank", {"stage": 1}), ("z2_lowrank", "deepspeed", "lowrank", {"stage": 2}),
    ("z3_lowrank", "deepspeed", "lowrank", {"stage": 3, "save_at": 3}),
    ("z3_lowrank_resumed", "deepspeed", "lowrank", {"stage": 3, "resume": 3}),
    ("z3_persistent_lowrank", "deepspeed", "lowrank", {"stage": 3, "persist": True}),
    ("z0_lowrank", "deepspeed", "lowrank", {"stage": 0, "save_at": 3}),
    ("z0_lowrank_resumed", "deepspeed", "lowrank", {"stage": 0, "resume": 3}),
    ("fsdp2_fira", "fsdp2", "fira", {}), ("z3_fira", "deepspeed", "fira", {"stage": 3}), ("ddp_fira", "ddp", "fira", {}),
]
W3_JOBS = [("fsdp2_lowrank", "fsdp2", "lowrank", {}), ("fsdp2_fira", "fsdp2", "fira", {"batch": 12})]
LOWRANK = {"steps": 8, "batch": 12, "K": 3, "R": 2}
FIRA = {"steps": 12, "batch": 16, "K": 10, "R": 1}


def make_jobs(spec, ckpt_root) -> list[dict]:
    from lowrank_common import job

    out = []
    for name, strategy, method, kw in spec:
        j = job(name, strategy, method, **{**(LOWRANK if method == "lowrank" else FIRA), **kw})
        if "save_at" in kw or "resume" in kw:
            j["ckpt"] = str(ckpt_root / name.replace("_resumed", ""))
        out.append(j)
    return out


_LAUNCHES: dict[int, dict] = {}


def launch(world: int, tmp_path_factory) -> dict:
    """One torchrun launch per world size for the whole file: {job name: (job, result)}."""
    if world not in _LAUNCHES:
        import json

        from distributed_utils import run_torchrun

        out = tmp_path_factory.mktemp(f"lowrank_w{world}")
        jobs = make_jobs(W2_JOBS if world == 2 else W3_JOBS, out)
        (out / "jobs.json").write_text(json.dumps(jobs))
        run_torchrun("tests/dist_workers/lowrank_worker.py", world, ["--jobs", out / "jobs.json", "--out", out],
                     env={"DS_ACCELERATOR": "cpu"}, timeout=400)
        _LAUNCHES[world] = {j["name"]: (j, torch.load(out / f"{j['name']}.pt", weights_only=False)) for j in jobs}
    return _LAUNCHES[world]


_REFS: dict[str, dict] = {}


def reference(j: dict) -> dict:
    from ds_common import one_thread
    from lowrank_common import run_single

    key = f"{j['method']}-{j['batch']}"
    if key not in _REFS:
        with one_thread():
            _REFS[key] = run_single(j)
    return _REFS[key]


def assert_matches_one_process(j: dict, got: dict, what: str) -> None:
    """Losses within 1e-5 relative at every step; every parameter within 1e-4 in relative Frobenius norm; every
    factorized module's product B A within 1e-4 of its largest entry. (Measured: ~1e-7, ~3e-6, ~2e-6: gradients are
    summed in another order across ranks, and Adam's first updates of near-zero gradients amplify that in the
    embedding, which is why the parameters are compared in norm.)"""
    from lowrank_common import products

    ref = reference(j)
    losses = ref["losses"][j.get("resume", 0):]
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], losses))
    par = {n: float((got["params"][n] - v).norm() / v.norm()) for n, v in ref["params"].items()}
    pa, pb = products(got["params"]), products(ref["params"])
    prod = max((rel(pa[n], v) for n, v in pb.items()), default=0.0)
    worst = max(par, key=par.get)
    print(f"{what}: loss {loss_err:.1e}, parameters {par[worst]:.1e} ({worst}), products {prod:.1e}")
    assert len(got["losses"]) == len(losses) and loss_err < 1e-5
    assert par[worst] < 1e-4 and prod < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("world, name", [(2, "fsdp2_lowrank"), (3, "fsdp2_lowrank"), (2, "z1_lowrank"),
                                         (2, "z2_lowrank"), (2, "z3_lowrank"), (2, "z3_persistent_lowrank"),
                                         (2, "z0_lowrank"),
                                         (2, "fsdp2_fira"), (3, "fsdp2_fira"), (2, "z3_fira"), (2, "ddp_fira")])
def test_restarts_match_one_process(world, name, tmp_path_factory):
    """Refactorization + momentum reset (lowrank) and momentum reset (Fira) under FSDP2, DeepSpeed ZeRO 0-3 (ZeRO-3
    also with its factors persistent, i.e. never released) and DDP equal one process on the same global batch; every rank counted the same engine steps and reset on the same
    step (every step counter is 2 = updates since the last reset); FSDP2 / DDP ranks hold the same state keys."""
    j, got = launch(world, tmp_path_factory)[name]
    assert_matches_one_process(j, got, f"{name} W={world}")
    assert got["global_step"] == j["steps"]
    assert all(r["steps"] == [float(j["steps"] - (j["steps"] - 1) // j["K"] * j["K"])] for r in got["ranks"])
    if got["layout"] in ("RowSharded", "Replicated"):
        assert all(r["keys"] == got["ranks"][0]["keys"] for r in got["ranks"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp2_lowrank", "z3_lowrank", "z0_lowrank"])
def test_resume_across_a_reset_is_exact_under_fsdp2_and_zero(name, tmp_path_factory):
    """A run checkpointed after step 3 (ZeRO: DeepSpeed's checkpoint; the reset is the next update) or 4 (FSDP2:
    DCP, mid-ramp) and resumed into a fresh model, optimizer and engine ends bitwise equal to the uninterrupted
    run, with the same engine-step count."""
    runs = launch(2, tmp_path_factory)
    (j, straight), (jr, resumed) = runs[name], runs[f"{name}_resumed"]
    assert resumed["losses"] == straight["losses"][jr["resume"]:]
    for n, v in straight["params"].items():
        assert torch.equal(resumed["params"][n], v), n
    assert resumed["global_step"] == straight["global_step"] == j["steps"]


# ----------------------------------------------------------------------------------------------- fira-dist pretrain
PRETRAIN = ["--model", "llama_tiny", "--seq-len", "32", "--micro-batch-size", "2", "--max-documents", "100",
            "--eval-every", "0", "--no-tensorboard", "--log-every", "1", "--rank", "8"]


def pretrain_main(*argv) -> int:
    from fira_dist.pretrain.main import main

    return main(list(argv))


def test_pretrain_dry_run_shows_factorization_and_restarts(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pretrain_main("--model", "llama_60m", "--optimizer", "lowrank", "--momentum-reset-interval", "500",
                         "--dry-run") == 0
    out = capsys.readouterr().out
    assert "optimizer    lowrank rank 128, alpha 32 (W = 32/128 B A)" in out and "lr 0.0015" in out
    assert "56 matrices (25.30M parameters)" in out and "33.69M -> 18.39M trainable parameters" in out
    assert "restarts     every 500 steps (19 in this run)" in out and "lr x (0.001 + 0.999 j / 10)" in out
    assert "factors refactorized" in out and "optimizer states (total)" in out  # the factorized model's estimate
    assert pretrain_main("--model", "llama_60m", "--optimizer", "galore", "--momentum-reset-interval", "200",
                         "--recovery-steps", "5", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "restarts     every 200 steps" in out and "projectors recomputed, limiter restarted" in out
    assert "j / 5)" in out and "refactorized" not in out


def test_pretrain_dry_run_deepspeed_block(capsys, tmp_path, monkeypatch):
    """Under DeepSpeed lowrank (and adamw with resets) becomes a "fira" block with "rank": null and the reset keys."""
    import json

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    for opt, K in (("lowrank", "7"), ("adamw", "9")):
        assert pretrain_main("--model", "llama_tiny", "--optimizer", opt, "--momentum-reset-interval", K,
                             "--strategy", "deepspeed", "--deepspeed", str(cfg), "--rank", "8", "--dry-run") == 0
        out = capsys.readouterr().out
        block = json.loads(out.split("ds_config    ", 1)[1].splitlines()[0])["optimizer"]
        assert block["type"] == "fira" and block["params"]["rank"] is None
        assert block["params"]["momentum_reset_interval"] == int(K) and block["params"]["recovery_steps"] == int(K) - 1


def test_pretrain_lowrank_restarts_resume_exactly(tmp_path, monkeypatch):
    """One process, lowrank with restarts (K = 3, R = 2): refactorizations after steps 3 and 6, the ramp in the
    logged lr (0.001x the scheduled lr at step 4, 0.5005x at 5); a run resumed from the step-4 checkpoint
    (mid-ramp) continues with bitwise the same losses."""
    from fira_dist.pretrain.train_utils import lr_factor, read_metrics

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    real = lowrank.refactorize
    monkeypatch.setattr(lowrank, "refactorize", lambda model, **kw: calls.append(len(calls)) or real(model, **kw))
    args = [*PRETRAIN, "--optimizer", "lowrank", "--momentum-reset-interval", "3", "--recovery-steps", "2",
            "--max-steps", "6", "--warmup-steps", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert pretrain_main(*args, "--save-every", "2", "--keep-last", "0", "--output-dir", str(a)) == 0
    assert len(calls) == 2
    ra = {r["step"]: r for r in read_metrics(str(a))}
    sched = [0.0015 * lr_factor(s, 0, 6, 0.1) for s in range(6)]
    assert [ra[s]["lr"] for s in range(1, 7)] == pytest.approx(
        [sched[0], sched[1], sched[2], 0.001 * sched[3], 0.5005 * sched[4], sched[5]], rel=1e-12)
    assert pretrain_main(*args, "--save-every", "0", "--output-dir", str(b), "--resume",
                         str(a / "checkpoints" / "step_00000004")) == 0
    assert len(calls) == 3  # after step 6 only
    rb = {r["step"]: r for r in read_metrics(str(b))}
    assert sorted(rb) == [5, 6] and all(rb[s]["loss"] == ra[s]["loss"] for s in (5, 6))
