"""ratio8 moments: exp_avg as an int8 ratio of sqrt(exp_avg_sq), with no block scale. The torch
form of the codec (the CPU paths, checkpoint conversion, ``dequantize_state_dict``); the Triton
kernel has the same one in registers (Note [ratio8] in tied_adamw.py). Only torch here.

Note [ratio8]
-------------
With beta1 = beta2 = beta the first moment is bounded by the second, element by element, at
every step and for any grads and beta edits: (b m + (1-b) g)^2 <= b m^2 + (1-b) g^2 <= b v +
(1-b) g^2 by convexity, so m^2 <= v before a step gives it after, and m = v = 0 starts it. So
r = m / sqrt(v) lies in [-1, 1], and exp_avg can be stored as r in 8 bits with nothing per
block: a tensor cut anywhere (FSDP2 shards, ZeRO partitions) keeps every element decodable on
its own. exp_avg_sq stays v, in bf16 (the bf16-state mode's format, and torch's meaning of the
key, so a checkpoint reads the same and converts by one multiplication), at the cost of one
square root per element to decode.

* Code: ``CODE`` names it. "linear": q = 127 r, |q| <= 127 (int8, -128 unused), a step of 1/127
  everywhere. "sqrt" (companded): q = 127 sign(r) sqrt(|r|), r = sign(q) (q/127)^2: finer steps
  near r = 0, where noisy coordinates sit, 2/127 near |r| = 1. perf/precision_study.py
  measures both (modes ratio8, ratio8-sqrt); which one is used, and why, is written where CODE
  is set.
* Rounding: stochastic and unbiased *in r*: between the two codes around r, the upper one with
  probability (r - r_lo) / (r_hi - r_lo) (16 random bits: the low half of what a bf16 exp_avg
  would use; exp_avg_sq takes the high half, as in the bf16-state mode), or to the nearest
  code (``stochastic_rounding=False``, and every conversion of a checkpoint or option edit).
* Encoding is against the *stored* v (after its own rounding), and r is clamped to [-1, 1], so
  a decoded |m| = |r| sqrt(v) never exceeds sqrt(v): the bound holds for the stored state, not
  only in exact arithmetic, and the next step's m^2 <= v follows.
* Note [ratio8 update bound]. The update's bound needs more: with c = 1 - beta^t, m^2 <= c v
  (m and v are sums of the same weights, which add up to c: Cauchy-Schwarz), and that is what
  makes |u| = |m| / (sqrt(c) sqrt(v) + c eps) <= 1. It carries from step to step as m^2 <= v
  does: if the stored state has m^2 <= c v, then (beta m + (1-beta) g)^2 <= c' (beta v +
  (1-beta) g^2) = c' v' with c' = beta c + 1 - beta (convexity with weights beta c and 1 - beta,
  which add up to c'). Rounding r to 8 bits can break it where |r| sits at sqrt(c) (steady
  grads: r = sqrt(c) exactly), most at early steps and large beta (beta 0.99, t = 1: sqrt(c) =
  0.1, a step of 1/127 is 8 % of it). So codes are clamped to the whole number
  ``code_bound(beta, t)`` = floor(127 sqrt(c)) (for the "sqrt" code, floor(127 c^(1/4))), which
  rounding, nearest or stochastic, cannot cross (floor(B + u) = B for an integer B): the
  decoded state keeps m^2 <= c v, and every applied update |u| <= 1 up to fp32 rounding (the
  tested bound, 1 + 2**-20). It moves a code only where rounding would have crossed the
  bound, down by less than one step; conversions (checkpoint loads, option edits) clamp with
  the saved step count. (With a beta edit, c = 1 - beta^t with the new beta is not the weight
  sum of the old history; the clamp then makes the stored state satisfy the new c, so the
  bound holds from the edit on, which fp32 moments do not promise.)
* Where v = 0 (no grad yet, or only zero grads), m = 0: r = 0. Where v overflows (a finite
  grad whose square exceeds fp32's range: v = inf, as fp32 moments hold it too), m is encoded
  as r = 0 and sqrt(v) decodes clamped to fp32's largest value, so m = 0 (not 0 * inf = NaN);
  the update is m / inf = 0, as torch's AdamW gives with fp32 moments, and params stay finite.
* Why v and not sqrt(v) is stored. Storing sqrt(v) would take the CPU step from three roots
  and two divisions per element (decode, update, encode) to one root and two divisions. A
  prototype of the native loop doing so was measured (perf/results/cpu/ratio8_sqrtv_prototype
  and docs/performance.md hold the figures): faster, and still below DeepSpeedCPUAdam on the
  machine measured, the vector divide/root unit bounding the loop either way; a GPU's roots
  cost the kernel nothing. Against that gain, v keeps exp_avg_sq's meaning in torch's AdamW (checkpoints and
  ``dequantize_state_dict`` convert by one multiplication, no root, no format version), so v
  stays until a change reaches the speed it would be made for.
* beta bound: an EMA step moves r by (1 - beta)(g / sqrt(v) - r), about (1 - beta) in size;
  rounding is unbiased, but a step below the code's step drowns in its noise. So beta <=
  1 - 1/127 (linear; 1 - 2/127 for "sqrt", whose coarsest step is 2/127), refused above
  (group_rules.check_beta_for_state); the bf16 v needs beta <= 1 - 2**-8, a weaker bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NAME = "ratio8"  # the state_dtype value (a string: JSON configs, state dicts)
LEVELS = 127  # |q| <= LEVELS
# The code in use (Note [ratio8]). perf/precision_study.py trains with both (this switch,
# read at every launch and conversion, is how its ratio8-sqrt mode runs). "linear", because the
# study (docs/performance.md, "ratio8 moments") found no difference in loss between the two at
# beta 0.9 and 0.95 over three seeds, and the linear code has the finer step near |r| = 1,
# allows beta up to 1 - 1/127 (not 1 - 2/127) and is the one the Triton kernel encodes.
CODE = "linear"


def max_beta(code: str | None = None) -> float:
    """The largest beta whose EMA step the code still resolves (Note [ratio8])."""
    step = 1.0 if (code or CODE) == "linear" else 2.0
    return 1.0 - step / LEVELS


# Note [ratio8 arithmetic]: every backend decodes and encodes with these operations, in this
# order, in fp32: decode m = (q * INV_LEVELS) * min(sqrt(v), FP32_MAX) (NaN stays NaN); encode
# x = (m * rsqrt(max(v, TINY))) * LEVELS, clamped to [-B, B] (B = code_bound(beta, t), Note
# [ratio8 update bound]; LEVELS where no step count applies) with NaN going to -B (maxNum/minNum, what a GPU's
# min/max instructions do: a NaN v decodes to NaN whatever the code), then rounded half to
# even, or floor(x + u) with u = 16 random bits * 2**-16 (unbiased: E[floor(x + u)] = x).
# TINY (the smallest normal fp32) keeps v = 0 (no grad yet, zero grads, where m = 0 too) at
# code 0 without a select, and subnormal v away from the GPU's flush to zero. The step that
# uses them (tied_adamw_cpu.py, the kernel) then computes the update as sqrt(v) * (1 /
# sqrt(c)) + eps and one division, in that order. The compiled CPU step and the Triton
# interpreter give the same codes, states and params bit for bit when rounding to nearest
# (tests/test_ratio8.py); a GPU's sqrt, rsqrt and division are the fast approximations (a few
# ulp), so its codes may differ from the CPU's by one at a rounding boundary.
INV_LEVELS = float(torch.tensor(1.0 / LEVELS, dtype=torch.float32))
TINY = float(torch.finfo(torch.float32).tiny)
FP32_MAX = float(torch.finfo(torch.float32).max)
NOISE_SCALE = 2.0 ** -16  # 16 random bits -> u in [0, 1)


def code_bound(beta: float, t: float, code: str | None = None) -> float:
    """The largest |code| the state after step t may hold (Note [ratio8 update bound]): floor(
    127 sqrt(c)), c = 1 - beta**t computed as the kernel computes it (fp64, exp(t log beta));
    floor(127 c**(1/4)) for the "sqrt" code. t = 0 (no step yet) gives 0."""
    c = 1.0 - math.exp(t * math.log(beta)) if beta > 0 else 1.0
    r = math.sqrt(c) if (code or CODE) == "linear" else math.sqrt(math.sqrt(c))
    return float(min(LEVELS, math.floor(LEVELS * r)))


def code_bound_of(beta: float, step: Tensor) -> float | Tensor:
    """``code_bound(beta, t)`` for a step-count tensor: a float for a CPU count (read for free),
    else a 0-dim tensor on the count's device, computed there in fp64 (no host sync)."""
    if step.device.type == "cpu":
        return code_bound(beta, float(step))
    return code_bound_tensor(beta, step)


