"""The split fp32 master (issue 32's ``master_weights="split"``): a bf16 param plus an int16
remainder hold an fp32 master exactly. The torch form of the codec (conversions, checkpoints,
tests); the kernel and the CPU step are to reconstruct it the same way in registers. Only torch
here.

Note [split master]
-------------------
Work on the bit patterns. An fp32 value's pattern b (as int32) is sign and magnitude; within
one sign, the magnitude bits order the values (every finite value, subnormals and zero
included, and inf above them all). The bf16 head keeps the high 16 bits after rounding the
magnitude half up: head = (b + 0x8000) & 0xFFFF0000. The remainder is the integer difference
rem = b - head, in [-0x8000, 0x7FFF]: an int16, whatever the binade (a head rounded up into the
next binade gives a negative remainder counted in the lower binade's ulps: the patterns are
consecutive integers across the boundary). Joining is one integer add, b = head + rem, exact for
every finite value and for inf (rem 0).

* The tie rule. Round half up (away from zero) differs from torch's round-to-nearest-even only
  where the low 16 bits are exactly 0x8000 and the high half is even: there the head is one
  bf16 ulp larger in magnitude than ``master.to(torch.bfloat16)``. Sixteen bits cannot tell
  the two heads' ties apart, so one rule has to be chosen; half up needs no branch and keeps
  the remainder's range symmetric around the head. ``ties_differ`` counts those elements.
* NaN: a NaN master splits into the canonical bf16 NaN (0x7FC0) and remainder 0, and joins as
  the canonical fp32 NaN 0x7FC00000 (sign and payload are not kept; NaN stays NaN). Rounding
  the pattern of a NaN with a small payload half up would otherwise reach inf's pattern.
* Overflow: a finite master at or above 0x7F7F8000 (the last bf16 value plus half an ulp) gets
  the head inf, as round-to-nearest-even gives it too; its remainder is negative and joins back
  to the finite master.
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = 0x8000
_HIGH = -0x10000  # 0xFFFF0000 as an int32
_BF16_NAN = 0x7FC0


def split(master: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``master`` -> (bf16 head, int16 remainder) with ``join(head, rem)`` equal to
    ``master`` bit for bit (a NaN: the canonical NaN). Note [split master]."""
    if master.dtype != torch.float32:
        raise TypeError(f"split: master must be float32, got {master.dtype}")
    b = master.view(torch.int32)
    head = (b + _HALF) & _HIGH
    nan = master.isnan()
    head = torch.where(nan, torch.full_like(head, _BF16_NAN << 16), head)
    rem = torch.where(nan, torch.zeros_like(b), b - head)
    head16 = (head >> 16).to(torch.int16).view(torch.bfloat16)
    return head16, rem.to(torch.int16)


def join(head: Tensor, rem: Tensor) -> Tensor:
    """(bf16 head, int16 remainder) -> the fp32 master they hold (Note [split master])."""
    if head.dtype != torch.bfloat16 or rem.dtype != torch.int16:
        raise TypeError(f"join: head must be bfloat16 and rem int16, got {head.dtype} and "
                        f"{rem.dtype}")
    if head.shape != rem.shape:
        raise ValueError(f"join: head {tuple(head.shape)} and rem {tuple(rem.shape)} differ")
    b = (head.view(torch.int16).to(torch.int32) << 16) + rem.to(torch.int32)
    return b.view(torch.float32)


def ties_differ(master: Tensor) -> Tensor:
    """Where the head differs from ``master.to(torch.bfloat16)``: exact ties whose
    round-to-nearest-even goes down (the tie rule of Note [split master]); a bool tensor."""
    b = master.view(torch.int32)
    tie = (b & 0xFFFF) == _HALF
    even = ((b >> 16) & 1) == 0
    return tie & even & ~master.isnan()
