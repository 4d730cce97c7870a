"""Every input either works exactly like torch.optim.AdamW(betas=(b, b), foreach=False) or is
refused before anything changes (Note [what the kernel may trust] in tiedadam/optim/verify.py).
One test per case a user hits; both backends (Triton in its interpreter, and torch)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam import _compat
from tiedadam.optim import guard, introspect
from tiedadam.optim.telemetry import to_floats
from reference import assert_close
from twins import (assert_same_run, assert_unchanged, pair, snapshot, step_both,
                   torch_ref, trained)

BACKENDS = ["triton", "torch"]


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["transposed", "expanded", "channels_last"])
def test_grad_with_other_strides_is_read_by_index(backend, kind):
    ours, theirs = pair((6, 5, 3, 4) if kind == "channels_last" else (6, 5))
    opt, ref = TiedAdamW(ours, lr=0.1, beta=0.9, backend=backend), torch_ref(theirs)
    for _ in range(3):
        g = torch.randn(ours[0].shape)
        if kind == "transposed":
            g = g.t().contiguous().t()  # same values, column-major
        elif kind == "expanded":  # what autograd returns for a param used through .sum()
            g = torch.randn(()).expand(ours[0].shape)
        else:
            g = g.contiguous(memory_format=torch.channels_last)
        ours[0].grad, theirs[0].grad = g, g.clone()
        opt.step()
        ref.step()
    assert_close(ours[0], theirs[0])
    assert torch.equal(ours[0].grad, theirs[0].grad)  # the user's grad is left as it was


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["clear", "replace"])
def test_state_cleared_or_replaced_mid_training(backend, how):
    ours, theirs = pair(10, (3, 4))
    opt, ref = TiedAdamW(ours, lr=0.1, beta=0.9, backend=backend), torch_ref(theirs)

    def edit(step):
        if step != 3:
            return
        if how == "clear":
            opt.state.clear()
            ref.state.clear()
        else:  # e.g. after pruning: new moments for one param
            for o, p in ((opt, ours[0]), (ref, theirs[0])):
                o.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.full((10,), 0.5),
                              "exp_avg_sq": torch.ones(10)}
    step_both(opt, ref, ours, theirs, 6, before=edit)
    for p, q in zip(ours, theirs):
        assert_close(p, q)
        assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(sd["state"][0]["step"]) == (3.0 if how == "clear" else 4.0)


# 3 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_of_another_model_is_refused_at_load(backend):
    small = [torch.nn.Parameter(torch.randn(4, 3))]
    other = TiedAdamW(small, backend=backend)
    small[0].grad = torch.randn(4, 3)
    other.step()
    ps = [torch.nn.Parameter(torch.randn(8, 3))]
    opt = TiedAdamW(ps, lr=0.1, backend=backend)
    ps[0].grad = torch.randn(8, 3)
    opt.step()
    snap = snapshot(opt, ps)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                            for g in opt.param_groups])
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*shape \(8, 3\)"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(opt, ps, snap)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    opt.step()  # still trains


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_grown_in_place_is_refused_before_anything_changes(backend):
    emb, other = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(7))
    opt = TiedAdamW([emb, other], lr=0.1, backend=backend)
    for p in (emb, other):
        p.grad = torch.randn_like(p)
    opt.step()
    emb.data = torch.cat([emb.data, torch.randn(3, 4)])  # vocabulary grown
    emb.grad, other.grad = torch.randn(8, 4), torch.randn(7)
    snap = snapshot(opt, [other])
    with pytest.raises(RuntimeError, match=r"exp_avg.*shape \(5, 4\).*\(8, 4\).*del optimizer"):
        opt.step()
    assert_unchanged(opt, [other], snap)
    del opt.state[emb]  # the fix the error names
    opt.step()
    assert opt.state[emb]["exp_avg"].shape == (8, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_state_tensor_of_other_size_is_refused(backend):
    ps = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(9))]
    opt = TiedAdamW(ps, lr=0.1, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state[ps[1]]["exp_avg_sq"] = torch.ones(3)
    snap = snapshot(opt, ps[:1])
    with pytest.raises(RuntimeError, match="exp_avg_sq.*shape \\(3,\\)"):
        opt.step()
    assert_unchanged(opt, ps[:1], snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_cast_to_bf16_after_training_keeps_fp32_state(backend):
    model = torch.nn.Linear(8, 4)
    opt = TiedAdamW(model.parameters(), lr=0.1, beta=0.9, backend=backend)
    for _ in range(2):
        model(torch.randn(3, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.bfloat16)
    w0 = model.weight.detach().float()
    m0 = opt.state[model.weight]["exp_avg"].clone()
    v0 = opt.state[model.weight]["exp_avg_sq"].clone()
    model(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    g = model.weight.grad.float()
    opt.step()
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float32  # bf16 params: fp32 state
    from reference import ref_step
    p, m, _ = ref_step(w0, g, m0, v0, 3, lr=0.1, beta=0.9, eps=1e-8, weight_decay=1e-2)
    assert_close(model.weight, p.to(torch.bfloat16), torch.bfloat16)
    assert_close(opt.state[model.weight]["exp_avg"], m)


# 4 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_params_get_fp64_state_and_math(backend):
    ours, theirs = pair(11, (4, 70), (), dtype=torch.float64)
    opt = TiedAdamW(ours, lr=0.1, beta=0.9, weight_decay=0.1, backend=backend)
    ref = torch_ref(theirs, weight_decay=0.1)
    step_both(opt, ref, ours, theirs, 4)
    for p, q in zip(ours, theirs):
        assert opt.state[p]["exp_avg"].dtype == torch.float64
        # fp64 end to end: far below what fp32 rounding anywhere would leave (~1e-7)
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"],
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_step_is_never_half_applied(backend):
    """Two buckets (fp32 and fp64): the second one's state is broken, so the first must not move."""
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5).double())
    opt = TiedAdamW([a, b], backend=backend)
    a.grad, b.grad = torch.randn(5), torch.randn(5).double()
    opt.step()
    opt.state[b]["exp_avg"] = opt.state[b]["exp_avg"].float()
    a.grad, b.grad = torch.randn(5), torch.randn(5).double()
    snap = snapshot(opt, [a])
    with pytest.raises(RuntimeError, match="exp_avg.*float32, expected torch.float64"):
        opt.step()
    assert_unchanged(opt, [a], snap)


