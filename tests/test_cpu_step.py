"""The compiled one-pass CPU step (tiedadam/kernels/tied_adamw_cpu.py) against the Triton kernel
in its interpreter: bit for bit when rounding to nearest, in distribution when rounding
stochastically (the two draw their bits from different generators, Note [cpu rng]).

The rest of the suite runs with TIEDADAM_CPU_COMPILE=0 (conftest.py); this module turns the
compiled path on for its own optimizers."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from unittest import mock

import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw_cpu as C
from tiedadam.optim import torch_backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.setattr(torch_backend, "USE_COMPILED_CPU_STEP", True)


# (param dtype, state dtype, master weights): the modes torch's fused AdamW does not cover
# (bf16 params with bf16 states and nearest rounding are torch's own fused op's case): bf16
# moments; master weights with bf16 moments; a bf16 param rounded from fp32 math without a
# master. (fp16 + master differs from bf16 + master only in the final cast, torch's own; each
# mode is a separate compile, tens of seconds on the CI machine.)
MODES = [(torch.float32, torch.bfloat16, False), (torch.bfloat16, torch.bfloat16, True),
         (torch.bfloat16, torch.float32, False)]


def train(backend, pdtype, sdtype, master, *, sr=False, psr=False, n=3001, steps=3, seed=7,
          grads=None, scaler=None):
    """A param (n elements, odd: a vector tail) trained ``steps`` steps; same grads for every
    backend. Returns (param, state)."""
    p = torch.nn.Parameter(grads[0].to(pdtype) if grads else torch.randn(n).to(pdtype))
    opt = TiedAdamW([p], lr=1e-2, beta=0.9, weight_decay=0.1, backend=backend,
                    state_dtype=sdtype, master_weights=master, stochastic_rounding=sr,
                    param_stochastic_rounding=psr, seed=seed)
    for g in grads[1:steps + 1]:
        p.grad = g.to(pdtype).clone()
        if scaler is not None:
            p.grad *= scaler
            opt.grad_scale = torch.tensor(scaler)
            opt.found_inf = torch.tensor(0.0)
        opt.step()
    return p.detach(), opt.state[p]


def grads_for(n, steps=3):
    return [torch.randn(n)] + [torch.randn(n) * 10 ** torch.empty(n).uniform_(-4, 0)
                               for _ in range(steps)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1]}-master{m[2]}"[6:])
def test_nearest_rounding_matches_the_kernel_bit_for_bit(mode):
    gs = grads_for(3001)
    ours, st = train("torch", *mode, grads=gs)
    ref, rst = train("triton", *mode, grads=gs)
    assert set(st) == set(rst)
    for k in st:
        assert st[k].dtype == rst[k].dtype
        assert torch.equal(st[k], rst[k]), k
    assert torch.equal(ours, ref)
    assert C.compile_seconds, "the compiled step did not run"


def test_amp_unscaling_matches_the_kernel_bit_for_bit():
    gs = grads_for(1000)
    ours, st = train("torch", torch.float32, torch.bfloat16, False, grads=gs, scaler=1024.0)
    ref, rst = train("triton", torch.float32, torch.bfloat16, False, grads=gs, scaler=1024.0)
    assert torch.equal(ours, ref)
    assert all(torch.equal(st[k], rst[k]) for k in st)


def _ulp_position(x32: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Where the exact fp32 value x lies between its two bf16 neighbours (0 = the lower one,
    1 = the upper one), checking that ``r`` is one of them."""
    lo = (x32.view(torch.int32) & -65536).view(torch.float32)  # truncation toward zero
    hi_bits = (x32.view(torch.int32) & -65536) + 65536
    hi = hi_bits.view(torch.float32)
    r32 = r.float()
    assert bool(((r32 == lo) | (r32 == hi) | (x32 == lo)).all()), "not a neighbour"
    return ((x32 - lo) / (hi - lo)).double()


