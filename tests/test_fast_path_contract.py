"""The fast paths keep the contract (docs/design.md §3): cached plans and their guard, the
kernel's step counts, the rounding streams and the compiled CPU step either work exactly like
torch.optim.AdamW(betas=(b, b)) or refuse before anything changes. One section per class of
input; both backends (Triton in its interpreter, torch) where both apply. Refusals are checked
bitwise: params, states and step counts as they were."""

from __future__ import annotations

import io
import warnings
import weakref

import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam import _compat
from tiedadam.optim import guard, introspect
from reference import assert_close
from twins import (Wrapped, assert_same_run, assert_unchanged, pair, snapshot, step_both,
                   torch_ref, trained)

BACKENDS = ["triton", "torch"]


def _two_buckets(backend, steps=2):
    """An fp32 and an fp64 param (two launches), trained ``steps`` steps."""
    ps = [torch.nn.Parameter(torch.randn(70)), torch.nn.Parameter(torch.randn(9, 3).double())]
    return trained(ps, steps, backend=backend)


def _save_load(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


# 1. Option edits between steps -----------------------------------------------------------------
EDITS = [  # (param dtype, options at construction, key, value set before step 3)
    (torch.float32, dict(state_dtype="bfloat16"), "seed", 4321),
    (torch.float32, dict(state_dtype="bfloat16"), "stochastic_rounding", False),
    (torch.bfloat16, dict(state_dtype="bfloat16"), "param_stochastic_rounding", True),
    (torch.bfloat16, {}, "master_weights", True),
    (torch.bfloat16, dict(master_weights=True), "master_weights", False),
    (torch.float32, {}, "state_dtype", "bfloat16"),
    (torch.float32, dict(state_dtype="bfloat16"), "state_dtype", torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,opts,key,value", EDITS,
                         ids=[f"{e[2]}={e[3]}" for e in EDITS])
def test_option_edit_steps_as_a_resumed_run(backend, dtype, opts, key, value):
    """An option edited between steps is honoured exactly as a run resumed from a checkpoint
    holding the new value: same params, same state (keys, dtypes, bits), and not what the run
    without the edit gives."""
    init = [torch.randn(300).to(dtype), torch.randn(7, 5).to(dtype)]
    grads = [[torch.randn(x.shape).to(dtype) for x in init] for _ in range(5)]

    def run(edit, resume):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = TiedAdamW(ps, lr=0.01, beta=0.9, backend=backend, seed=7, **opts)
        for t, gs in enumerate(grads):
            if t == 2 and edit:
                opt.param_groups[0][key] = value
                if resume:
                    saved = _save_load(opt)
                    opt = TiedAdamW(ps, lr=0.5, beta=0.5, backend=backend, seed=99, **opts)
                    opt.load_state_dict(saved)
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    whole, o1 = run(True, False)
    resumed, o2 = run(True, True)
    plain, o3 = run(False, False)
    assert_same_run(o1, whole, o2, resumed)
    assert not all(torch.equal(a, c) for a, c in zip(whole, plain)) or any(
        o1.state[a]["exp_avg"].dtype != o3.state[c]["exp_avg"].dtype
        for a, c in zip(whole, plain)), "the edit changed nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_edit_with_a_refused_step_changes_nothing(backend):
    """The conversion an edit asks for is staged: a step refused for another reason leaves the
    state as it was (fp32 moments), the next good step converts it."""
    ps, opt = _two_buckets(backend)
    opt.param_groups[0]["state_dtype"] = "bfloat16"
    ps[1].grad_dtype = None  # torch >= 2.10 refuses the assignment otherwise
    ps[1].grad = torch.randn(9, 3)  # float32 grad for the float64 param: refused
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="grad of .*dtype torch.float32"):
        opt.step()
    assert_unchanged(opt, ps, snap)
    ps[1].grad = ps[1].grad.double()
    opt.step()
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[ps[1]]["exp_avg"].dtype == torch.float64  # fp64 params keep fp64


# 2. ZeRO-3 sub-group partitions: one group dict, one partition per call -------------------------
def _sub_group_steps(opt, parts, grads):
    """What DeepSpeed ZeRO-3 does with ``sub_group_size``: each fp32 partition alone in the
    group, one ``step()`` each, in a fixed order; the group holds all of them in between (as
    when ZeRO-3 saves or loads)."""
    group = opt.param_groups[0]
    for p, g in zip(parts, grads):
        group["params"] = [p]
        p.grad = g.clone()
        opt.step()
    group["params"] = list(parts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sub_group_partitions_draw_their_own_noise_and_resume_bitwise(backend):
    values = torch.randn(300)
    grads = [[torch.randn(300)] * 3 for _ in range(4)]  # the same grad for all partitions

    def run(resume_at=None):
        parts = [torch.nn.Parameter(values.clone()) for _ in range(3)]
        opt = TiedAdamW(parts, lr=0.01, beta=0.9, backend=backend, state_dtype="bfloat16",
                        seed=11)
        for t, gs in enumerate(grads):
            if t == resume_at:
                saved = _save_load(opt)
                parts = [torch.nn.Parameter(p.detach().clone()) for p in parts]
                opt = TiedAdamW(parts, backend=backend, state_dtype="bfloat16")
                opt.load_state_dict(saved)
            _sub_group_steps(opt, parts, gs)
        return parts, opt

    parts, opt = run()
    # identical values and grads: only the rounding noise can tell the partitions apart
    m = [opt.state[p]["exp_avg"] for p in parts]
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2])
    resumed, opt2 = run(resume_at=2)
    for a, b in zip(parts, resumed):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], opt2.state[b]["exp_avg_sq"])


