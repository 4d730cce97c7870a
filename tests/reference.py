"""Independent float64 reference of tied-beta AdamW (docs/design.md §1), written from the formula,
not from the kernel."""

from __future__ import annotations

import torch

# Tolerances for comparing a stored result with the reference, keyed by storage dtype.
# fp32: float32 op-by-op rounding against float64 math.
# bf16/fp16: one unit in the last place (rtol = machine eps covers 1 ulp at any magnitude): a
# reference computed in float64 may round the other way from the kernel's float32 value. (The
# kernel's bf16 rounding itself is exact, also in the interpreter: tests/test_bf16_rounding.py.)
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-6),
    torch.float16: dict(rtol=2.0 ** -10, atol=1e-6),
}


def ref_step(p, g, m, v, t, *, lr, beta, eps, weight_decay):
    """One step in float64. Returns new (p, m, v) as float64 tensors."""
    p, g, m, v = (x.double() for x in (p, g, m, v))
    c = 1.0 - beta ** t
    p = p * (1.0 - lr * weight_decay)
    m = beta * m + (1.0 - beta) * g
    v = beta * v + (1.0 - beta) * g * g
    p = p - lr * (m / c) / ((v / c).sqrt() + eps)
    return p, m, v


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=msg)