@pytest.mark.parametrize("what", ["state", "param"])
def test_stochastic_rounding_is_unbiased_and_matches_the_kernel_in_distribution(what):
    """One step from a known state: the fp32 result is computed in fp64 from the same inputs;
    both backends must round each element to one of its bf16 neighbours, up with probability
    equal to its position between them."""
    n = 30_000
    gs = [torch.randn(n), torch.randn(n)]
    kw = dict(sr=True) if what == "state" else dict(psr=True)
    pdtype, sdtype = ((torch.float32, torch.bfloat16) if what == "state"
                      else (torch.bfloat16, torch.float32))
    results = {}
    for backend in ("torch", "triton"):
        p, st = train(backend, pdtype, sdtype, False, steps=1, grads=gs, **kw)
        results[backend] = st["exp_avg_sq"] if what == "state" else p
    # The fp32 value before rounding, as both compute it: v = 0 * beta + ((1 - beta) * g) * g
    # in fp32 for the state; for the param, what the same step stores as its fp32 master.
    if what == "state":
        exact = (torch.tensor(1 - 0.9, dtype=torch.float32) * gs[1]) * gs[1]
    else:
        p, st = train("triton", torch.bfloat16, torch.float32, True, steps=1, grads=gs)
        exact = st["master_param"]
    up = {}
    for backend, r in results.items():
        pos = _ulp_position(exact, r)
        rounded_up = (r.float() != (exact.view(torch.int32) & -65536).view(torch.float32))
        inexact = pos > 0
        # E[rounded up] = position: the mean difference is ~N(0, sqrt(sum p(1-p)))
        diff = (rounded_up[inexact].double() - pos[inexact]).sum()
        sd = (pos[inexact] * (1 - pos[inexact])).sum().sqrt()
        assert abs(float(diff / sd)) < 5, (backend, float(diff / sd))
        up[backend] = rounded_up
    # Same distribution, different draws: the two agree where the rounding is forced and on
    # about as many elements as independent draws would.
    agree = (up["torch"] == up["triton"]).double().mean()
    assert 0.5 < float(agree) < 0.999


def test_stochastic_rounding_is_reproducible_and_varies_with_seed_step_and_tensor():
    gs = grads_for(5000, steps=2)
    a = train("torch", torch.float32, torch.bfloat16, False, sr=True, grads=gs, steps=2)[1]
    b = train("torch", torch.float32, torch.bfloat16, False, sr=True, grads=gs, steps=2)[1]
    c = train("torch", torch.float32, torch.bfloat16, False, sr=True, grads=gs, steps=2,
              seed=8)[1]
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"],
                                                                   b["exp_avg_sq"])
    assert not torch.equal(a["exp_avg_sq"], c["exp_avg_sq"])
    # element-level noise: neighbouring keys (tensors) and steps give unrelated bits
    keys = torch.tensor([1, 2], dtype=torch.int32)
    r0 = C.random_bits(100_000, keys) & 0xFFFF
    r1 = C.random_bits(100_000, keys + torch.tensor([1, 0], dtype=torch.int32)) & 0xFFFF
    r2 = C.random_bits(100_000, keys + torch.tensor([0, 1], dtype=torch.int32)) & 0xFFFF
    for other in (r1, r2):
        corr = torch.corrcoef(torch.stack([r0.double(), other.double()]))[0, 1]
        assert abs(float(corr)) < 0.02
    u = r0.double() / 65536
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


def test_wide_index_draws_the_same_bits_as_the_int32_index():
    # Note [cpu index]: tensors of 2**31 elements or more hash an int64 index with its high
    # word folded in; below 2**31 that is the int32 index's value, so both give the same bits.
    # (A 2**31-element tensor is 8 GB: the wide graph is checked eagerly, on a small tensor.)
    keys = torch.randint(-2 ** 31, 2 ** 31, (2,), dtype=torch.int64).to(torch.int32)
    for stream in (0, C._STREAM1):
        assert torch.equal(C.random_bits(4099, keys, stream, wide=True),
                           C.random_bits(4099, keys, stream, wide=False))
    n = 4099
    s = C.scalars(1e-2, 0.9, 1e-8, 0.1, 3.0)
    base = [torch.randn(n), torch.randn(n), torch.randn(n), torch.rand(n)]
    outs = []
    for wide in (False, True):
        p, g, m, v = (t.clone() for t in base)
        p, m, v = p.bfloat16(), m.bfloat16(), v.bfloat16()
        C.tied_adamw_step(p, g.bfloat16(), m, v, None, s, keys, False, False, True, True, wide)
        outs.append((p, m, v))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# NaNs as x86 arithmetic passes them on (sign and payload of an input NaN kept): the GPU's