# 5 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_default_tiedadamw_loads_torch_checkpoint_with_other_tied_beta(backend):
    ours, theirs = pair(7, (2, 3))
    ref = torch_ref(theirs, beta=0.9)
    for _ in range(2):
        for q in theirs:
            q.grad = torch.randn_like(q)
        ref.step()
    for p, q in zip(ours, theirs):
        p.data.copy_(q.data)
    opt = TiedAdamW(ours, backend=backend)  # default beta 0.95
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["beta"] == 0.9 and opt.param_groups[0]["betas"] == (0.9, 0.9)
    step_both(opt, ref, ours, theirs, 2)
    for p, q in zip(ours, theirs):
        assert_close(p, q)


# 6 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_telemetry_and_grads_agree_across_backends(backend):
    ps = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(3, 5))]
    opt = TiedAdamW(ps, lr=0.01, beta=0.9, backend=backend, telemetry=True,
                    names=["a", "b"])
    scale = 2.0 ** 8
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g * scale
    opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
    opt.step()
    tel = to_floats(opt.telemetry())
    for p, g, n in zip(ps, grads, ["a", "b"]):
        assert torch.equal(p.grad, g), "p.grad must be unscaled after the step (as torch does)"
        assert tel[f"telemetry/{n}/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)
    # an overflowing step: nothing changes, and the telemetry says why
    for p, g in zip(ps, grads):
        p.grad = g * scale
    ps[1].grad[1, 2] = float("inf")
    snap = snapshot(opt, ps)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert_unchanged(opt, ps, snap)
    tel = to_floats(opt.telemetry())
    assert tel["telemetry/a/nonfinite_grads"] == 0 and tel["telemetry/b/nonfinite_grads"] == 1
    assert tel["telemetry/a/grad_norm"] == pytest.approx(grads[0].norm().item(), rel=1e-5)
    assert tel["telemetry/a/update_rms"] == 0  # nothing was updated


# 7 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["maximize", "amsgrad", "adam-l2"])
def test_checkpoint_of_another_update_rule_is_refused(key):
    """Checkpoints of another update rule, refused at load with nothing changed; "adam-l2"
    (v3 row 11): torch.optim.Adam adds weight_decay * p to the grad, so its moments hold that
    term and continuing as AdamW would train otherwise."""
    ours, theirs = pair(6)
    if key == "adam-l2":
        ref = torch.optim.Adam(theirs, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1)
    else:
        ref = torch_ref(theirs, **{key: True})
    theirs[0].grad = torch.randn(6)
    ref.step()
    opt = TiedAdamW(ours, backend="torch")
    ours[0].grad = torch.randn(6)
    opt.step()
    snap = snapshot(opt, ours)
    with pytest.raises(ValueError, match="L2 weight decay" if key == "adam-l2" else f"{key}=True"):
        opt.load_state_dict(ref.state_dict())
    assert_unchanged(opt, ours, snap)
    if key == "adam-l2":
        return
    with pytest.raises(ValueError, match="maximize=True"):
        TiedAdamW(ours, maximize=True)
    opt.param_groups[0][key] = True  # edited mid-training: refused at the step
    with pytest.raises(ValueError, match=f"{key}=True"):
        opt.step()
    assert_unchanged(opt, ours, snap)


# 8 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_every_option_and_step_identically(backend, how):
    ps = [torch.nn.Parameter(torch.randn(33, dtype=torch.bfloat16))]
    opt = TiedAdamW(ps, lr=0.01, beta=0.9, backend=backend, state_dtype=torch.bfloat16,
                    master_weights=True, seed=1234, param_stochastic_rounding=True,
                    telemetry=True, snr_threshold=0.25)
    ps[0].grad = torch.randn_like(ps[0])
    opt.step()
    if how == "deepcopy":
        twin = copy.deepcopy({"p": ps[0], "opt": opt})
    else:
        twin = pickle.loads(pickle.dumps({"p": ps[0], "opt": opt}))
    copy_opt, copy_p = twin["opt"], twin["p"]
    for name in ("state_dtype", "seed", "master_weights", "stochastic_rounding",
                 "param_stochastic_rounding", "backend", "telemetry_enabled", "snr_threshold"):
        assert getattr(copy_opt, name) == getattr(opt, name), name
    g = torch.randn_like(ps[0])
    ps[0].grad, copy_p.grad = g, g.clone()
    opt.step()
    copy_opt.step()
    assert torch.equal(ps[0], copy_p)
    for k in ("exp_avg", "exp_avg_sq", "master_param"):
        assert torch.equal(opt.state[ps[0]][k], copy_opt.state[copy_p][k])


def test_options_travel_in_state_dict():
    ps = [torch.nn.Parameter(torch.randn(8))]
    opt = TiedAdamW(ps, state_dtype="bfloat16", seed=77, stochastic_rounding=False)
    sd = opt.state_dict()
    g = sd["param_groups"][0]
    # dtypes by name: state dicts hold strings, numbers and tensors only (DCP refuses dtypes)
    assert (g["state_dtype"], g["seed"], g["stochastic_rounding"]) == ("bfloat16", 77, False)
    fresh = TiedAdamW([torch.nn.Parameter(torch.randn(8))])
    fresh.load_state_dict(sd)
    assert fresh.state_dtype == torch.float32 and fresh.param_groups[0]["state_dtype"] == "bfloat16"
    assert fresh.param_groups[0]["seed"] == 77


# 9 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["before the first step", "after a step", "after a load"])
def test_betas_edit_works_at_any_time(when):
    ours, theirs = pair(9)
    opt, ref = TiedAdamW(ours, beta=0.9, lr=0.1, backend="torch"), torch_ref(theirs, beta=0.9)
    if when != "before the first step":
        g = torch.randn(9)
        ours[0].grad, theirs[0].grad = g, g.clone()
        opt.step()
        ref.step()
    if when == "after a load":
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.param_groups[0]["betas"] = (0.8, 0.8)
    ref.param_groups[0]["betas"] = (0.8, 0.8)
    g = torch.randn(9)
    ours[0].grad, theirs[0].grad = g, g.clone()
    opt.step()
    ref.step()
    assert opt.param_groups[0]["beta"] == 0.8
    assert_close(ours[0], theirs[0])
    opt.param_groups[0]["beta"] = 0.7  # and the other one, too
    opt.step()
    assert opt.param_groups[0]["betas"] == (0.7, 0.7)


# 10 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key,value", [("eps", float("nan")), ("weight_decay", -5.0),
                                       ("lr", float("inf")), ("betas", (0.9, 0.99)),
                                       ("beta", 1.0), ("state_dtype", torch.float16),
                                       ("seed", "x")])
