"""fp32 -> bf16 rounding for the CPU paths: the compiled one-pass step (tied_adamw_cpu.py) and
the torch-op path (optim/torch_backend.py), one construction for both. Only torch is imported
here, so the torch-op path does not load inductor's code generator."""

from __future__ import annotations

import torch
from torch import Tensor

_HIGH16 = -65536  # 0xFFFF0000 as int32
_QNAN = 0x7FC00000


def round_bf16(x: Tensor, r16: Tensor | None) -> Tensor:
    """fp32 -> bf16: to nearest even (``r16`` None; torch's conversion, the kernel's bits), or
    stochastically with 16 random bits ``r16`` (int32 in [0, 2**16)): the Triton kernel's
    ``_round_to_bf16`` construction (add the noise to the bits, keep the high half; unbiased,
    E[round(x)] = x), with every NaN replaced by the canonical 0x7FC00000 first (Note [cpu nan]
    in tied_adamw_cpu.py); infinities stay infinite (their low 16 bits are 0)."""
    if r16 is None:
        return x.to(torch.bfloat16)
    bits = torch.where(x != x, _QNAN, x.view(torch.int32)) + r16  # != : a vector compare
    return (bits & _HIGH16).view(torch.float32).to(torch.bfloat16)  # exact: low bits are 0


def rounded_bf16_value(x: Tensor, r16: Tensor | None) -> Tensor:
    """``round_bf16(x, r16)`` as an fp32 tensor (exact: a bf16 value), made with integer
    operations: inductor drops a ``.to(torch.bfloat16).float()`` round trip inside a compiled
    graph (it does not emulate the intermediate rounding), and ratio8 encodes m against the
    rounded v (Note [ratio8] in ratio8.py). To nearest even as the Triton kernel's
    ``_rne_bf16``: add 0x7FFF plus the lowest kept bit, keep the high half."""
    bits = torch.where(x != x, _QNAN, x.view(torch.int32))
    bits = bits + (r16 if r16 is not None else 0x7FFF + ((bits >> 16) & 1))
    return (bits & _HIGH16).view(torch.float32)