# 0x7FFFFFFF, its negation, x86's default 0xFFC00000, torch's 0x7FC00000, a negative NaN whose
# high half is 0xFFFF, and a signalling one with a low payload (Note [cpu nan])
NAN_BITS = [0x7FFFFFFF, -1, -0x400000, 0x7FC00000, -0x10000 + 0x1234, 0x7F800001]


def test_every_nan_stays_nan_under_stochastic_rounding():
    """Both stochastic roundings of the CPU (the compiled step's and the torch-op path's) keep
    every NaN a NaN, whatever its sign and payload, for the largest noise and random noise;
    they used to carry 0x7FFFFFFF into -0.0 and 0xFFFFFFFF into +0.0."""
    x = torch.tensor(NAN_BITS * 50, dtype=torch.int32).view(torch.float32)
    for r in (torch.full(x.shape, 0xFFFF, dtype=torch.int32),
              torch.randint(0, 1 << 16, x.shape, dtype=torch.int32)):
        assert C.round_bf16(x, r).isnan().all()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    torch_backend.stochastic_round_to_bf16_(out, x, torch.Generator().manual_seed(3))
    assert out.isnan().all()


def test_nan_grads_of_any_sign_and_payload_leave_nan_moments_in_the_compiled_step():
    """A NaN grad makes that element's param and both bf16 moments NaN (not +-0.0 or inf), and
    every other element is the fp64 reference's, bit for bit (Note [cpu nan])."""
    n = 4099
    s = C.scalars(1e-2, 0.9, 1e-8, 0.1, 3.0)
    keys = torch.randint(-2 ** 31, 2 ** 31, (2,), dtype=torch.int64).to(torch.int32)
    g = torch.randn(n)
    where = torch.randperm(n)[:600]
    g.view(torch.int32)[where] = torch.tensor(NAN_BITS * 100, dtype=torch.int32)
    p, m, v = torch.randn(n), (0.1 * torch.randn(n)).bfloat16(), (0.1 * torch.rand(n)).bfloat16()
    want = _reference_step(p, g, m, v, None, s, keys, True, False)
    p.requires_grad_()
    with torch.no_grad():
        assert C.run(p.view(-1), g.view(-1), m.view(-1), v.view(-1), None, s, keys,
                     has_scale=False, state_sr=True, param_sr=False)
    nan = g.isnan()
    for got, ref in zip((p.detach(), m, v), want):
        assert got.isnan().equal(nan)
        as_int = torch.int16 if got.itemsize == 2 else torch.int32
        assert torch.equal(got[~nan].view(as_int), ref[~nan].view(as_int))


def test_nan_and_inf_survive_stochastic_rounding():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0 + 2 ** -9, 1.0, 3.0e38])
    for noise, up in ((0xFFFF, True), (0, False)):
        out = C.round_bf16(x, torch.full((6,), noise, dtype=torch.int32)).float()
        assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf")
        assert out[3] == (1.0 + 2 ** -7 if up else 1.0)  # between two bf16s: noise decides
        assert out[4] == 1.0  # exact in bf16: never moved