def test_hyperparameter_edits_are_checked_before_the_step(backend, key, value):
    ps = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(4))]
    opt = TiedAdamW([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    snap = snapshot(opt, ps)
    opt.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=key.rstrip("s")):
        opt.step()
    assert_unchanged(opt, ps, snap)


# 11 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_state_resume_is_bitwise(backend):
    def run(resume_at=None):
        torch.manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(4, 5))]
        grads = [[torch.randn_like(p) for p in ps] for _ in range(6)]
        opt = TiedAdamW(ps, lr=0.01, beta=0.9, backend=backend, state_dtype=torch.bfloat16,
                        seed=99)
        for step, gs in enumerate(grads):
            if step == resume_at:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = TiedAdamW(ps, lr=0.5, beta=0.5, backend=backend,
                                state_dtype=torch.bfloat16)  # another seed: the load restores it
                opt.load_state_dict(torch.load(buf))
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        return ps, opt
    whole, o1 = run()
    resumed, o2 = run(resume_at=3)
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)
        assert torch.equal(o1.state[a]["exp_avg_sq"], o2.state[b]["exp_avg_sq"])


# 12 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_telemetry_update_bound_holds_up_to_fp32_rounding(backend):
    """|u| = |m_hat| / (sqrt(v_hat) + eps) <= 1 exactly in real arithmetic; in fp32 a sign-like
    update (the same grad every step, where |u| -> 1) may round a few ulps above 1. The
    documented bound is 1 + 2**-20 (README, telemetry)."""
    ps = [torch.nn.Parameter(torch.zeros(4096))]
    opt = TiedAdamW(ps, lr=1e-3, beta=0.95, eps=0.0, backend=backend, telemetry=True)
    g = torch.randn(4096) * torch.logspace(-6, 3, 4096)
    worst = 0.0
    for _ in range(5):
        ps[0].grad = g.clone()
        opt.step()
        worst = max(worst, to_floats(opt.telemetry())["telemetry/all/update_abs_max"])
    assert 1 - 1e-6 < worst <= 1 + 2.0 ** -20


