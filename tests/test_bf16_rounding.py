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
    """Random values over the whole exponent range plus every rounding edge case. NaNs as
    arithmetic produces them (the kernel rounds arithmetic results, Note [bf16 rounding]):
    quiet, the GPU's canonical 0x7FFFFFFF, torch's 0x7FC00000 and x86's default 0xFFC00000."""
    rnd = torch.randint(0, 2 ** 32, (20000,), dtype=torch.int64)
    x = (rnd - 2 ** 31).to(torch.int32).view(torch.float32)  # every bit pattern equally likely
    base = torch.randint(0, 2 ** 15, (2000,), dtype=torch.int32) << 16
    ties = torch.cat([base | 0x8000, base | 0x18000, base | 0x7FFF, base | 0x8001])
    edges = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                          3.4028234663852886e38, -3.4028234663852886e38, 1e-45, -1e-45,
                          1.1754943508222875e-38, 1.0, -1.0])
    quiet = torch.tensor([0x7FFFFFFF, 0x7FC00000, -0x400000], dtype=torch.int32)  # 0xFFC00000
    bits = torch.cat([x.view(torch.int32), ties, edges.view(torch.int32), quiet])
    nan = torch.isnan(bits.view(torch.float32))
    bits[nan] = quiet[torch.randint(0, 3, (int(nan.sum()),))]  # NaNs made quiet
    return bits.view(torch.float32)


def test_rne_matches_torch_bit_for_bit():
    x = hard_values()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _rne_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    positive = x.view(torch.int32) > 0
    assert torch.isnan(y[nan]).all()
    assert (y[nan & positive].view(torch.int16) == 0x7FC0).all()  # canonical, as torch
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


@triton.jit
def _sr_kernel(x_ptr, r_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r16 = tl.load(r_ptr + offs, mask=mask).to(tl.uint32, bitcast=True)
    y = K._round_to_bf16(tl.load(x_ptr + offs, mask=mask), r16, True)
    tl.store(y_ptr + offs, y, mask=mask)


def test_stochastic_rounding_rounds_down_or_up_and_keeps_nan_and_inf():
    """Stochastic: the result is x truncated, or truncated plus one bf16 ulp; NaN stays NaN
    (the GPU's canonical 0x7FFFFFFF plus noise once carried into the sign bit: -0.0), inf
    stays inf."""
    x = hard_values()
    r = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32)
    r[: x.numel() // 8] = 0xFFFF  # the largest noise, where a carry would reach the sign
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _sr_kernel[(triton.cdiv(x.numel(), 1024),)](x, r, y, x.numel(), BLOCK=1024)
    nan = torch.isnan(x)
    assert torch.isnan(y[nan]).all()
    inf = torch.isinf(x)
    assert torch.equal(y[inf].float(), x[inf])
    bits = x[~nan].view(torch.int32)
    down = (bits >> 16).to(torch.int16)
    got = y[~nan].view(torch.int16)
    carry = ((bits & 0xFFFF) + r[~nan]) >> 16  # the noise decides: exactly this rounds up
    assert torch.equal(got, (down + carry.to(torch.int16)))
