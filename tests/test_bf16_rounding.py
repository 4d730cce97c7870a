"""bf16 round-to-nearest-even in the kernel is done with integer operations (Note [bf16 rounding]
in tiedadam/kernels/tied_adamw.py), so the Triton interpreter gives the GPU's bits and these CPU
tests check them exactly against torch's ``.to(torch.bfloat16)``."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw as K


@triton.jit
def _rne_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, K._rne_bf16(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def hard_values():
    """Random values over the whole exponent range plus every rounding edge case."""
    rnd = torch.randint(0, 2 ** 32, (20000,), dtype=torch.int64)
    x = (rnd - 2 ** 31).to(torch.int32).view(torch.float32)  # every bit pattern equally likely
    base = torch.randint(0, 2 ** 15, (2000,), dtype=torch.int32) << 16
    ties = torch.cat([base | 0x8000, base | 0x18000, base | 0x7FFF, base | 0x8001])
    edges = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                          3.4028234663852886e38, -3.4028234663852886e38, 1e-45, -1e-45,
                          1.1754943508222875e-38, 1.0, -1.0])
    return torch.cat([x, ties.view(torch.float32), edges])


def test_rne_matches_torch_bit_for_bit():
    x = hard_values()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _rne_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    assert torch.isnan(y[nan]).all() and (y[nan].view(torch.int16) == 0x7FC0).all()
    assert torch.equal(y[~nan].view(torch.int16), ref[~nan].view(torch.int16))


@pytest.mark.parametrize("mode", ["master", "state"])
def test_kernel_writes_round_to_nearest_even(mode):
    """Master weights: the bf16 param is exactly the fp32 master rounded to nearest even.
    bf16 state (nearest): the state equals the torch path's, which rounds with torch."""
    if mode == "master":
        ps = [torch.nn.Parameter(torch.randn(3000, dtype=torch.bfloat16))]
        opt = TiedAdamW(ps, lr=1e-2, beta=0.9, backend="triton", master_weights=True)
        for _ in range(3):
            ps[0].grad = torch.randn_like(ps[0])
            opt.step()
        master = opt.state[ps[0]]["master_param"]
        assert torch.equal(ps[0].view(torch.int16), master.to(torch.bfloat16).view(torch.int16))
    else:
        ours = [torch.nn.Parameter(torch.randn(3000))]
        theirs = [torch.nn.Parameter(ours[0].detach().clone())]
        kw = dict(lr=1e-2, beta=0.9, state_dtype=torch.bfloat16, stochastic_rounding=False)
        a, b = TiedAdamW(ours, backend="triton", **kw), TiedAdamW(theirs, backend="torch", **kw)
        for _ in range(3):
            g = torch.randn(3000)
            ours[0].grad, theirs[0].grad = g, g.clone()
            a.step()
            b.step()
        for k in ("exp_avg", "exp_avg_sq"):
            sa, sb = a.state[ours[0]][k], b.state[theirs[0]][k]
            # the same fp32 value rounded: equal bits wherever the fp32 math agrees
            same = (sa.view(torch.int16) == sb.view(torch.int16)).float().mean()
            assert same > 0.999, (k, same)