# smaller ---------------------------------------------------------------------------------------
def test_numpy_scalars_are_accepted():
    ps = [torch.nn.Parameter(torch.randn(3))]
    opt = TiedAdamW(ps, lr=np.float32(0.01), beta=np.float32(0.9), eps=np.float64(1e-8),
                    weight_decay=np.float32(0.0))
    ps[0].grad = torch.randn(3)
    opt.step()


def test_deepspeed_adamw_keys():
    ps = [torch.nn.Parameter(torch.randn(3))]
    TiedAdamW(ps, torch_adam=True, adam_w_mode=True)  # a config written for AdamW
    with pytest.raises(ValueError, match="adam_w_mode=False.*decoupled"):
        TiedAdamW(ps, adam_w_mode=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided view"])
def test_non_contiguous_params_match_torch(backend, layout):
    def make(_):
        if layout == "channels_last":
            return torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        if layout == "transposed":
            return torch.randn(6, 7).t()
        return torch.randn(6, 10)[:, ::3]  # not dense: stepped through a working copy
    ours, theirs = pair(None, make=make)
    more, more_ref = pair(13)  # a second param: the table path (one alone goes flat)
    ours, theirs = ours + more, theirs + more_ref
    assert ours[0].stride() == theirs[0].stride()
    opt, ref = TiedAdamW(ours, lr=0.1, beta=0.9, backend=backend), torch_ref(theirs)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    assert_close(ours[1], theirs[1])
    assert ours[0].stride() == theirs[0].stride()
    assert_close(ours[0], theirs[0])
    assert_close(opt.state[ours[0]]["exp_avg"], ref.state[theirs[0]]["exp_avg"])


def test_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="appears twice"):
        TiedAdamW([p, p])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role", ["param", "exp_avg", "exp_avg_sq", "step"])
