"""state_dict moves between TiedAdamW and torch.optim.AdamW(betas=(b, b)) both ways, and
training continues as if uninterrupted."""

from __future__ import annotations

import io

import pytest
import torch

from tiedadam import TiedAdamW
from reference import assert_close

BETA = 0.9
HYPER = dict(lr=1e-2, eps=1e-8, weight_decay=0.1)
SIZES = [5, 1000, 3]


def fresh(dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in SIZES]


def clone(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def roundtrip(sd):
    """Through bytes, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(opt, ps, grads):
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()


def make(kind, ps, backend):
    if kind == "tied":
        return TiedAdamW(ps, beta=BETA, backend=backend, **HYPER)
    return torch.optim.AdamW(ps, betas=(BETA, BETA), foreach=False, **HYPER)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("src, dst", [("torch", "tied"), ("tied", "torch"), ("tied", "tied")])
def test_checkpoint_moves_and_training_continues(backend, src, dst):
    ps = fresh()
    grads = [[torch.randn_like(p) for p in ps] for _ in range(6)]
    whole = clone(ps)  # uninterrupted: 6 steps in one optimizer
    train(make(src, whole, backend), whole, grads)

    part = clone(ps)  # interrupted: 3 steps, checkpoint, 3 steps in the other optimizer
    first = make(src, part, backend)
    train(first, part, grads[:3])
    sd = roundtrip(first.state_dict())
    if src == "tied":
        # torch's names, plus TiedAdamW's options (kept per group, as torch keeps fused/foreach)
        assert set(sd["param_groups"][0]) == {"lr", "beta", "betas", "eps", "weight_decay",
                                              "capturable", "maximize", "master_weights",
                                              "state_dtype", "stochastic_rounding",
                                              "param_stochastic_rounding", "seed", "params"}
        assert sd["param_groups"][0]["betas"] == (BETA, BETA)
        assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed = clone(part)
    second = make(dst, resumed, backend)
    second.load_state_dict(sd)
    train(second, resumed, grads[3:])
    for a, b in zip(resumed, whole):
        if src == dst:
            assert torch.equal(a, b), "same optimizer: resume must be bitwise"
        else:
            assert_close(a, b)
    assert float(second.state[resumed[0]]["step"]) == 6.0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_params_keep_fp32_state_through_load(backend):
    ps = fresh(torch.bfloat16)
    opt = TiedAdamW(ps, beta=BETA, backend=backend, **HYPER)
    train(opt, ps, [[torch.randn_like(p) for p in ps] for _ in range(2)])
    sd = roundtrip(opt.state_dict())
    ps2 = clone(ps)
    opt2 = TiedAdamW(ps2, beta=BETA, backend=backend, **HYPER)
    opt2.load_state_dict(sd)
    for p, p2 in zip(ps, ps2):
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p2][k].dtype == torch.float32
            assert torch.equal(opt2.state[p2][k], opt.state[p][k])
    # and the two continue identically
    gs = [[torch.randn_like(p) for p in ps]]
    train(opt, ps, gs)
    train(opt2, ps2, gs)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


def test_untied_torch_checkpoint_is_refused():
    ps = fresh()
    ref = torch.optim.AdamW(ps, betas=(0.9, 0.999))
    train(ref, ps, [[torch.randn_like(p) for p in ps]])
    mine = clone(ps)
    opt = TiedAdamW(mine, beta=BETA)
    train(opt, mine, [[torch.randn_like(p) for p in ps]])
    before = roundtrip(opt.state_dict())
    with pytest.raises(ValueError, match="untied"):
        opt.load_state_dict(ref.state_dict())
    after = opt.state_dict()  # nothing was half-applied
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][0][k], before["state"][0][k]) for k in before["state"][0])
