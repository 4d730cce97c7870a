"""The native CPU step (tiedadam/kernels/native_cpu.cpp, built at first use): against the
Triton kernel in its interpreter, bit for bit when rounding to nearest, through TiedAdamW;
against the compiled step's own math run eagerly with correctly rounded square roots (what the
compiled step and the interpreter compute; eager CPU torch.sqrt is not correctly rounded), bit
for bit in every mode, stochastic rounding included (the same counter-based hash). The rest of
the suite runs with TIEDADAM_CPU_NATIVE=0 (conftest.py); this module turns it on."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam.kernels import native_cpu as N
from tiedadam.kernels import tied_adamw_cpu as C
from tiedadam.optim import torch_backend

SIZES = [0, 1, 15, 16, 17, 33, 1000, 70001]  # around one vector and one block; an odd tail


@pytest.fixture(autouse=True)
def native(monkeypatch):
    monkeypatch.setattr(torch_backend, "USE_NATIVE_CPU_STEP", True)
    monkeypatch.setattr(torch_backend, "USE_COMPILED_CPU_STEP", False)
    if N.load() is None:
        pytest.fail(f"the native CPU step did not build here: {N.unavailable_reason()}")


def _ieee_sqrt(monkeypatch):
    """Correctly rounded sqrt for the eager reference: through fp64, which rounds an fp32
    square root correctly."""
    sq = torch.Tensor.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: sq(x.double()).float())
    monkeypatch.setattr(torch.Tensor, "sqrt",
                        lambda x: sq(x.double()).float() if x.dtype == torch.float32 else sq(x))
    monkeypatch.setattr(torch, "rsqrt", lambda x: 1.0 / sq(x.double()).float())


def _inputs(n, pdtype, mdtype, master):
    p = torch.randn(n).to(pdtype)
    g = (torch.randn(n) * 10 ** torch.empty(n).uniform_(-3, 1)).to(pdtype)
    if n > 4:
        g[1], g[2], g[3] = float("nan"), float("inf"), 1e20  # NaN stays NaN; v overflows
    if mdtype == torch.int8:
        v = (torch.rand(n) + 0.1).to(torch.bfloat16)
        m = torch.randint(-60, 60, (n,), dtype=torch.int8)
    else:
        m = (torch.randn(n) * 0.1).to(mdtype)
        v = (torch.rand(n) + 0.01).to(mdtype)
    w = p.float() + 1e-3 if master else None
    return [p, g, m, v, w]


MODES = [(pd, md, master, scale, ssr, psr)
         for pd, md, master, scale, ssr, psr in itertools.product(
             [torch.float32, torch.bfloat16, torch.float16],
             [torch.float32, torch.bfloat16, torch.int8], [False, True], [False, True],
             [False, True], [False, True])
         if not (psr and (pd != torch.bfloat16 or master)) and not (ssr and md == torch.float32)
         and not (pd == torch.float32 and master)]


def test_every_mode_and_size_is_the_compiled_steps_math_bit_for_bit(monkeypatch):
    """Every (param dtype, moment format, master, AMP scale, state/param stochastic rounding)
    and sizes around a vector and a block: params, grads (unscaled), moments and masters equal
    tied_adamw_cpu.tied_adamw_step run eagerly with correctly rounded square roots; NaN, inf
    and overflowing grads among them."""
    _ieee_sqrt(monkeypatch)
    keys = torch.tensor([12345, -678], dtype=torch.int32)
    for (pd, md, master, scale, ssr, psr), n in itertools.product(MODES, SIZES):
        ours = _inputs(n, pd, md, master)
        ref = [None if x is None else x.clone() for x in ours]
        s = C.scalars(1e-2, 0.9, 1e-8, 0.1, 3.0, 1 / 1024 if scale else 1.0, 0.7)
        assert N.run(*ours, s, keys, has_scale=scale, state_sr=ssr, param_sr=psr)
        with torch.no_grad():
            C.tied_adamw_step(*ref, s, keys, master, scale, ssr, psr)
        for role, a, b in zip("pgmvw", ours, ref):
            if a is not None:
                same = torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                assert same, f"{role} differs: {pd} {md} master={master} scale={scale} " \
                             f"state_sr={ssr} param_sr={psr} n={n}"


# the modes that reach the native step through TiedAdamW on CPU (the others are torch's fused op)
OPT_MODES = {
    "bf16-state": dict(dtype=torch.float32, state_dtype="bfloat16"),
    "ratio8": dict(dtype=torch.float32, state_dtype="ratio8"),
    "bf16-master": dict(dtype=torch.bfloat16, master_weights=True),
    "fp16-master": dict(dtype=torch.float16, master_weights=True),
    "bf16-param-fp32-state": dict(dtype=torch.bfloat16),
    "bf16-master-ratio8": dict(dtype=torch.bfloat16, master_weights=True, state_dtype="ratio8"),
}


@pytest.mark.parametrize("mode", OPT_MODES)
@pytest.mark.parametrize("amp", [False, True])
def test_nearest_rounding_matches_the_kernel_bit_for_bit(mode, amp, monkeypatch):
    """Through TiedAdamW (backend "torch", the CPU route ZeRO-Offload takes) against the Triton
    kernel in its interpreter, rounding to nearest: every size in one native call per step,
    AMP's scale with a skipped overflow step, clipping, four steps."""
    kw = dict(OPT_MODES[mode])
    dtype = kw.pop("dtype")
    a = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in SIZES]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    hyper = dict(lr=1e-2, beta=0.9, weight_decay=0.1, stochastic_rounding=False,
                 max_grad_norm=5.0, **kw)
    ta, tb = TiedAdamW(a, backend="torch", **hyper), TiedAdamW(b, backend="triton", **hyper)
    ran, run = [], N.run_many
    monkeypatch.setattr(N, "run_many",
                        lambda *x, **k: ran.append(run(*x, **k)) or ran[-1])
    for t in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape).to(dtype)
            if amp:
                g = g * 256
                if t == 2 and g.numel():
                    g[0] = float("inf")
            x.grad, y.grad = g.clone(), g.clone()
        for o in (ta, tb):
            if amp:
                o.grad_scale = torch.tensor(256.0)
                o.found_inf = torch.tensor(1.0 if t == 2 else 0.0)
            o.step()
    # one native call per step for all the group's tensors (none on the skipped step)
    assert len(ran) == (3 if amp else 4) and all(bool(r.all()) and len(r) == len(SIZES)
                                                 for r in ran)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for k in ta.state[x]:
            assert torch.equal(ta.state[x][k], tb.state[y][k]), k