def test_tensor_repointed_in_place_is_followed(backend, role, guard_path):
    """``t.data = ...`` keeps a tensor's identity but moves its memory: the cached plan and
    address table must follow (a stale address would write freed memory)."""
    ours, theirs = pair(70, (9, 3), 5)
    opt, ref = TiedAdamW(ours, lr=0.1, beta=0.9, backend=backend), torch_ref(theirs)

    def repoint(step):
        if step == 2:
            t = ours[1] if role == "param" else opt.state[ours[1]][role]
            t.data = t.data.clone()
    step_both(opt, ref, ours, theirs, 4, before=repoint)
    for p, q in zip(ours, theirs):
        assert_close(p, q)
        assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


# Cached plans (Note [guard] in tiedadam/optim/guard.py) ----------------------------------------
# Each case keeps the identity of every object the plan holds but changes something the kernel
# relies on; the step after it must see the change (follow it, or refuse before anything moves).
# Each runs on both checks: the per-parameter comparison ("full") and the fast check armed
# after a step that passed it ("fast", Note [guard fast path]): the guard_path fixture
# (conftest.py).

def test_fast_guard_is_armed_and_used_in_the_steady_state(monkeypatch):
    """After a step that passed the full comparison, later steps take the fast check alone
    (a regression that kept it from arming would go unnoticed otherwise: it is only faster)."""
    if not guard.USE_FAST_GUARD:
        pytest.skip("this torch has no torch._C._dynamo.guards.TensorGuards / dict_version")
    ps, opt = _trained("torch", steps=3)
    full = introspect.full_checks(opt)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    assert introspect.full_checks(opt) == full
    opt.state[ps[1]]["exp_avg"] = opt.state[ps[1]]["exp_avg"].clone()  # a new dict version
    opt.step()
    assert introspect.full_checks(opt) == full + 1


def test_fast_guard_stays_off_where_dict_versions_do_not_change(monkeypatch):
    """A Python whose dict versions never change (or a torch whose tensor check accepts
    anything) would make the fast check blind: it is verified before it is first armed."""
    if not guard.USE_FAST_GUARD:
        pytest.skip("this torch has no torch._C._dynamo.guards.TensorGuards / dict_version")
    monkeypatch.setattr(_compat, "dict_version", lambda d: 0)
    monkeypatch.setattr(guard, "FAST_GUARD_VERDICT", None)  # the self-test runs again
    ps, opt = _trained("torch", steps=3)
    assert guard.FAST_GUARD_VERDICT is False
    assert not any(introspect.fast_guard_armed(opt))
    opt.state[ps[1]]["exp_avg"] = opt.state[ps[1]]["exp_avg"].clone()
    opt.step()  # the full comparison sees the new tensor (and builds a new plan)
    assert opt.state[ps[1]]["exp_avg"].data_ptr() in [
        t.data_ptr() for _, b in introspect.buckets(opt) for t in b.exp_avgs]


def _trained(backend, steps=2, **kw):
    ps = [torch.nn.Parameter(torch.randn(9, 3)), torch.nn.Parameter(torch.randn(70))]
    return trained(ps, steps, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit,error", [
    ("t_", r"exp_avg'\].*shape \(3, 9\)"),  # an in-place view op: same tensor, new shape
    ("view_dtype", r"exp_avg'\].*torch.int32"),  # same memory read as another dtype
    ("extra_key", r"holds 'master_param'"),  # a key the full check refuses
    ("grad_dtype", r"grad of .*dtype torch.float64"),
    ("grad_sparse", r"sparse gradients"),
])
def test_cached_plan_sees_edits_that_keep_identity(backend, edit, error, guard_path):
    ps, opt = _trained(backend)
    st = opt.state[ps[0]]
    if edit == "t_":
        st["exp_avg"].t_()
    elif edit == "view_dtype":
        st["exp_avg"].data = st["exp_avg"].data.view(torch.int32)
    elif edit == "extra_key":
        st["master_param"] = ps[0].detach().clone()
    elif edit == "grad_dtype":
        ps[0].grad_dtype = None  # torch >= 2.10 refuses the assignment otherwise
        ps[0].grad = ps[0].grad.double()
    else:
        ps[0].grad = ps[0].grad.to_sparse()
    snap = snapshot(opt, ps[1:])
    with pytest.raises(RuntimeError, match=error):
        opt.step()
    assert_unchanged(opt, ps[1:], snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["set_", "new_step_tensor", "moved_to_other_group"])