# 3 and 5. Grads the kernel cannot walk in place: no storage of their own, the negative bit ------
ODD_GRADS = {
    "no-storage": lambda g: Wrapped(g.clone()),  # a wrapper subclass: data_ptr() is 0
    "negative-bit": lambda g: torch._neg_view(-g),  # what x.conj().imag is: memory holds -g
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ODD_GRADS)
@pytest.mark.parametrize("shapes", [[(33,)], [(33,), (4, 5)]], ids=["flat", "table"])
def test_odd_grad_steps_as_torch(backend, kind, shapes, guard_path):
    """Read through a copy, as torch's AdamW reads them. The first two steps arm the cached
    plan with plain grads; the odd grads after them must be seen by the guard."""
    ours, theirs = pair(*shapes)
    opt, ref = TiedAdamW(ours, lr=0.1, beta=0.9, backend=backend), torch_ref(theirs)
    for step in range(4):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            q.grad = g
            p.grad = ODD_GRADS[kind](g) if step >= 2 else g.clone()
        opt.step()
        ref.step()
    assert ours[0].grad.data_ptr() == 0 if kind == "no-storage" else ours[0].grad.is_neg()
    for p, q in zip(ours, theirs):
        assert_close(p, q)
        assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ODD_GRADS)
def test_odd_grad_in_an_amp_step_is_replaced_by_the_unscaled_grad(backend, kind):
    """The unscaled grad (Note [amp] in the kernel) cannot be written into such a grad: p.grad
    becomes the unscaled copy."""
    ps = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(3, 3))]
    opt = TiedAdamW(ps, lr=0.1, backend=backend)
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = ODD_GRADS[kind](g * 8)
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    for p, g in zip(ps, grads):
        assert type(p.grad) is torch.Tensor and not p.grad.is_neg() and torch.equal(p.grad, g)


