"""Continuing a fira.FiraAdamW / galore-torch GaLoreAdamW run with fira_dist.Fira: the state dict converted inside
Fira.load_state_dict and by `fira-dist convert-state`, the run after the switch against the reference's own
continuation on the same gradients, and the errors for what cannot be carried over."""

from __future__ import annotations

import argparse
import copy
import io
import os
import subprocess
import sys
import warnings
import zlib

import pytest
import torch

from fira_dist import Fira, cli
from fira_dist.reference_state import convert_state_dict, is_reference_state_dict

fira_ref = pytest.importorskip("fira")
galore_ref = pytest.importorskip("galore_torch")

GAP, SWITCH, AFTER = 5, 7, 20  # refreshes at 0 and 5 before the switch at step 7; 10, 15, 20, 25 after it
# (name, shape, rank, proj_type): right (m >= n, std), left (m < n, std), explicit left on m > n, explicit right
# on m < n, rank >= min(m, n) with std (k = 12: the projector is a full orthonormal basis)
MATRICES = [("w_right", (24, 12), 4, "std"), ("w_left", (12, 24), 4, "std"), ("w_expl_left", (20, 10), 3, "left"),
            ("w_expl_right", (10, 20), 3, "right"), ("w_full_rank", (16, 12), 16, "std")]
PLAIN = [("bias", (12,)), ("emb", (6, 5))]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gradient(shape, step, seed):
    """A gradient with a fresh, gapped rank-4 subspace at every step (so a projector refreshed at another step,
    or not carried over, changes the update visibly, while both SVDs agree on the subspace)."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    if len(shape) == 1:
        return torch.randn(shape, generator=g)
    m, n = shape
    k = min(4, m, n)
    U, V = torch.linalg.qr(torch.randn(m, k, generator=g))[0], torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return (U * torch.linspace(3.0, 2.0, k)) @ V.T + 0.05 * torch.randn(m, n, generator=g)


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.nn.Parameter(torch.randn(shape, generator=g))
            for name, shape in [(n, s) for n, s, *_ in MATRICES] + PLAIN}


def reference_groups(params, source, matrices=MATRICES):
    alpha_key = "alpha" if source == "fira" else "scale"
    return [{"params": [params[n] for n, _ in PLAIN]}] + [
        {"params": [params[n]], "rank": r, "update_proj_gap": GAP, alpha_key: 0.25, "proj_type": pt}
        for n, _, r, pt in matrices]


def our_groups(params, matrices=MATRICES):
    """Named parameters; the constructor's algorithm is left at its default ('fira') on purpose: a galore state
    must switch its groups to 'galore'."""
    return [{"params": [(n, params[n]) for n, _ in PLAIN]}] + [
        {"params": [(n, params[n])], "rank": r, "update_proj_gap": GAP, "alpha": 0.25, "proj_type": pt}
        for n, _, r, pt in matrices]


def make_reference(params, source, matrices=MATRICES, **kw):
    cls = fira_ref.FiraAdamW if source == "fira" else galore_ref.GaLoreAdamW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's deprecation warning
        return cls(reference_groups(params, source, matrices), lr=1e-2, weight_decay=0.01, **kw)


def step_with(opt, params, step, seed=0):
    for name, p in params.items():
        p.grad = gradient(tuple(p.shape), step, seed + zlib.crc32(name.encode()) % 97)
    opt.step()


def reference_run(source, matrices=MATRICES, steps=SWITCH):
    """The reference after `steps` steps: its params and a copy of its state dict as a checkpoint file gives it."""
    params = make_params()
    ref = make_reference(params, source, matrices)
    for t in range(steps):
        step_with(ref, params, t)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    return params, ref, torch.load(buf, weights_only=False)


def continue_both(params, ref, ours_params, ours):
    """AFTER more steps of both on the same gradients; returns the worst relative deviation of the change
    since the switch, over all parameters: max |ours - ref| / max |ref|."""
    start = {n: p.detach().clone() for n, p in params.items()}
    for t in range(SWITCH, SWITCH + AFTER):
        step_with(ref, params, t)
        step_with(ours, ours_params, t)
    worst = {}
    for n in params:
        d_ref, d_ours = params[n].detach() - start[n], ours_params[n].detach() - start[n]
        worst[n] = float((d_ours - d_ref).abs().max() / d_ref.abs().max())
    return worst


def clone_params(params):
    return {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}


@pytest.mark.parametrize("source", ["fira", "galore"])
def test_switch_mid_cycle_continues_as_the_reference(source):
    params, ref, sd = reference_run(source)
    assert is_reference_state_dict(sd)
    ours_params = clone_params(params)
    ours = Fira(our_groups(ours_params), lr=1e-2, weight_decay=0.01)
    ours.load_state_dict(sd)
    for n, shape, rank, proj_type in MATRICES:  # what was carried: the step count, projector, limiter norm
        st, ref_st = ours.state[ours_params[n]], ref.state[params[n]]
        assert int(st["step"]) == ref_st["step"] == SWITCH
        assert torch.equal(st["projector"], ref_st["projector"].ortho_matrix)
        assert torch.equal(st["exp_avg_sq"], ref_st["exp_avg_sq"])
        if source == "fira":
            assert float(st["limiter_norm"]) == float(ref_st["scaling_grad"]) > 0
    for g in ours.param_groups[1:]:
        assert g["algorithm"] == source and g["alpha"] == 0.25 and "scale" not in g
    worst = continue_both(params, ref, ours_params, ours)
    assert max(worst.values()) <= 1e-4, worst
    assert max(worst[n] for n, _ in PLAIN) <= 1e-6, worst  # plain Adam: the same arithmetic


def test_a_wrong_carry_over_would_be_caught():
    """The comparison above can fail: with the step count off by one (refreshes at 9, 14, ... instead of 10, 15,
    ...) or the moments dropped, the run after the switch leaves the reference's by far more than 1e-4."""
    for spoil in ("step", "moments"):
        params, ref, sd = reference_run("fira")
        for st in sd["state"].values():
            if spoil == "step":
                st["step"] += 1
            elif "projector" in st:
                st["exp_avg"].zero_()
        ours_params = clone_params(params)
        ours = Fira(our_groups(ours_params), lr=1e-2, weight_decay=0.01)
        ours.load_state_dict(sd)
        worst = continue_both(params, ref, ours_params, ours)
        assert max(worst[n] for n, *_ in MATRICES) > 1e-2, (spoil, worst)