def test_cached_plan_follows_edits_it_can_take(backend, edit, guard_path):
    """Memory swapped under a kept identity (``set_``), a replaced step tensor, a param moved
    between groups: the next step uses the new memory / count / group, as torch does."""
    ours, theirs = pair(70, (9, 3), 5)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}]  # noqa: E731
    opt = TiedAdamW(groups(ours), lr=0.1, beta=0.9, backend=backend)
    ref = torch_ref(groups(theirs))

    def change(step):
        if step != 2:
            return
        if edit == "set_":
            for o, p in ((opt, ours[1]), (ref, theirs[1])):
                m = o.state[p]["exp_avg"]
                m.set_(m.clone())  # same tensor object, other storage
        elif edit == "new_step_tensor":
            for o, p in ((opt, ours[0]), (ref, theirs[0])):
                o.state[p]["step"] = torch.tensor(10.0)
        else:
            for o in (opt, ref):
                moved = o.param_groups[0]["params"].pop()
                o.param_groups[1]["params"].insert(0, moved)
    step_both(opt, ref, ours, theirs, 4, before=change)
    for p, q in zip(ours, theirs):
        assert_close(p, q)
        assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_hyperparameter_edited_in_place_is_checked(backend, guard_path):
    """Validated group values are remembered by identity; a tensor is mutable in place, so a
    tensor-valued hyperparameter is checked again at every step."""
    ps, opt = _trained(backend, eps=torch.tensor(1e-8))
    opt.param_groups[0]["eps"].fill_(float("nan"))
    snap = snapshot(opt, ps)
    with pytest.raises(ValueError, match="eps"):
        opt.step()
    assert_unchanged(opt, ps, snap)


# Reliability v3 ---------------------------------------------------------------------------------
STATE_FORMATS = ["float32", "bfloat16", "ratio8"]


# v3 row 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", STATE_FORMATS)
def test_finite_grads_whose_square_overflows_never_make_nan(backend, state_dtype):
    """|g| ~ 1e20: g*g overflows fp32, so v = inf, as torch.optim.AdamW's fp32 v holds it.
    torch's update is then m / inf = 0 and params stay finite; so in every state format (ratio8
    stored inf in its bf16 v and decoded 0 * inf = NaN the next step)."""
    ours, theirs = pair(64, 33)
    opt = TiedAdamW(ours, lr=1e-2, beta=0.9, backend=backend, state_dtype=state_dtype)
    ref = torch_ref(theirs, lr=1e-2)
    hit = torch.zeros(64, dtype=torch.bool)
    hit[::3] = True
    decay = torch.tensor(1 - 1e-2 * 1e-2, dtype=torch.float32)
    for step in range(4):
        grads = [torch.randn(64), torch.randn(33)]
        if step == 1:
            grads[0] = torch.where(hit, torch.randn(64).sign() * 1e20, grads[0])
            grads[1] = grads[1].sign() * 1e20
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = ours[0].detach().clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            assert torch.isfinite(p).all() and torch.isfinite(q).all()
            for k in ("exp_avg", "exp_avg_sq"):
                assert not opt.state[p][k].float().isnan().any(), k
            inf = ~torch.isfinite(ref.state[q]["exp_avg_sq"])
            assert not (inf & torch.isfinite(opt.state[p]["exp_avg_sq"].float())).any()
            if step >= 1:
                assert inf.any()
        if step >= 1:  # v = inf there: the update is 0, as torch's; the param only decays
            torch.testing.assert_close(ours[0][hit], before[hit] * decay, rtol=1e-7, atol=0)
        if state_dtype == "float32":
            assert_close(ours[0][~hit], theirs[0][~hit], torch.float32)
        else:  # the moments' rounding moves each update by a few percent of lr at most
            assert (ours[0][~hit] - theirs[0][~hit]).abs().max() <= 0.1 * 1e-2 * (step + 1)


# v3 rows 3, 4, 5 ------------------------------------------------------------------------------
def _two_group_opt(ps, backend, **kw):
    return TiedAdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}], lr=1e-2, beta=0.9,
                     backend=backend, stochastic_rounding=True, **kw)


def _grads(ps, steps):
    return [[torch.randn_like(p) for p in ps] for _ in range(steps)]


def _run(opt, ps, grads, before=None):
    for i, gs in enumerate(grads):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        if before is not None:
            before(i)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", [("state_dtype", "ratio8"), ("seed", 12345),
                                  ("state_dtype", "bfloat16")])