def code_bound_tensor(beta: float, step: Tensor) -> Tensor:
    """``code_bound`` computed with tensor ops on ``step``'s device (fp64), as a 0-dim fp32
    tensor."""
    t = step.to(torch.float64)
    c = 1.0 - torch.exp(t * math.log(beta)) if beta > 0 else torch.ones_like(t)
    r = c.sqrt() if CODE == "linear" else c.sqrt().sqrt()
    return torch.floor(LEVELS * r).clamp(max=LEVELS).to(torch.float32)


def decode_ratio(q: Tensor, code: str | None = None) -> Tensor:
    """int8 codes -> r in [-1, 1] (fp32)."""
    x = q.float() * INV_LEVELS
    return x if (code or CODE) == "linear" else x * x.abs()


def decode(q: Tensor, v: Tensor, code: str | None = None) -> Tensor:
    """exp_avg (fp32) from its codes and the stored exp_avg_sq (an inf exp_avg_sq decodes as
    fp32's largest value, so code 0 stays 0: Note [ratio8])."""
    return decode_ratio(q, code) * v.float().sqrt().clamp(max=FP32_MAX)


def encode(m: Tensor, v: Tensor, noise: Tensor | None = None,
           code: str | None = None, bound: float | Tensor = LEVELS) -> Tensor:
    """int8 codes of m against the stored v (Note [ratio8 arithmetic]): to the nearest code, or
    stochastically with 16 random bits per element ``noise`` (int32 in [0, 2**16)), unbiased
    in r; |code| <= ``bound`` (``code_bound``: a whole number, a float or a 0-dim tensor)."""
    r = m.float() * torch.rsqrt(v.float().clamp_min(TINY))
    if (code or CODE) == "linear":
        x = _clamp(r * LEVELS, bound)
        q = torch.round(x) if noise is None else torch.floor(x + noise.float() * NOISE_SCALE)
        return q.to(torch.int8)
    # companded: nearest, or stochastic and unbiased, in r between the codes around it
    r = _clamp(r, 1.0)
    lo = torch.floor(r.sign() * r.abs().sqrt() * LEVELS)
    rl, rh = _decode_x(lo), _decode_x(lo + 1)
    if noise is None:
        q = torch.where(r - rl < rh - r, lo, lo + 1)
    else:
        p = (r - rl) / (rh - rl)
        q = lo + (noise.float() * NOISE_SCALE < p).float()
    return _clamp(q, bound).to(torch.int8)


def _clamp(x: Tensor, bound: float | Tensor) -> Tensor:
    """x clamped to [-bound, bound], NaN to -bound (Note [ratio8 arithmetic])."""
    if isinstance(bound, Tensor):
        b = bound.to(x.dtype)
        return torch.where(x != x, -b, torch.minimum(torch.maximum(x, -b), b))
    return torch.where(x != x, -bound, x).clamp(-bound, bound)


def _decode_x(x: Tensor) -> Tensor:
    """r of a (float) code of the companded scale."""
    y = x * INV_LEVELS
    return y * y.abs()