@pytest.mark.parametrize("mode", ["bf16-state", "ratio8", "pure-bf16"])
def test_stochastic_rounding_resumes_bit_for_bit(mode):
    """Stochastic rounding through the native step: a run saved and loaded after two steps
    continues exactly as the uninterrupted one, and the seed changes the bits."""
    kw = {"bf16-state": dict(state_dtype="bfloat16"), "ratio8": dict(state_dtype="ratio8"),
          "pure-bf16": dict(state_dtype="bfloat16", param_stochastic_rounding=True)}[mode]
    dtype = torch.bfloat16 if mode == "pure-bf16" else torch.float32
    grads = [[torch.randn(n).to(dtype) for n in (5000, 17)] for _ in range(4)]

    def train(seed, steps, opt=None, ps=None):
        ps = ps or [torch.nn.Parameter(torch.ones(n).to(dtype)) for n in (5000, 17)]
        opt = opt or TiedAdamW(ps, lr=1e-2, beta=0.9, backend="torch", seed=seed, **kw)
        for gs in steps:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    whole, _ = train(7, grads)
    ps, opt = train(7, grads[:2])
    sd = opt.state_dict()
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = TiedAdamW(ps2, lr=1e-2, beta=0.9, backend="torch", seed=7, **kw)
    opt2.load_state_dict(sd)
    resumed, _ = train(7, grads[2:], opt2, ps2)
    other, _ = train(8, grads)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))
    assert not all(torch.equal(a, b) for a, b in zip(whole, other))


def test_index_path_past_2_31_draws_the_compiled_steps_bits():
    """Element indices past 2**31 (a partition that large: Note [cpu index]) on a window of
    indices: the bits are lowbias32 rounds of (i ^ (i >> 32)) as int32, as the compiled step
    draws them (its wide path), without a tensor of that size."""
    keys = torch.tensor([99, -5], dtype=torch.int32)
    for base in (0, 2 ** 31 - 7, 2 ** 32 - 3, 3 * 2 ** 33 + 11):
        idx = torch.arange(base, base + 40, dtype=torch.int64)
        lo = (idx ^ (idx >> 32)).to(torch.int32)
        for stream in (0, C._STREAM1):
            h = C._lowbias32(C._lowbias32(lo ^ keys[0]) ^ keys[1])
            if stream:
                h = C._lowbias32(h ^ stream)
            got = N.load().bits(base, 40, int(keys[0]), int(keys[1]), bool(stream))
            assert torch.equal(got, h), (base, stream)
    n = 100
    assert torch.equal(N.load().bits(0, n, 99, -5, False), C.random_bits(n, keys))
    assert torch.equal(N.load().bits(0, n, 99, -5, False), C.random_bits(n, keys, wide=True))