def test_bf16_reference_state_dtype():
    """The reference keeps moments and projectors in the gradient's dtype; ours become float32 by default and
    stay bf16 with state_dtype='grad'."""
    matrices = MATRICES[:1]
    p = torch.nn.Parameter(torch.randn(24, 12, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(12, dtype=torch.bfloat16))
    params = {"w_right": p, "bias": b, "emb": torch.nn.Parameter(torch.randn(6, 5, dtype=torch.bfloat16))}
    ref = make_reference(params, "fira", matrices)
    for t in range(3):
        for n, q in params.items():
            q.grad = gradient(tuple(q.shape), t, 0).to(torch.bfloat16)
        ref.step()
    sd = ref.state_dict()
    assert ref.state[p]["exp_avg"].dtype == torch.bfloat16
    for state_dtype, want in (("float32", torch.float32), ("grad", torch.bfloat16)):
        ours = Fira(our_groups(params, matrices), lr=1e-2, weight_decay=0.01, state_dtype=state_dtype)
        ours.load_state_dict(sd)
        assert {k: v.dtype for k, v in ours.state[p].items()} == {
            "step": torch.float32, "projector": want, "exp_avg": want, "exp_avg_sq": want,
            "limiter_norm": torch.float32}
        assert ours.state[b]["exp_avg"].dtype == want
        assert ours.param_groups[1]["state_dtype"] == state_dtype  # kept from the constructor, not reset
        assert torch.equal(ours.state[p]["exp_avg"].float(), ref.state[p]["exp_avg"].float())
        for q in params.values():  # and it steps
            q.grad = q.grad.clone()
        ours.step()


def test_converted_state_is_plain_tensors_and_loads_weights_only():
    params, ref, sd = reference_run("galore")
    converted = convert_state_dict(sd)
    assert not is_reference_state_dict(converted)
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    ids = {id(p): i for i, p in enumerate(p for g in ref.param_groups for p in g["params"])}
    for n, shape, rank, proj_type in MATRICES:
        st = loaded["state"][ids[id(params[n])]]
        assert set(st) == {"step", "projector", "exp_avg", "exp_avg_sq", "limiter_norm"}
        assert float(st["limiter_norm"]) == 0.0  # GaLore: no limiter
    assert set(loaded["state"][ids[id(params["bias"])]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert [g.get("algorithm") for g in loaded["param_groups"]] == [None] + ["galore"] * len(MATRICES)
    # an already converted state dict loads through the ordinary path, and continues as the reference
    ours_params = clone_params(params)
    ours = Fira(our_groups(ours_params), lr=1e-2, weight_decay=0.01)
    ours.load_state_dict(loaded)
    assert max(continue_both(params, ref, ours_params, ours).values()) <= 1e-4


# ------------------------------------------------------------------------------------------------ errors
def load_into_ours(sd, matrices=MATRICES, shapes=None):
    params = make_params()
    if shapes:
        params.update({n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()})
    Fira(our_groups(params, matrices), lr=1e-2).load_state_dict(sd)


class GaLoreProjectorTensor:  # the name of galore's later tensor projector; not a kind we carry
    def __init__(self, rank):
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, GAP, 0.25, "std"
        self.ortho_matrix = None


def test_unknown_projector_class_is_refused_naming_it():
    _, _, sd = reference_run("galore", steps=2)
    sd["state"][2]["projector"] = GaLoreProjectorTensor(4)
    with pytest.raises(ValueError, match=r"projector of 'w_right' is a .*GaLoreProjectorTensor.*accepted: "
                                         r"fira\.gradient_projection\.GradientProjector"):
        load_into_ours(sd)


def test_unsupported_proj_type_is_refused():
    """galore-torch's proj_type 'full' (a two-sided projector) runs in the reference but has no counterpart."""
    matrices = [("w_right", (24, 12), 4, "full")]
    params = make_params()
    ref = make_reference(params, "galore", matrices)
    for t in range(2):
        step_with(ref, {n: params[n] for n in ("w_right", "bias", "emb")}, t)
    with pytest.raises(ValueError, match=r"projector of 'w_right' has proj_type='full'.*accepted: std, reverse_std, "
                                         "left, right"):
        load_into_ours(ref.state_dict(), matrices=MATRICES[:1])


def test_shape_mismatch_is_refused_naming_parameter():
    _, _, sd = reference_run("fira", steps=2)
    with pytest.raises(ValueError, match=r"'w_left' \(shape \(12, 20\)\) has a projector of shape \(12, 4\) and "
                                         r"moments of shape \(4, 24\); .* expects \(12, 4\) and \(4, 20\)"):
        load_into_ours(sd, shapes={"w_left": (12, 20)})
    with pytest.raises(ValueError, match=r"'bias' has shape \(12,\), expected the parameter's \(13,\)"):
        load_into_ours(sd, shapes={"bias": (13,)})


def test_rank_mismatch_is_refused():
    _, _, sd = reference_run("fira", steps=2)
    bad = copy.deepcopy(sd)
    bad["state"][2]["projector"].rank = 8  # the projector's own rank, which the reference steps with
    with pytest.raises(ValueError, match=r"projector of 'w_right' has rank=8 but its param group has rank=4"):
        load_into_ours(bad)
    ours = [(n, s, 6 if n == "w_right" else r, pt) for n, s, r, pt in MATRICES]  # our group asks for another rank
    with pytest.raises(ValueError, match=r"param_groups\[1\] of the reference state dict has rank=4 and this "
                                         r"optimizer's has rank=6"):
        load_into_ours(sd, matrices=ours)
    bad = copy.deepcopy(sd)  # a group rank that does not match the matrix the state holds
    bad["param_groups"][1]["rank"] = bad["state"][2]["projector"].rank = 2
    with pytest.raises(ValueError, match=r"parameter index 2 of param_groups\[1\] has a projector of shape \(4, 12\) "
                                         r"and moments of shape \(24, 4\), which fit no \(m, n\) weight with rank 2"):
        convert_state_dict(bad)  # no optimizer: the shape is inferred, the name is the index


def test_missing_limiter_norm_and_foreign_keys_are_refused():
    _, _, sd = reference_run("fira", steps=2)
    bad = copy.deepcopy(sd)
    del bad["state"][2]["scaling_grad"]
    with pytest.raises(ValueError, match=r"'w_right' is at step 2 but has no 'scaling_grad'"):
        load_into_ours(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["max_exp_avg_sq"] = bad["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"'bias' .* has keys \['max_exp_avg_sq'\]; accepted keys"):
        load_into_ours(bad)


# ------------------------------------------------------------------------------------------------ the command
def write_reference_checkpoint(path, source="fira", **extra):
    params, ref, sd = reference_run(source)
    torch.save({"optimizer": ref.state_dict(), "update_step": SWITCH, **extra}, path)
    return params, ref


def test_convert_state_command_end_to_end(tmp_path, capsys):
    src, dst = tmp_path / "ref.pt", tmp_path / "ours.pt"
    params, ref = write_reference_checkpoint(src)
    assert cli.main(["convert-state", str(src), str(dst)]) == 0
    assert "5 low-rank (fira) and 2 plain-Adam parameter states, step 7" in capsys.readouterr().out
    ck = torch.load(dst, weights_only=True)
    assert ck["update_step"] == SWITCH  # the rest of the checkpoint is kept
    ours_params = clone_params(params)
    ours = Fira(our_groups(ours_params), lr=1e-2, weight_decay=0.01)
    ours.load_state_dict(ck["optimizer"])
    assert max(continue_both(params, ref, ours_params, ours).values()) <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["ours.pt", "ref.pt"]  # no temporary file left


def test_convert_state_command_bad_inputs(tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    src, dst = inputs / "ref.pt", outputs / "out.pt"
    write_reference_checkpoint(src, args=argparse.Namespace(lr=0.01))  # a Python object beside the optimizer
    dst.write_bytes(b"previous")

    def fails(argv, message):
        assert cli.main(["convert-state", *argv]) == 2
        assert message in capsys.readouterr().err
        assert dst.read_bytes() == b"previous"  # never replaced nor half-written on an error
        assert os.listdir(outputs) == ["out.pt"]  # no temporary file left

    fails([str(inputs / "nope.pt"), str(dst)], "is not a file")
    fails([str(src), str(tmp_path / "no_dir" / "x.pt")], "does not exist")
    fails([str(src), str(dst), "--key", "optim"], "--key='optim' holds nothing, not an optimizer state dict")
    fails([str(src), str(dst)], "use --only-optimizer")  # argparse.Namespace: weights_only=True refuses it
    torch.save({"optimizer": Fira([torch.nn.Parameter(torch.zeros(3))]).state_dict()}, inputs / "ours.pt")
    fails([str(inputs / "ours.pt"), str(dst)], "is not a fira.FiraAdamW / galore-torch GaLoreAdamW state dict")
    (inputs / "junk.pt").write_bytes(b"not a checkpoint")
    fails([str(inputs / "junk.pt"), str(dst)], "cannot read IN=")
    _, _, sd = reference_run("fira", steps=2)
    sd["state"][2]["projector"].proj_type = "full"
    torch.save(sd, inputs / "full.pt")
    fails([str(inputs / "full.pt"), str(dst)], "has proj_type='full'")
    fails([str(src), str(src)], "is IN")

    assert cli.main(["convert-state", str(src), str(dst), "--only-optimizer"]) == 0
    assert set(torch.load(dst, weights_only=True)) == {"state", "param_groups"}


def test_convert_state_command_as_a_process(tmp_path):
    """The real entry point and its exit codes."""
    src, dst = tmp_path / "ref.pt", tmp_path / "out.pt"
    write_reference_checkpoint(src, source="galore")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "fira_dist.cli", "convert-state", str(src), str(dst), "--key",
                          "optimizer", "--state-dtype", "grad"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "5 low-rank (galore)" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "fira_dist.cli", "convert-state", str(dst), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "is not a fira.FiraAdamW" in bad.stderr


def test_convert_state_help_says_how_input_is_read(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["convert-state", "--help"])
    assert done.value.code == 0
    assert "weights_only=False" in " ".join(capsys.readouterr().out.split())