def test_option_edit_survives_a_step_refused_for_another_group(backend, edit):
    """Row 3: an option edit in group 0, then a step refused because of group 1 (a NaN lr),
    fixed, stepped on: the edit is applied, as in a run that made the edit without the
    refusal."""
    key, value = edit
    a = [torch.nn.Parameter(torch.randn(n)) for n in (40, 7, 9)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    grads = _grads(a, 4)
    extra = {} if key == "state_dtype" else {"state_dtype": "bfloat16"}
    oa, ob = _two_group_opt(a, backend, **extra), _two_group_opt(b, backend, **extra)
    _run(oa, a, grads[:2])
    _run(ob, b, grads[:2])
    oa.param_groups[0][key] = value
    oa.param_groups[1]["lr"] = float("nan")
    for p, g in zip(a, grads[2]):
        p.grad = g.clone()
    snap = snapshot(oa, a)
    with pytest.raises(ValueError, match="lr"):
        oa.step()
    assert_unchanged(oa, a, snap)
    oa.param_groups[1]["lr"] = 3e-3
    _run(oa, a, grads[2:])
    ob.param_groups[0][key] = value
    _run(ob, b, grads[2:])
    assert_same_run(oa, a, ob, b)
    assert oa.param_groups[0][key] == value


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_dict_replaced_by_an_edited_copy_is_an_edit(backend):
    """Row 4: ``param_groups[0] = {**g, "state_dtype": "ratio8"}`` converts as the in-place
    edit does; every checkpoint it writes loads (tiedadam refuses fp32 moments under a ratio8
    group)."""
    a = [torch.nn.Parameter(torch.randn(n)) for n in (40, 7, 9)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    grads = _grads(a, 4)
    oa, ob = _two_group_opt(a, backend), _two_group_opt(b, backend)
    _run(oa, a, grads[:2])
    _run(ob, b, grads[:2])
    oa.param_groups[0] = {**oa.param_groups[0], "state_dtype": "ratio8"}
    ob.param_groups[0]["state_dtype"] = "ratio8"
    sd = oa.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == torch.int8
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oc = _two_group_opt(c, backend)
    oc.load_state_dict(sd)
    _run(oa, a, grads[2:])
    _run(ob, b, grads[2:])
    _run(oc, c, grads[2:])
    assert_same_run(oa, a, ob, b)
    assert_same_run(oa, a, oc, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_moved_into_a_group_of_another_format_saves_that_format(backend):
    """Row 5: a param with fp32 moments moved by ``add_param_group`` into a ratio8 group;
    ``state_dict()`` before the next step saves what that step will use (ratio8), and loads."""
    a = [torch.nn.Parameter(torch.randn(n)) for n in (40, 7, 9)]
    opt = TiedAdamW(a, lr=1e-2, beta=0.9, backend=backend)
    _run(opt, a, _grads(a, 2))
    moved = a[2]
    del opt.param_groups[0]["params"][2]
    opt.add_param_group({"params": [moved], "state_dtype": "ratio8"})
    sd = opt.state_dict()
    assert sd["param_groups"][1]["state_dtype"] == "ratio8"
    assert sd["state"][2]["exp_avg"].dtype == torch.int8
    assert sd["state"][2]["exp_avg_sq"].dtype == torch.bfloat16
    assert sd["state"][0]["exp_avg"].dtype == torch.float32
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    other = TiedAdamW([{"params": b[:2]}, {"params": [b[2]], "state_dtype": "ratio8"}],
                      lr=1e-2, beta=0.9, backend=backend)
    other.load_state_dict(sd)
    grads = _grads(a, 2)
    _run(opt, a, grads)
    _run(other, b, grads)
    assert_same_run(opt, a, other, b)


# v3 row 11 ----------------------------------------------------------------------------------
def test_adam_checkpoint_without_weight_decay_loads():
    """An Adam checkpoint without weight decay is AdamW's: it loads (with L2 weight decay it is
    refused: test_checkpoint_of_another_update_rule_is_refused)."""
    ours, theirs = pair(6)
    plain = torch.optim.Adam(theirs, lr=1e-2, betas=(0.9, 0.9))
    theirs[0].grad = torch.randn(6)
    plain.step()
    opt = TiedAdamW(ours, backend="torch")
    opt.load_state_dict(plain.state_dict())
    assert float(opt.state[ours[0]]["step"]) == 1.0
