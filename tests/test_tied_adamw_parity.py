"""TiedAdamW == torch.optim.AdamW(betas=(b, b)) and == a float64 reference, on both backends.

Sizes cover empty, 1, odd, multi-chunk and a misaligned view; the Triton path runs in the
interpreter (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw as K
from reference import TOL, assert_close, ref_step

BACKENDS = ["triton", "torch"]
# 0, 1, odd, a full block, more than one chunk with a tail, and a misaligned view (t[1:]).
SIZES = [0, 1, 3, 1000, K.CHUNK + 3]


def make_params(dtype=torch.float32, sizes=SIZES, misaligned=True):
    ps = [torch.randn(n, dtype=dtype) for n in sizes]
    if misaligned:
        base = torch.randn(1 + 1001, dtype=dtype)
        ps.append(base[1:])  # data_ptr is 4 (2) bytes past a 16-byte boundary
    ps.append(torch.randn(7, 5, dtype=dtype))  # 2-D
    return [torch.nn.Parameter(p) for p in ps]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def set_grads(*param_lists, dtype=None):
    for group in zip(*param_lists):
        g = torch.randn_like(group[0], dtype=dtype)
        for p in group:
            p.grad = g.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_matches_torch_adamw(backend, weight_decay):
    ours = make_params()
    theirs = clone_params(ours)
    assert ours[-2].data_ptr() % 16 != 0, "the misaligned view must really be misaligned"
    beta = 0.9
    opt = TiedAdamW(ours, lr=1e-2, beta=beta, eps=1e-8, weight_decay=weight_decay,
                    backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(beta, beta), eps=1e-8,
                            weight_decay=weight_decay, foreach=False)
    launches = K.launches
    for _ in range(10):
        set_grads(ours, theirs)
        opt.step()
        ref.step()
    assert (K.launches - launches == 10) == (backend == "triton")
    for a, b in zip(ours, theirs):
        assert_close(a, b)
        sa, sb = opt.state[a], ref.state[b]
        assert_close(sa["exp_avg"], sb["exp_avg"])
        assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"]) == 10.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_with_different_hyperparameters_and_scheduler(backend):
    a1, a2, a3 = make_params(sizes=[300, 5]), make_params(sizes=[17]), make_params(sizes=[64])
    b1, b2, b3 = clone_params(a1), clone_params(a2), clone_params(a3)
    opt = TiedAdamW([{"params": a1}, {"params": a2, "lr": 3e-3, "beta": 0.5, "eps": 1e-3},
                     {"params": a3, "weight_decay": 0.0, "betas": (0.99, 0.99)}],
                    lr=1e-2, beta=0.9, weight_decay=0.05, backend=backend)
    ref = torch.optim.AdamW([{"params": b1}, {"params": b2, "lr": 3e-3, "betas": (0.5, 0.5),
                                               "eps": 1e-3},
                             {"params": b3, "weight_decay": 0.0, "betas": (0.99, 0.99)}],
                            lr=1e-2, betas=(0.9, 0.9), weight_decay=0.05, foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    rsched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    for _ in range(10):
        set_grads(a1 + a2 + a3, b1 + b2 + b3)
        opt.step()
        ref.step()
        sched.step()
        rsched.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < 1e-2
    for a, b in zip(a1 + a2 + a3, b1 + b2 + b3):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state_and_match_fp64_reference(backend, dtype):
    # Each step is compared with the fp64 reference started from our own previous values, so a
    # rounding difference (the interpreter truncates bf16) cannot compound across steps.
    ps = make_params(dtype=dtype)
    lr, beta, eps, wd = 1e-2, 0.95, 1e-8, 0.1
    opt = TiedAdamW(ps, lr=lr, beta=beta, eps=eps, weight_decay=wd, backend=backend)
    for t in range(1, 11):
        before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone() if opt.state[p] else
                   torch.zeros(p.shape), opt.state[p]["exp_avg_sq"].clone() if opt.state[p]
                   else torch.zeros(p.shape)) for p in ps]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        for p, (p0, m0, v0) in zip(ps, before):
            st = opt.state[p]
            assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
            rp, rm, rv = ref_step(p0, p.grad, m0, v0, t, lr=lr, beta=beta, eps=eps,
                                  weight_decay=wd)
            assert_close(st["exp_avg"], rm)
            assert_close(st["exp_avg_sq"], rv)
            assert_close(p, rp, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_is_bounded_by_lr(backend):
    """Tied betas: |m̂/√v̂| ≤ 1, so |Δθ + ηλθ| ≤ η elementwise, every step, any grads."""
    ps = make_params(sizes=[2000, 33])
    lr, wd = 1e-2, 0.1
    opt = TiedAdamW(ps, lr=lr, beta=0.9, eps=0.0, weight_decay=wd, backend=backend)
    for _ in range(10):
        before = [p.detach().clone() for p in ps]
        for p in ps:  # heavy-tailed, sign-flipping grads at wildly different scales
            p.grad = torch.randn_like(p) ** 3 * 10.0 ** torch.randint(-6, 6, p.shape)
        opt.step()
        for p, p0 in zip(ps, before):
            u = (p.detach().double() - p0.double() * (1 - lr * wd)).abs()
            # the stored param is rounded to fp32: allow 2 ulp of |θ| on top of the bound
            slack = 2 * torch.finfo(torch.float32).eps * p0.double().abs()
            assert bool((u <= lr * (1 + 8 * 2.0 ** -23) + slack).all()), float((u - slack).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_element_is_written(backend):
    # At step 1 with tied betas, m̂/√v̂ = g/|g| = ±1 (eps=0): every element moves by exactly lr.
    ps = make_params(sizes=[1, 3, 1000, K.CHUNK + 3])
    before = [p.detach().clone() for p in ps]
    opt = TiedAdamW(ps, lr=0.25, beta=0.9, eps=0.0, weight_decay=0.0, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p).abs() + 0.1  # nonzero everywhere
    opt.step()
    for p, p0 in zip(ps, before):
        torch.testing.assert_close(p.detach(), p0 - 0.25, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_as_tensor_and_closure(backend):
    ours = make_params(sizes=[100])
    theirs = clone_params(ours)
    x = torch.randn(100)
    opt = TiedAdamW(ours, lr=torch.tensor(5e-3), beta=0.9, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=5e-3, betas=(0.9, 0.9), foreach=False)

    def closure(params, o):
        def f():
            o.zero_grad()
            loss = sum((p.sum() * x.sum() if p.dim() else p * x.sum()) for p in params[:1]) \
                + sum((p ** 2).sum() for p in params)
            loss.backward()
            return loss
        return f

    for _ in range(5):
        l1 = opt.step(closure(ours, opt))
        l2 = ref.step(closure(theirs, ref))
        assert torch.allclose(l1, l2)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    ps = make_params(sizes=[10, 20], misaligned=False)
    before = [p.detach().clone() for p in ps]
    opt = TiedAdamW(ps, lr=1e-2, backend=backend)
    ps[0].grad = torch.randn_like(ps[0])
    opt.step()
    assert not torch.equal(ps[0], before[0])
    for p, p0 in zip(ps[1:], before[1:]):
        assert torch.equal(p, p0)
        assert len(opt.state[p]) == 0
    # The skipped params join later with their own step count, as in torch.
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 2.0 and float(opt.state[ps[1]]["step"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    ps = make_params()
    grads = [[torch.randn_like(p) for p in ps] for _ in range(4)]
    results = []
    for _ in range(2):
        run = clone_params(ps)
        opt = TiedAdamW(run, lr=1e-2, weight_decay=0.1, backend=backend)
        for gs in grads:
            for p, g in zip(run, gs):
                p.grad = g.clone()
            opt.step()
        results.append(run)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_auto_backend_uses_torch_on_cpu():
    ps = make_params(sizes=[10], misaligned=False)
    opt = TiedAdamW(ps, backend="auto")
    n = K.launches
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert K.launches == n
    assert float(opt.state[ps[0]]["step"]) == 1.0
