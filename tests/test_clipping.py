"""max_grad_norm: clip-by-global-norm inside the step (tiedadam/optim/clipping.py, Note
[clipping] in tiedadam/kernels/tied_adamw.py), against torch.nn.utils.clip_grad_norm_ followed
by torch.optim.AdamW(betas=(b, b)) or by TiedAdamW itself. Sharded norms: tests/test_fsdp.py;
DeepSpeed's refusal: tests/test_deepspeed.py."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from reference import assert_close
from tiedadam import TiedAdamW
from tiedadam.optim import torch_backend
from tiedadam.optim.telemetry import to_floats

BACKENDS = ["triton", "torch"]
HYPER = dict(lr=1e-2, beta=0.9, weight_decay=0.1)
SIZES = (1000, 37, 5000)


def fresh(dtype=torch.float32, sizes=SIZES):
    return [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in sizes]


def twin(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def two_groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.3, 1e4], ids=["clipped", "unclipped"])
def test_matches_clip_grad_norm_then_torch_adamw(backend, dtype, max_norm):
    ps = fresh(dtype)
    ref = twin(ps)
    opt = TiedAdamW(two_groups(ps), backend=backend, max_grad_norm=max_norm, **HYPER)
    ropt = torch.optim.AdamW(two_groups(ref), lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1,
                             foreach=False)
    for _ in range(4):
        grads = [torch.randn_like(p) * 2 for p in ps]
        for p, r, g in zip(ps, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step()
        ropt.step()
        assert (float(norm) > max_norm) == (max_norm < 1), float(norm)
        # the norm clip_grad_norm_ returns, in its dtype (fp64 for fp64 grads)
        assert opt.last_grad_norm.dtype == norm.dtype
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-12 if
                                   dtype == torch.float64 else 1e-6, atol=0)
        for p, g in zip(ps, grads):  # the grads are left as given, not clipped
            assert torch.equal(p.grad, g)
        for p, r in zip(ps, ref):
            if dtype == torch.float64:
                torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
            else:
                assert_close(p, r)
            assert_close(opt.state[p]["exp_avg"].float(), ropt.state[r]["exp_avg"].float(),
                         torch.float32)


MODES = {  # every mode of an fp32 param: the clipped grad is the same fp32 product
    "fp32": {},
    "bf16-state-sr": dict(state_dtype="bfloat16", stochastic_rounding=True),
    "bf16-state-nearest": dict(state_dtype="bfloat16", stochastic_rounding=False),
    "ratio8": dict(state_dtype="ratio8"),
}


def assert_same_as_clipping_first(kw, sizes=SIZES, steps=3, max_norm=0.5):
    """TiedAdamW(max_grad_norm) against clip_grad_norm_ then TiedAdamW, same grads, bit for
    bit after every step (params and every state tensor)."""
    ps = fresh(sizes=sizes)
    ref = twin(ps)
    opt = TiedAdamW(ps, max_grad_norm=max_norm, **kw)
    ropt = TiedAdamW(ref, **kw)
    for _ in range(steps):
        for p, r in zip(ps, ref):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step()
        ropt.step()
        for p, r in zip(ps, ref):
            assert torch.equal(p, r)
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][k], ropt.state[r][k]), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_same_bits_as_clipping_the_grads_first(backend, mode):
    """g * coef in the kernel is the product clip_grad_norm_ writes (same fp32 coefficient, as
    torch computes it): TiedAdamW(max_grad_norm) equals clip_grad_norm_ then TiedAdamW, bit
    for bit, rounding noise included."""
    assert_same_as_clipping_first(dict(backend=backend, seed=11, **MODES[mode], **HYPER))


@pytest.mark.parametrize("mode", ["bf16-state-nearest", "ratio8"])
def test_compiled_cpu_step_clips_as_the_kernel(mode, monkeypatch):
    """The compiled one-pass CPU step (ZeRO-Offload's) reads the coefficient from its scalars:
    the same bits as clipping the grads first, as on the other paths."""
    monkeypatch.setattr(torch_backend, "USE_COMPILED_CPU_STEP", True)
    from tiedadam.kernels import tied_adamw_cpu as C
    C.reset_fallback()
    ran, run = [], C.run
    monkeypatch.setattr(C, "run", lambda *a, **k: ran.append(run(*a, **k)) or ran[-1])
    assert_same_as_clipping_first(dict(backend="torch", seed=5, **MODES[mode], **HYPER),
                                  sizes=(4000, 33), steps=2)
    assert ran and all(ran)  # every tensor of both optimizers went through the compiled step


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_and_bf16_params_clip_in_fp32(backend):
    """bf16 params with fp32 master weights: the norm is clip_grad_norm_'s on the bf16 grads
    (each tensor's norm rounded to bf16, bit for bit), and the kernel clips the upcast grad in
    fp32 (no bf16 rounding of the clipped grad), so it tracks the fp64 reference fed the grads
    times that coefficient."""
    ps = fresh(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().double()) for p in ps]
    opt = TiedAdamW(ps, backend=backend, master_weights=True, max_grad_norm=0.5, **HYPER)
    ropt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    for _ in range(3):
        for p, r in zip(ps, ref):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.double()
        norm = torch.nn.utils.get_total_norm([p.grad for p in ps])
        assert norm.dtype == torch.bfloat16
        coef = (0.5 / (norm + 1e-6)).clamp(max=1.0)
        for r in ref:
            r.grad.mul_(coef.double())
        opt.step()
        assert torch.equal(opt.last_grad_norm, norm)
        ropt.step()
    for p, r in zip(ps, ref):
        assert_close(opt.state[p]["master_param"], r.float(), torch.float32)
        assert_close(p, r.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_unscale_then_clip(backend):
    """GradScaler: the norm is the unscaled grads', the grads hold their unscaled (not clipped)
    values afterwards, an overflow step changes nothing; as unscale_ + clip_grad_norm_ +
    AdamW."""
    ps = fresh(sizes=(300, 7))
    ref = twin(ps)
    opt = TiedAdamW(ps, backend=backend, max_grad_norm=0.2, **HYPER)
    ropt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    x = [torch.randn_like(p) for p in ps]
    for step in range(4):
        loss = sum((p * xi).sum() ** 2 for p, xi in zip(ps, x))
        scaler.scale(loss).backward()
        if step == 2:
            ps[1].grad[3] = float("inf")
            snap = [p.detach().clone() for p in ps], [opt.state[p]["step"].clone() for p in ps]
        scale = float(scaler.get_scale())
        grads = [p.grad.clone() / scale for p in ps]
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert all(torch.equal(p, p0) for p, p0 in zip(ps, snap[0]))
            assert all(torch.equal(opt.state[p]["step"], s0) for p, s0 in zip(ps, snap[1]))
            assert not math.isfinite(float(opt.last_grad_norm))
        else:
            for p, g in zip(ps, grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)
            rl = sum((r * xi).sum() ** 2 for r, xi in zip(ref, x))
            rl.backward()
            norm = torch.nn.utils.clip_grad_norm_(ref, 0.2)
            assert float(norm) > 0.2
            torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-5, atol=0)
            ropt.step()
            ropt.zero_grad()
        opt.zero_grad()
    assert float(opt.state[ps[0]]["step"]) == 3.0
    for p, r in zip(ps, ref):
        assert_close(p, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_norm_skips_the_step_and_is_not_counted(backend, bad):
    ps = fresh()
    opt = TiedAdamW(ps, backend=backend, max_grad_norm=1.0, telemetry=True, **HYPER)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps], [
        {k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[2].grad[17] = bad
    given = [p.grad.clone() for p in ps]
    opt.step()
    for p, p0, s0, g in zip(ps, *before, given):
        assert torch.equal(p, p0)
        assert all(torch.equal(opt.state[p][k], s0[k]) for k in s0)
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)  # as given
    assert float(opt.state[ps[0]]["step"]) == 1.0
    clip = opt.telemetry()["(clip)"]
    assert float(clip["skipped"]) == 1.0 and not math.isfinite(float(clip["grad_norm"]))
    for p in ps:  # the next finite step goes on as usual
        p.grad = torch.randn_like(p)
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 2.0 and float(opt.telemetry()["(clip)"]["skipped"]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_telemetry_sees_the_clipped_grad(backend):
    ps = fresh()
    opt = TiedAdamW(ps, backend=backend, max_grad_norm=0.5, telemetry=True,
                    names=["a", "b", "c"], **HYPER)
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    tel = opt.telemetry()
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    coef = 0.5 / (float(norm) + 1e-6)
    torch.testing.assert_close(tel["(clip)"]["grad_norm"], norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(float(tel["(clip)"]["clip_coef"]), coef, rtol=1e-6, atol=0)
    for name, g in zip("abc", grads):
        torch.testing.assert_close(tel[name]["grad_sq_sum"].double(),
                                   ((g.double() * coef) ** 2).sum(), rtol=1e-5, atol=0)
    flat = to_floats(tel)
    assert flat["telemetry/clip/grad_norm"] == pytest.approx(float(norm), rel=1e-6)
    assert flat["telemetry/all/grad_norm"] == pytest.approx(0.5, rel=1e-5)  # clipped to 0.5
    assert not any(k.startswith("telemetry/(clip)") for k in flat)


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-1.0, ValueError),
                                      (float("nan"), ValueError), (float("inf"), ValueError),
                                      ("1.0", TypeError), (True, TypeError),
                                      (torch.tensor(1.0), TypeError)])
def test_bad_max_grad_norm_is_refused_by_name(bad, err):
    with pytest.raises(err, match="max_grad_norm"):
        TiedAdamW(fresh(), max_grad_norm=bad)
    opt = TiedAdamW(fresh(), max_grad_norm=1.0)
    with pytest.raises(err, match="max_grad_norm"):
        opt.max_grad_norm = bad
    assert opt.max_grad_norm == 1.0  # unchanged by the refused edit


def test_norm_process_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="norm_process_group"):
        TiedAdamW(fresh(), max_grad_norm=1.0, norm_process_group="world")


def test_fsdp1_shards_without_a_group_are_refused_before_anything_changes():
    """FSDP1 marks its flat params (and, with use_orig_params, the originals) with
    ``_fsdp_flattened``; a 2-rank FSDP1 run of the same refusal: tests/test_fsdp.py."""
    ps = fresh()
    ps[0]._fsdp_flattened = True
    opt = TiedAdamW(ps, max_grad_norm=1.0, backend="torch", **HYPER)
    for p in ps:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="norm_process_group=model.process_group"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_edits_and_copies(backend):
    """Settable between steps (None turns clipping off); deepcopy and pickle carry it; it is an
    optimizer option, not param-group state, so state_dict() holds no trace of it."""
    ps = fresh()
    ref = twin(ps)
    opt = TiedAdamW(ps, backend=backend, max_grad_norm=0.5, **HYPER)
    ropt = TiedAdamW(ref, backend=backend, **HYPER)
    for clip_now in (True, False, True):
        opt.max_grad_norm = 0.5 if clip_now else None
        for p, r in zip(ps, ref):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        if clip_now:
            torch.nn.utils.clip_grad_norm_(ref, 0.5)
        opt.step()
        ropt.step()
        assert all(torch.equal(p, r) for p, r in zip(ps, ref))
    assert copy.deepcopy(opt).max_grad_norm == 0.5
    assert pickle.loads(pickle.dumps(opt)).max_grad_norm == 0.5
    sd = opt.state_dict()
    assert all("max_grad_norm" not in g for g in sd["param_groups"])
    other = TiedAdamW(twin(ps), backend=backend, max_grad_norm=2.0, **HYPER)
    other.load_state_dict(sd)
    assert other.max_grad_norm == 2.0


def test_no_grads_norm_is_zero_as_torch_returns_it():
    """A step without grads: the norm is 0 (what clip_grad_norm_ returns for no grads), also
    after a clipped step, whose norm it replaces (reliability v3, row 10)."""
    ps = fresh()
    opt = TiedAdamW(ps, max_grad_norm=1.0, telemetry=True)
    opt.step()
    assert float(opt.last_grad_norm) == 0.0 and not opt.state
    for p in ps:
        p.grad = torch.randn_like(p) * 10
    opt.step()
    assert float(opt.last_grad_norm) > 1.0
    opt.zero_grad()
    opt.step()
    assert torch.equal(opt.last_grad_norm, torch.nn.utils.clip_grad_norm_([], 1.0))
    clip = opt.telemetry()["(clip)"]
    assert float(clip["grad_norm"]) == 0.0 and float(clip["clip_coef"]) == 1.0
    assert float(clip["skipped"]) == 0.0


# Reliability v3 -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["torch-compiled"])
def test_fp16_master_weights_amp_clipping_with_small_grads(backend, monkeypatch):
    """Row 2: fp16 params with master weights, GradScaler, max_grad_norm, unscaled grads ~1e-7
    (below fp16's normal range): the unscaling is done in fp32, as on the Triton path, so the
    master weights follow AdamW on the unscaled, clipped grads (unscaled in place in fp16 they
    underflowed and the masters ended more than a step of lr off)."""
    sizes = (300, 7)
    ran, compiled = [], backend == "torch-compiled"
    if compiled:  # ZeRO-Offload's compiled CPU step
        from tiedadam.kernels import tied_adamw_cpu as C
        monkeypatch.setattr(torch_backend, "USE_COMPILED_CPU_STEP", True)
        C.reset_fallback()
        run = C.run
        monkeypatch.setattr(C, "run", lambda *a, **k: ran.append(run(*a, **k)) or ran[-1])
        backend = "torch"
    master0 = [torch.randn(n) for n in sizes]
    ps = [torch.nn.Parameter(m.to(torch.float16)) for m in master0]
    ref = [torch.nn.Parameter(p.detach().double()) for p in ps]
    opt = TiedAdamW(ps, backend=backend, master_weights=True, max_grad_norm=1e-6, **HYPER)
    ropt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    scale = 2.0 ** 16
    for _ in range(3):
        grads = [torch.randn(n) * 1e-7 for n in sizes]
        for p, r, g in zip(ps, ref, grads):
            p.grad = (g * scale).to(torch.float16)
            r.grad = p.grad.double() / scale  # what the fp16 grads hold, unscaled exactly
        opt.grad_scale = torch.tensor(scale)
        opt.found_inf = torch.tensor(0.0)
        unscaled = [p.grad.float() / scale for p in ps]
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1e-6)
        assert float(norm) > 1e-6  # clipped
        ropt.step()
        torch.testing.assert_close(opt.last_grad_norm.double(), norm, rtol=1e-5, atol=0)
        for p, u in zip(ps, unscaled):  # the grads hold the unscaled values, rounded to fp16
            assert torch.equal(p.grad, u.to(torch.float16))
    for p, r in zip(ps, ref):
        torch.testing.assert_close(opt.state[p]["master_param"].double(), r.detach(),
                                   rtol=0, atol=1e-2 * 1e-3)  # a thousandth of a step of lr
    assert all(ran) and bool(ran) == compiled  # compiled: every tensor went through it


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_param_dtypes_clip_as_clip_grad_norm(backend):
    """Row 7: one bf16 (and one fp16) param among fp32 ones. The norm is clip_grad_norm_'s bit
    for bit (each grad's norm in its own dtype, then promoted), so fp32 params are bit for bit
    those of clip_grad_norm_ then the step (TiedAdamW's, fed the clipped grads), and within
    fp32 rounding of torch's AdamW; the bf16/fp16 params' clipped grads are not rounded to
    their dtype (clip_grad_norm_ writes them back rounded), so those agree to that rounding."""
    dtypes = (torch.float32, torch.bfloat16, torch.float32, torch.float16)
    ps = [torch.nn.Parameter(torch.randn(n).to(d)) for n, d in zip((500, 300, 37, 64), dtypes)]
    first = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = [torch.nn.Parameter(p.detach().double()) for p in ps]
    opt = TiedAdamW(ps, backend=backend, max_grad_norm=0.5, **HYPER)
    fopt = TiedAdamW(first, backend=backend, **HYPER)
    ropt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    for _ in range(3):
        for p, f, r in zip(ps, first, ref):
            p.grad = (torch.randn(p.shape) * 3).to(p.dtype)
            f.grad, r.grad = p.grad.clone(), p.grad.double()
        norm = torch.nn.utils.clip_grad_norm_(first, 0.5)
        for r in ref:
            r.grad.mul_(((0.5 / (norm + 1e-6)).clamp(max=1.0)).double())
        opt.step()
        fopt.step()
        ropt.step()
        assert opt.last_grad_norm.dtype == norm.dtype and torch.equal(opt.last_grad_norm, norm)
    for p, f, r in zip(ps, first, ref):
        if p.dtype == torch.float32:
            assert torch.equal(p, f)
            assert_close(p, r.float())
        else:  # against the step fed clip_grad_norm_'s grads, rounded to bf16/fp16 (a
            # relative 2**-9 of g, so of each update): within that of lr per step, plus the
            # param's own rounding each step may then take the other way
            eps = torch.finfo(p.dtype).eps
            torch.testing.assert_close(p.double(), f.double(), rtol=2 * eps,
                                       atol=3 * 1e-2 * 2.0 ** -8 + 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_norm_beyond_fp32_does_not_skip_a_finite_step(backend):
    """Suspected in the v3 report, confirmed: under AMP the norm is taken on the scaled grads;
    with fp32 accumulation their sum of squares overflowed where the unscaled norm is finite
    (here ~1e21 scaled, ~3e3 unscaled), and the step was skipped without GradScaler knowing
    (its flags saw finite grads), so its scale would keep growing. The per-tensor norms are
    now taken in fp64 with the scale divided out: the step is taken, as unscale_ +
    clip_grad_norm_ + AdamW takes it."""
    ps = fresh(sizes=(1000, 37))
    ref = twin(ps)
    opt = TiedAdamW(ps, backend=backend, max_grad_norm=1.0, **HYPER)
    ropt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    scale = 2.0 ** 60
    for _ in range(2):
        grads = [torch.randn(p.shape) * 100 for p in ps]
        for p, r, g in zip(ps, ref, grads):
            p.grad, r.grad = g * scale, g.clone()
        assert not math.isfinite(float(torch.stack([(p.grad ** 2).sum() for p in ps]).sum()))
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ropt.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
    assert float(opt.state[ps[0]]["step"]) == 2.0
    for p, r in zip(ps, ref):
        assert_close(p, r)


def test_norm_beyond_fp32_without_amp_skips_as_documented():
    """Without AMP a norm whose fp32 sum of squares overflows is inf, as clip_grad_norm_'s is:
    the step is skipped (Note [global norm]) and says so."""
    ps = fresh(sizes=(1000,))
    opt = TiedAdamW(ps, max_grad_norm=1.0, telemetry=True, **HYPER)
    ps[0].grad = torch.randn(1000) * 1e20
    assert not math.isfinite(float(torch.nn.utils.get_total_norm([ps[0].grad])))
    before = ps[0].detach().clone()
    opt.step()
    assert torch.equal(ps[0], before) and not opt.state[ps[0]] or \
        float(opt.state[ps[0]]["step"]) == 0.0
    assert math.isinf(float(opt.last_grad_norm))
    assert float(opt.telemetry()["(clip)"]["skipped"]) == 1.0
