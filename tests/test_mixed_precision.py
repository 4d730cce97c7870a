"""Mixed-precision modes: fp32 master weights, bf16 states with stochastic rounding, bf16 params
with stochastic rounding, AMP grad scaling, state accounting. Both backends."""

from __future__ import annotations

import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw as K
from reference import assert_close, ref_step

BACKENDS = ["triton", "torch"]
SIZES = [1, 3, 1000, K.CHUNK + 3]


def params(dtype, sizes=SIZES):
    return [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in sizes]


def bf16_ulp(x):
    """One bf16 ulp at |x| (8 significant bits)."""
    e = torch.floor(torch.log2(x.abs().double().clamp_min(2.0 ** -126)))
    return 2.0 ** (e - 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_follow_fp64_reference(backend, dtype):
    ps = params(dtype)
    lr, beta, eps, wd = 1e-3, 0.95, 1e-8, 0.1
    opt = TiedAdamW(ps, lr=lr, beta=beta, eps=eps, weight_decay=wd, master_weights=True,
                    backend=backend)
    # the reference runs the whole trajectory in fp64 from the same start: the master copy is
    # fp32, so it must track it with fp32 accuracy (the bf16 param never feeds back)
    ref = [(p.detach().double(), torch.zeros(p.shape, dtype=torch.float64),
            torch.zeros(p.shape, dtype=torch.float64)) for p in ps]
    for t in range(1, 11):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        ref = [ref_step(rp, g, rm, rv, t, lr=lr, beta=beta, eps=eps, weight_decay=wd)
               for (rp, rm, rv), g in zip(ref, grads)]
    for p, (rp, rm, rv) in zip(ps, ref):
        st = opt.state[p]
        assert st["master_param"].dtype == torch.float32
        assert_close(st["master_param"], rp)
        assert_close(st["exp_avg"], rm)
        assert_close(st["exp_avg_sq"], rv)
        # the param is the master rounded to its dtype (nearest even; the interpreter
        # truncates: within one ulp, TOL)
        assert_close(p, st["master_param"].to(dtype).double(), dtype)
        # and it is really better than updating the bf16 param in place: the master moved
        # by many sub-ulp updates that a bf16 param would have rounded away
    assert any((opt.state[p]["master_param"] - p.float()).abs().max() > 0 for p in ps)


def test_master_weights_ignored_for_fp32_params_and_counted_in_state_bytes():
    ps = params(torch.float32, [10]) + params(torch.bfloat16, [6])
    opt = TiedAdamW(ps, master_weights=True, backend="torch")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert "master_param" not in opt.state[ps[0]]
    assert "master_param" in opt.state[ps[1]]
    # fp32: m, v (2*4 B) per element; bf16 with master: m, v, master (3*4 B); 4 B step each
    assert opt.state_bytes() == {"cpu": 10 * 8 + 6 * 12 + 2 * 4}


def test_checkpoint_without_master_initialises_it_from_params():
    ps = params(torch.bfloat16, [50])
    ref = torch.optim.AdamW(ps, betas=(0.9, 0.9))
    ps[0].grad = torch.randn_like(ps[0])
    ref.step()
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = TiedAdamW(mine, beta=0.9, master_weights=True)
    opt.load_state_dict(ref.state_dict())
    st = opt.state[mine[0]]
    assert torch.equal(st["master_param"], mine[0].float())
    assert st["exp_avg"].dtype == torch.float32
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "master_param"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_bf16_state_matches_reference_within_one_ulp(backend, pdtype):
    ps = params(pdtype)
    lr, beta, eps, wd = 1e-2, 0.95, 1e-8, 0.0
    opt = TiedAdamW(ps, lr=lr, beta=beta, eps=eps, weight_decay=wd,
                    state_dtype=torch.bfloat16, backend=backend)
    for t in range(1, 6):
        before = [(p.detach().clone(),
                   opt.state[p]["exp_avg"].float() if opt.state[p] else torch.zeros(p.shape),
                   opt.state[p]["exp_avg_sq"].float() if opt.state[p] else torch.zeros(p.shape))
                  for p in ps]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        for p, (p0, m0, v0) in zip(ps, before):
            st = opt.state[p]
            assert st["exp_avg"].dtype == torch.bfloat16
            _, rm, rv = ref_step(p0, p.grad, m0, v0, t, lr=lr, beta=beta, eps=eps,
                                 weight_decay=wd)
            # stochastic rounding lands on one of the two bf16 neighbours of the fp32 result:
            # < 1 ulp from it; the fp32 result itself is off by a few fp32 ulps of the operands
            # (this matters where m0 and (1-beta)*g cancel to ~0, where a bf16 ulp is tiny)
            g = p.grad.double()
            fp32_err = 4 * 2.0 ** -24
            for got, want, size in ((st["exp_avg"], rm, m0.double().abs() + (1 - beta) * g.abs()),
                                    (st["exp_avg_sq"], rv, beta * v0.double() + (1 - beta) * g * g)):
                err = (got.double() - want).abs()
                assert bool((err <= bf16_ulp(want) * 1.0001 + fp32_err * size).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(backend):
    # step 1 from zero state: m = (1 - beta) * g exactly (in fp32). With every element holding
    # the same g, the mean of the stored bf16 m estimates E[round(m)]: SR must be unbiased.
    n, beta = 1 << 16, 0.9
    g = 1.0 + 1.0 / 3.0  # (1 - beta) * g is far from any bf16 value
    exact = torch.tensor((1 - beta), dtype=torch.float32) * torch.tensor(g, dtype=torch.float32)
    exact = float(exact)
    means = {}
    for sr in (True, False):
        p = torch.nn.Parameter(torch.zeros(n))
        opt = TiedAdamW([p], beta=beta, state_dtype=torch.bfloat16, stochastic_rounding=sr,
                        backend=backend, seed=1234)
        p.grad = torch.full((n,), g)
        opt.step()
        m = opt.state[p]["exp_avg"].double()
        lo, hi = float(m.min()), float(m.max())
        means[sr] = float(m.mean())
        if sr:
            assert lo < exact < hi, "SR must use both neighbours"
        else:
            assert lo == hi, "nearest rounding is deterministic"
    ulp = float(bf16_ulp(torch.tensor(exact)))
    sigma = 0.5 * ulp / n ** 0.5  # std of the mean of n SR draws is at most ulp/2/sqrt(n)
    assert abs(means[True] - exact) < 6 * sigma
    assert abs(means[False] - exact) > 50 * sigma  # nearest is biased by a fixed fraction of an ulp


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_stochastic_rounding_keeps_sub_ulp_updates(backend):
    # bf16 params at 1.0 (ulp 2**-7); at step 1 each element moves by exactly lr = 1e-3, less
    # than half an ulp: nearest rounding loses the update, stochastic rounding keeps it on average.
    n, lr = 1 << 15, 1e-3
    results = {}
    for psr in (False, True):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = TiedAdamW([p], lr=lr, eps=0.0, weight_decay=0.0, backend=backend,
                        param_stochastic_rounding=psr, seed=7)
        p.grad = torch.ones(n, dtype=torch.bfloat16)
        opt.step()
        results[psr] = float(p.detach().double().mean())
    # nearest: 1 - 1e-3 rounds back to 1.0 (the interpreter truncates: to 1 - 2**-8 instead)
    assert results[False] in (1.0, 1.0 - 2.0 ** -8)
    assert abs(results[True] - (1 - lr)) < 6 * 2.0 ** -9 / n ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_is_reproducible_for_a_seed(backend):
    def run(seed):
        torch.manual_seed(0)
        ps = params(torch.bfloat16, [3000])
        opt = TiedAdamW(ps, state_dtype=torch.bfloat16, param_stochastic_rounding=True,
                        backend=backend, seed=seed)
        for _ in range(3):
            ps[0].grad = torch.randn_like(ps[0])
            opt.step()
        return ps[0].detach().clone(), opt.state[ps[0]]["exp_avg"].clone()

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_default_seed_follows_manual_seed_without_consuming_rng():
    torch.manual_seed(123)
    s1 = TiedAdamW(params(torch.float32, [2]), state_dtype=torch.bfloat16).seed
    x = torch.rand(1)
    torch.manual_seed(123)
    s2 = TiedAdamW(params(torch.float32, [2]), state_dtype=torch.bfloat16).seed
    assert s1 == s2 and torch.equal(torch.rand(1), x)


def test_bf16_state_refuses_beta_it_cannot_represent():
    with pytest.raises(ValueError, match=r"beta=0.999.*bfloat16"):
        TiedAdamW(params(torch.float32, [2]), beta=0.999, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*bfloat16"):
        TiedAdamW([{"params": params(torch.float32, [2])},
                   {"params": params(torch.float32, [2]), "beta": 0.998}],
                  state_dtype=torch.bfloat16)
    TiedAdamW(params(torch.float32, [2]), beta=0.99, state_dtype=torch.bfloat16)
    TiedAdamW(params(torch.float32, [2]), beta=0.999)  # fp32 state: fine
    with pytest.raises(ValueError, match="state_dtype"):
        TiedAdamW(params(torch.float32, [2]), state_dtype=torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_grad_scaler_unscales_in_kernel_and_skips_inf_steps(backend):
    ps = params(torch.float32, [300, 7])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = TiedAdamW(ps, lr=1e-2, beta=0.9, backend=backend)
    ropt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.9), foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    x = [torch.randn_like(p) for p in ps]
    for step in range(4):
        loss = sum((p * xi).sum() ** 2 for p, xi in zip(ps, x))
        scaler.scale(loss).backward()
        if step == 2:  # an overflow: nothing may change
            ps[1].grad[3] = float("inf")
            snap = ([p.detach().clone() for p in ps],
                    [{k: v.clone() for k, v in opt.state[p].items()} for p in ps])
        scaler.step(opt)
        scaler.update()
        if step == 2:
            for p, p0, s0 in zip(ps, *snap):
                assert torch.equal(p, p0)
                assert all(torch.equal(opt.state[p][k], s0[k]) for k in s0)
        else:
            rl = sum((r * xi).sum() ** 2 for r, xi in zip(ref, x))
            rl.backward()
            ropt.step()
            ropt.zero_grad()
        opt.zero_grad()
    assert float(opt.state[ps[0]]["step"]) == 3.0
    for p, r in zip(ps, ref):
        assert_close(p, r)
