"""The stochastic-rounding streams (Note [rng streams] in tiedadam/optim/rng.py, Note [rng] in
the kernel): the kernel's Philox is tl.philox's function; different tensors get independent
noise (same group, other groups, other buckets, DeepSpeed's one-group-per-call steps, shards
of one DTensor on two ranks); replicas of a plain tensor on two ranks round identically.

Independence is tested on the rounding decisions themselves: with SR, an fp32 value whose low
16 bits are ``lo`` rounds up (its high half changes) with probability p = lo / 65536. Two
tensors holding the same fp32 values give up-indicators u1, u2; under independent noise
z = sum((u1 - p)(u2 - p)) / sqrt(sum(p^2 (1-p)^2)) is ~N(0, 1); under shared noise it is tens
to hundreds."""

from __future__ import annotations


import pytest
import torch
import triton
import triton.language as tl

from distributed import run_ranks
import rng_ranks
from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw as K

N = 1 << 14
BETA = 0.95


def rounded_up(state_bf16: torch.Tensor, exact: torch.Tensor):
    """(up-indicator, probability of rounding up) per element for an SR bf16 value."""
    hi = state_bf16.view(torch.int16).to(torch.int32) & 0xFFFF
    bits = exact.view(torch.int32)
    up = (hi != ((bits >> 16) & 0xFFFF)).double()
    p = (bits & 0xFFFF).double() / 65536
    return up, p


def z_shared(a, b):
    (u1, p), (u2, _) = a, b
    return float(((u1 - p) * (u2 - p)).sum() / ((p * p * (1 - p) ** 2).sum()).sqrt())


def z_bias(a):
    u, p = a
    return float((u - p).sum() / (p * (1 - p)).sum().sqrt())


def exact_m(g):
    return torch.tensor(1 - BETA, dtype=torch.float64).float() * g  # lerp from m = 0, fp32


def make(n_params, backend, groups=None, seed=3, g=None):
    g = torch.randn(N) if g is None else g
    params = [torch.nn.Parameter(torch.zeros(N)) for _ in range(n_params)]
    for p in params:
        p.grad = g.clone()
    kw = dict(lr=1e-3, beta=BETA, weight_decay=0.0, state_dtype="bfloat16",
              stochastic_rounding=True, seed=seed, backend=backend)
    spec = params if groups is None else [{"params": [params[i] for i in idx]} for idx in groups]
    return TiedAdamW(spec, **kw), params, exact_m(g)


BACKENDS = ["torch", "triton"]


@triton.jit
def _both_philox(out, key, c_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    c0 = tl.load(c_ptr + i).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + N + i).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + 2 * N + i).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + 3 * N + i).to(tl.uint32, bitcast=True)
    a0, a1, a2, a3 = K._philox(key, c0, c1, c2, c3)
    b0, b1, b2, b3 = tl.philox(key, c0, c1, c2, c3, n_rounds=K.PHILOX_ROUNDS)
    tl.store(out + i, a0.to(tl.int32, bitcast=True))
    tl.store(out + N + i, a1.to(tl.int32, bitcast=True))
    tl.store(out + 2 * N + i, a2.to(tl.int32, bitcast=True))
    tl.store(out + 3 * N + i, a3.to(tl.int32, bitcast=True))
    tl.store(out + 4 * N + i, b0.to(tl.int32, bitcast=True))
    tl.store(out + 5 * N + i, b1.to(tl.int32, bitcast=True))
    tl.store(out + 6 * N + i, b2.to(tl.int32, bitcast=True))
    tl.store(out + 7 * N + i, b3.to(tl.int32, bitcast=True))


def test_kernel_philox_is_triton_philox():
    n = 256
    counters = torch.randint(-2**31, 2**31 - 1, (4, n), dtype=torch.int64).to(torch.int32)
    out = torch.empty(8, n, dtype=torch.int32)
    key = int(torch.randint(0, 2**62, ()))
    _both_philox[(1,)](out, key, counters, N=n)
    assert torch.equal(out[:4], out[4:]), "the kernel's Philox differs from tl.philox"
    assert len(set(out[0].tolist())) > n * 0.99  # and it is not constant


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_of_one_group_round_independently(backend):
    opt, (a, b, c), exact = make(3, backend)
    opt.step()
    ra, rb, rc = (rounded_up(opt.state[p]["exp_avg"], exact) for p in (a, b, c))
    for x, y in ((ra, rb), (ra, rc), (rb, rc)):
        assert abs(z_shared(x, y)) < 5
    for x in (ra, rb, rc):
        assert abs(z_bias(x)) < 5  # unbiased: rounds up as often as p says
    assert abs(z_shared(ra, ra)) > 50  # the statistic sees shared noise when there is some


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_and_deepspeed_style_calls_round_independently(backend):
    # Two groups of one tensor each; as ZeRO-1/2 do, step() sees one group at a time through a
    # swapped param_groups list, so each tensor is index 0 of group 0 of its call.
    g = torch.randn(N)
    opt, (a, b), exact = make(2, backend, groups=[[0], [1]], g=g)
    groups = opt.param_groups
    for group in groups:
        opt.param_groups = [group]
        opt.step()
    opt.param_groups = groups
    ra, rb = (rounded_up(opt.state[p]["exp_avg"], exact) for p in (a, b))
    assert abs(z_shared(ra, rb)) < 5
    # ... and as in a plain run, where both are stepped in one call: the same streams
    opt2, (a2, b2), _ = make(2, backend, groups=[[0], [1]], g=g)
    opt2.step()
    assert torch.equal(opt2.state[a2]["exp_avg"], opt.state[a]["exp_avg"])
    assert torch.equal(opt2.state[b2]["exp_avg"], opt.state[b]["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproduces_and_changes_the_noise(backend):
    g = torch.randn(N)
    opt1, (a1,), exact = make(1, backend, seed=11, g=g)
    opt2, (a2,), _ = make(1, backend, seed=11, g=g)
    opt3, (a3,), _ = make(1, backend, seed=12, g=g)
    for o in (opt1, opt2, opt3):
        o.step()
    m1, m2, m3 = (o.state[p]["exp_avg"] for o, p in ((opt1, a1), (opt2, a2), (opt3, a3)))
    assert torch.equal(m1.view(torch.int16), m2.view(torch.int16))
    assert abs(z_shared(rounded_up(m1, exact), rounded_up(m3, exact))) < 5


def test_dtensor_shards_on_two_ranks_round_independently_and_replicas_alike():
    # The kernel path (the torch path takes the same stream keys from rng.py).
    n = 1 << 12
    (sharded0, plain0), (sharded1, plain1) = run_ranks(rng_ranks.sharded_and_replicated,
                                                       "triton", n)
    (m0, exact), (m1, _) = sharded0, sharded1
    r0, r1 = (rounded_up(m.view(torch.bfloat16), exact) for m in (m0, m1))
    assert abs(z_shared(r0, r1)) < 5, "the two shards of one DTensor drew the same noise"
    # A plain tensor may be a DDP replica: its copies must stay bit-identical (Note [rng
    # streams]), so every rank rounds it alike.
    assert torch.equal(plain0[0], plain1[0])