def test_without_a_compiler_falls_back_with_one_warning(tmp_path):
    """No C++ compiler: one RuntimeWarning, then the torch-op path, same results."""
    script = """
import warnings, torch
from tiedadam import TiedAdamW
warnings.simplefilter("always")
out = []
for backend_env in range(2):
    p = torch.nn.Parameter(torch.arange(64.0) / 64)
    opt = TiedAdamW([p], lr=0.1, backend="torch", state_dtype="bfloat16",
                    stochastic_rounding=False)
    with warnings.catch_warnings(record=True) as w:
        for _ in range(3):
            p.grad = torch.linspace(-1, 1, 64)
            opt.step()
    out.append(p.detach().clone())
    print("warnings", sum("the compiled CPU step failed" in str(x.message) for x in w))
print("same", torch.equal(out[0], out[1]))
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CC=str(tmp_path / "no-cc"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), TIEDADAM_CPU_COMPILE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["warnings", "1", "warnings", "0", "same", "True"], proc.stdout


def _reference_step(p, g, m, v, w, s, keys, sr, psr):
    """tied_adamw_step's math in fp64 with every operation rounded to fp32 (no contraction),
    then its roundings: (param, exp_avg, exp_avg_sq, master or None)."""
    decay, omb, beta, coef, step_size, bc_sqrt, eps, _ = (s[i].double() for i in range(8))
    f32 = lambda x: x.float().double()  # noqa: E731
    gf, mf, vf = g.double(), m.double(), v.double()
    pf = f32((w if w is not None else p).double() * decay)
    d = f32(gf - mf)
    mf = f32((mf if omb < 0.5 else gf) + f32(coef * d))
    vf = f32(f32(vf * beta) + f32(f32(omb * gf) * gf))
    q = f32(mf / f32(f32(f32(vf.sqrt()) / bc_sqrt) + eps))
    pf = f32(pf - f32(step_size * q)).float()
    mf, vf = mf.float(), vf.float()
    r = C.random_bits(p.numel(), keys)  # integer ops: exact in eager
    if m.dtype == torch.bfloat16:
        mf = C.round_bf16(mf, r & 0xFFFF if sr else None)
        vf = C.round_bf16(vf, C._shr(r, 16) if sr else None)
    pn = (C.round_bf16(pf, C.random_bits(p.numel(), keys, C._STREAM1) & 0xFFFF) if psr
          else pf.to(p.dtype))
    return pn, mf, vf, (pf if w is not None else None)


# The modes compiled above (each compile is tens of seconds): nearest, and stochastic rounding
# of the states and of the param.
COMPILED = [(torch.float32, torch.bfloat16, False, False, False),
            (torch.bfloat16, torch.bfloat16, True, False, False),
            (torch.float32, torch.bfloat16, False, True, False),
            (torch.bfloat16, torch.float32, False, False, True)]


@pytest.mark.parametrize("mode", COMPILED,
                         ids=lambda m: f"{m[0]}-{m[1]}-master{m[2]}-sr{m[3]}-psr{m[4]}"[6:])
def test_compiled_step_matches_an_fp64_reference_bit_for_bit(mode):
    """The compiled step against its math in fp64, each operation rounded to fp32, and its
    rounding construction run eagerly (integer ops: exact), bit for bit, stochastic rounding
    included: checks inductor's code (the 16-wide tile, the vector bit casts of Note [vector
    bitcast]) on a main loop and a tail. (Eager torch ops are no such reference: they differ
    from it in the last bit of a few params.)"""
    pdtype, sdtype, master, sr, psr = mode
    n = 4099
    s = C.scalars(1e-2, 0.9, 1e-8, 0.1, 3.0)
    keys = torch.randint(-2 ** 31, 2 ** 31, (2,), dtype=torch.int64).to(torch.int32)
    base = [torch.randn(n), torch.randn(n), 0.1 * torch.randn(n), 0.1 * torch.rand(n),
            torch.randn(n)]
    p, g, m, v, w = (t.clone() for t in base)
    p, g, m, v = p.to(pdtype), g.to(pdtype), m.to(sdtype), v.to(sdtype)
    w = w if master else None
    want = _reference_step(p, g, m, v, w, s, keys, sr, psr)
    p.requires_grad_()
    with torch.no_grad():  # flat views of a Parameter, as the optimizer passes them: the
        # graphs compiled by the tests above serve (no recompilation)
        assert C.run(p.view(-1), g.view(-1), m.view(-1), v.view(-1),
                     None if w is None else w.view(-1), s, keys, has_scale=False,
                     state_sr=sr, param_sr=psr)
    outs = [[p, m, v, w], want]
    for a, b in zip(*outs):
        if a is None:
            continue
        assert a.dtype == b.dtype
        assert torch.equal(a.view(torch.int16) if a.itemsize == 2 else a.view(torch.int32),
                           b.view(torch.int16) if b.itemsize == 2 else b.view(torch.int32))


def _bits_fn(name, salt):
    """A function of its own (code object named ``name``: dynamo caches per code object) with
    the stochastic step's integer pieces: bit casts both ways and an int32 arange."""
    def f(x, k):
        r = torch.arange(x.numel(), dtype=torch.int32) ^ k ^ salt
        return ((x.view(torch.int32) + (r & 0xFFFF)) & -65536).view(torch.float32)
    code = f.__code__.replace(co_name=name)
    return types.FunctionType(code, f.__globals__, name, None, f.__closure__)


def _compile_and_read(fn, *args, **options):
    """(result, the C++ inductor generated for it; empty if it came from a cache)."""
    from torch._inductor.graph import GraphLowering
    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        out = torch.compile(fn, dynamic=True, fullgraph=True, options=options)(*args)
    return out, "\n".join(codes)