def test_without_a_build_the_step_falls_back_with_one_warning(monkeypatch):
    """No compiler (or a build error): one warning, then torch ops; the step still matches."""
    import torch.utils.cpp_extension as ext
    monkeypatch.setattr(N, "_module", None)
    monkeypatch.setattr(N, "_broken", None)
    monkeypatch.setattr(ext, "load", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("no C++ compiler")))
    ps = [torch.nn.Parameter(torch.randn(100))]
    opt = TiedAdamW(ps, lr=1e-2, state_dtype="bfloat16", backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            ps[0].grad = torch.randn(100)
            opt.step()
    msgs = [str(w.message) for w in caught if "native CPU step" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]
    assert float(opt.state[ps[0]]["step"]) == 3.0 and torch.isfinite(ps[0]).all()


TEL_MODES = {
    "fp32": dict(dtype=torch.float32),  # telemetry takes fp32 tensors off torch's fused op
    "bf16-state": dict(dtype=torch.float32, state_dtype="bfloat16"),
    "ratio8": dict(dtype=torch.float32, state_dtype="ratio8"),
    "bf16-master": dict(dtype=torch.bfloat16, master_weights=True),
}
TEL_TOL = {"grad_sq_sum": 1e-5, "update_sq_sum": 1e-5, "update_abs_max": 1e-6}


@pytest.mark.parametrize("mode", TEL_MODES)
def test_telemetry_in_the_native_pass_matches_the_kernel(mode, monkeypatch):
    """TiedAdamW(telemetry=True) on the native step (Note [native telemetry]): one call per
    step computes the rows in its pass; they equal the Triton kernel's (interpreter) within fp32
    summation order, the counts exactly (the high-SNR count within one element of the
    threshold), NaN/inf grads counted, and params and states stay bit for bit the kernel's. The
    params' step counts differ (one joined two steps late: each tensor's own scalars)."""
    kw = dict(TEL_MODES[mode])
    dtype = kw.pop("dtype")
    sizes = [1, 17, 1000, 70001]
    a = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    hyper = dict(lr=1e-2, beta=0.9, weight_decay=0.1, stochastic_rounding=False,
                 telemetry=True, snr_threshold=0.3, **kw)
    ta, tb = TiedAdamW(a, backend="torch", **hyper), TiedAdamW(b, backend="triton", **hyper)
    calls, run = [], N.run_many
    monkeypatch.setattr(N, "run_many", lambda *x, **k: calls.append(k["rows"] is not None)
                        or run(*x, **k))
    for t in range(4):
        for i, (x, y) in enumerate(zip(a, b)):
            g = (torch.randn(x.shape) * 10.0 ** torch.randint(-3, 2, ())).to(dtype)
            if i == 2 and t == 3:
                g[5], g[9] = float("nan"), float("inf")
            x.grad, y.grad = (None, None) if i == 0 and t < 2 else (g.clone(), g.clone())
        ta.step()
        tb.step()
        ra, rb = ta.telemetry(), tb.telemetry()
        assert list(ra) == list(rb)
        for name in ra:
            for k, tol in TEL_TOL.items():
                torch.testing.assert_close(ra[name][k], rb[name][k], rtol=tol, atol=0,
                                           equal_nan=True, msg=f"{name}.{k} at step {t}")
            assert float(ra[name]["nonfinite_grads"]) == float(rb[name]["nonfinite_grads"])
            assert abs(float(ra[name]["high_snr_count"]) - float(rb[name]["high_snr_count"])) <= 1
        assert float(ra["0.2"]["nonfinite_grads"]) == (2.0 if t == 3 else 0.0)
    assert calls == [True] * 4
    assert [float(ta.state[p]["step"]) for p in a] == [2.0, 4.0, 4.0, 4.0]
    for x, y in zip(a, b):  # bit for bit, NaN where the NaN grad went
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        for k in ta.state[x]:
            torch.testing.assert_close(ta.state[x][k], tb.state[y][k], rtol=0, atol=0,
                                       equal_nan=True, msg=k)


def test_the_native_entry_checks_what_it_writes_through():
    """The native entry checks every tensor before the first write (Note [native many]): a
    size that disagrees with the param is an error naming the role and nothing is written; a
    layout or dtype set the loop does not walk (a non-contiguous state, fp64, a state dtype
    that does not pair) is left untouched and reported as not taken, for the next route."""
    mod = N.load()
    p, g = torch.randn(100), torch.randn(100)
    m, v = torch.zeros(100, dtype=torch.bfloat16), torch.zeros(100, dtype=torch.bfloat16)
    s = torch.cat([C.scalars(1e-2, 0.9, 1e-8, 0.0, 1.0), torch.tensor([0.1])])[None]
    keys = torch.zeros(1, 2, dtype=torch.int32)

    def call(**change):
        a = dict(p=p, g=g, m=m, v=v, w=None) | change
        return mod.step_many([a["p"]], [a["g"]], [a["m"]], [a["v"]], [a["w"]], s, keys,
                             False, False, False, None, 0.0)

    before = p.clone()
    for change, role in [(dict(g=torch.randn(99)), "grad"),
                         (dict(m=torch.zeros(101, dtype=torch.bfloat16)), "exp_avg"),
                         (dict(w=torch.zeros(7)), "master")]:
        with pytest.raises(RuntimeError, match=role):
            call(**change)
        assert torch.equal(p, before)
    for change in [dict(m=torch.zeros(200, dtype=torch.bfloat16)[::2]),
                   dict(p=p.double(), g=g.double()), dict(v=torch.zeros(100)),
                   dict(g=g.bfloat16())]:
        assert call(**change).tolist() == [False]
        assert torch.equal(p, before)
    assert call().tolist() == [True] and not torch.equal(p, before)