# 4. DTensor grads with other placements than their param ----------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fast_guard", [True, False], ids=["fast", "full"])
def test_dtensor_grad_with_other_placements_is_refused_on_every_rank(backend, fast_guard):
    import placement_ranks
    from distributed import run_ranks
    for rank_out in run_ranks(placement_ranks.mismatched_grads, backend, fast_guard):
        for r in rank_out:
            assert r["error"] is not None and "placements" in r["error"], r["case"]
            assert "redistribute" in r["error"] and r["unchanged"], r["case"]
            assert r["step"] == 3  # two steps, the refused one not counted, the fixed one
            torch.testing.assert_close(r["ours"], r["theirs"], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
def test_randomized_dtensor_placements_match_torch_or_are_refused(backend):
    """The cross-check's DTensor part (tests/test_crosscheck.py), on two ranks."""
    import os
    import placement_ranks
    from distributed import run_ranks
    seed = int.from_bytes(os.urandom(4), "little")
    outs = run_ranks(placement_ranks.random_cases, seed, 12, backend)
    for rank_out in outs:
        assert len(rank_out) == 12
        for r in rank_out:
            assert r["max_diff"] <= 1e-5, (seed, r)
    assert sum(r["refused"] for r in outs[0]) > 0 and sum(r["stepped"] for r in outs[0]) > 0, seed


# 5. Params and state with the negative bit ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role", ["param", "exp_avg"])
def test_param_or_state_with_the_negative_bit_is_refused(backend, role, guard_path):
    ps, opt = _two_buckets(backend)
    t = ps[0] if role == "param" else opt.state[ps[0]][role]
    t.data = torch._neg_view(-t.data)  # same values read, other memory contents
    snap = snapshot(opt, ps[1:])
    with pytest.raises(RuntimeError, match="negative bit"):
        opt.step()
    assert_unchanged(opt, ps[1:], snap)


# 6. Tensor hyperparameters ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["eps", "weight_decay", "lr"])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-dim"])
def test_one_element_tensor_hyperparameters_step_as_torch(backend, key, shape):
    """Validation accepts a 1-element tensor for lr, eps and weight decay; the step takes it
    (torch's fused op wants floats for eps and weight decay, and shape-(1,) tensors for none)."""
    values = dict(lr=0.05, eps=1e-3, weight_decay=0.1)
    ours, theirs = pair(33, (4, 5))
    kw = dict(values, **{key: torch.full(shape, values[key], dtype=torch.float64)})
    opt = TiedAdamW(ours, beta=0.9, backend=backend, **kw)
    ref = torch.optim.AdamW(theirs, betas=(0.9, 0.9), foreach=False, **values)
    step_both(opt, ref, ours, theirs, 3)
    for p, q in zip(ours, theirs):
        assert_close(p, q)
        assert float(opt.state[p]["step"]) == 3


# 7. Params whose elements share memory -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_param_is_refused_before_anything_changes(backend):
    ok = torch.nn.Parameter(torch.randn(12))
    wide = torch.nn.Parameter(torch.randn(1, 5).double().expand(4, 5))
    opt = TiedAdamW([ok, wide], lr=0.1, backend=backend)
    ok.grad, wide.grad = torch.randn(12), torch.randn(4, 5).double()
    snap = snapshot(opt, [ok, wide])
    with pytest.raises(RuntimeError, match=r"expanded view.*stride 0.*share memory"):
        opt.step()
    assert_unchanged(opt, [ok, wide], snap)
    assert not opt.state  # no state was created either


# 8. Global settings that change under the compiled CPU step -------------------------------------
def test_recompile_limit_falls_back_to_torch_ops_with_one_warning(monkeypatch):
    """dynamo guards the compiled CPU step on global state (here: deterministic algorithms);
    once it refuses to recompile, the step takes the torch-op path for the rest of the process,
    warned once, never failing mid-step (Note [cpu fallback])."""
    from tiedadam.kernels import tied_adamw_cpu as C
    from tiedadam.optim import torch_backend
    from reference import ref_step
    monkeypatch.setattr(torch_backend, "USE_COMPILED_CPU_STEP", True)
    C.reset_fallback()
    # config.patch, not monkeypatch: undoing a monkeypatch of dynamo's config module leaves
    # recompile_limit unreadable, and every later compile in the process fails
    limit = torch._dynamo.config.patch(recompile_limit=1)
    limit.__enter__()
    was = torch.are_deterministic_algorithms_enabled()
    p = torch.nn.Parameter(torch.randn(4096))
    opt = TiedAdamW([p], lr=0.01, beta=0.9, backend="torch", state_dtype="bfloat16",
                    stochastic_rounding=False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 5):
                torch.use_deterministic_algorithms(step % 2 == 0)
                w0 = p.detach().clone()
                st = {k: v.clone() for k, v in opt.state[p].items()}
                p.grad = torch.randn(4096)
                opt.step()
                if st:
                    want, _, _ = ref_step(w0, p.grad, st["exp_avg"], st["exp_avg_sq"], step,
                                          lr=0.01, beta=0.9, eps=1e-8, weight_decay=1e-2)
                    torch.testing.assert_close(p.detach().double(), want, rtol=1e-3, atol=1e-4)
                assert float(opt.state[p]["step"]) == step
        assert not C.compiled_available()
    finally:
        torch.use_deterministic_algorithms(was)
        limit.__exit__(None, None, None)
        C.reset_fallback()
        C.reset_fallback()  # later tests of this process compile again
    msgs = [str(w.message) for w in caught if "compiled CPU step failed" in str(w.message)]
    assert len(msgs) == 1 and "global settings" in msgs[0]


# 9. The fast check's self-test ------------------------------------------------------------------
class _StrideBlind:
    """A tensor check like dynamo's, but blind to strides (as a torch that ignored them)."""

    def __init__(self, *ts, **kw):
        self.ref = [self._key(t) for t in ts]

    @staticmethod
    def _key(t):
        return type(t), tuple(t.shape), t.dtype, t.layout, t.is_neg()

    def check(self, *ts):
        return [self._key(t) for t in ts] == self.ref


def test_fast_guard_self_test_refuses_a_stride_blind_tensor_check(monkeypatch):
    if not guard.USE_FAST_GUARD:
        pytest.skip("this torch has no dynamo TensorGuards / dict_version")
    assert _compat.fast_guard_works()
    monkeypatch.setattr(_compat, "TensorGuards", _StrideBlind)
    assert not _compat.fast_guard_works()


# 10. Keys of AdamW and DeepSpeed configs --------------------------------------------------------
def test_harmless_adamw_config_keys_are_accepted():
    ours, theirs = pair(9)
    opt = TiedAdamW(ours, lr=0.1, beta=0.9, amsgrad=False, fused=True, foreach=False,
                    bias_correction=True, differentiable=False, torch_adam=True,
                    adam_w_mode=True)
    step_both(opt, torch_ref(theirs), ours, theirs, 2)
    assert_close(ours[0], theirs[0])
    assert set(opt.state_dict()["param_groups"][0]).isdisjoint(
        {"fused", "foreach", "bias_correction", "differentiable", "torch_adam"})


@pytest.mark.parametrize("key,value,reason", [
    ("amsgrad", True, "no AMSGrad"), ("bias_correction", False, "c = 1 - beta"),
    ("differentiable", True, "autograd"), ("fused", "yes", "True or False")])
def test_config_keys_that_mean_something_else_are_refused(key, value, reason):
    with pytest.raises((ValueError, TypeError), match=f"{key}.*{reason}|{reason}"):
        TiedAdamW([torch.nn.Parameter(torch.randn(3))], **{key: value})


# 11. Storage freed or shrunk under a tensor -----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role", ["param", "exp_avg", "exp_avg_sq", "step", "grad"])
@pytest.mark.parametrize("how", ["freed", "shrunk"])
def test_storage_resized_under_a_tensor_is_refused(backend, role, how, guard_path):
    ps, opt = _two_buckets(backend, steps=3)
    t = {"param": ps[0], "grad": ps[0].grad}.get(role)
    if t is None:
        t = opt.state[ps[0]][role]
    keep = t.detach().clone()
    snap = snapshot(opt, ps[1:])
    storage = t.untyped_storage()
    storage.resize_(0 if how == "freed" else storage.nbytes() // 2)
    with pytest.raises(RuntimeError, match=r"storage.*(freed or shrunk)"):
        opt.step()
    assert_unchanged(opt, ps[1:], snap)
    storage.resize_(keep.numel() * keep.element_size())  # as FSDP grows it back
    t.detach().copy_(keep)
    opt.step()  # the same tensors step again


def test_fresh_plan_refuses_a_freed_param_storage():
    """The full check (first step, no cached plan) compares storage sizes too."""
    ok, p = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(8))
    opt = TiedAdamW([ok, p], backend="triton")
    ok.grad, p.grad = torch.randn(5), torch.randn(8)
    p.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"params'\]\[1\].*reaches 32 bytes.*holds 0"):
        opt.step()
    assert not opt.state


# The step-count buffers a captured CUDA graph uses outlive a rebuilt plan ------------------------
def test_buffers_used_in_a_graph_capture_outlive_a_rebuilt_plan(monkeypatch):
    """Note [graph buffers]: on CPU, the capture is pretended (no CUDA graphs here); the GPU
    suite captures and replays for real (tests/test_gpu.py)."""
    from tiedadam.optim import triton_backend
    ps = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(3, 4))]
    opt = TiedAdamW(ps, lr=0.1, backend="triton")
    for p in ps:
        p.grad = torch.randn_like(p)
    monkeypatch.setattr(triton_backend, "capturing", lambda device: True)
    opt.step()
    monkeypatch.setattr(triton_backend, "capturing", lambda device: False)
    (plan,) = introspect.plans(opt)
    (table,) = introspect.tables(opt)
    held = [weakref.ref(plan.buckets[0][1].tickets), weakref.ref(table.addr)]
    opt.state.clear()  # new state: new plan, new tables and tickets
    introspect.evict_tables(opt)  # as when the table cache is full
    opt.step()
    del plan, table
    import gc
    gc.collect()
    assert all(r() is not None for r in held), "a buffer the captured graph uses was freed"
