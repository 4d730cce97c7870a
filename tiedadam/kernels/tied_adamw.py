"""The tied-beta AdamW update as one Triton kernel, specialised by constexprs.

Math (per element; fp32 registers whatever the storage dtypes; t = step after increment):

    c  = 1 - beta**t                              (one factor: beta1 = beta2 = beta)
    p  = p * (1 - lr * weight_decay)              (decoupled weight decay)
    m  = lerp(m, g, 1 - beta)                     (== beta*m + (1-beta)*g, as torch's lerp_:
                                                   m + w*(g - m) for w < 0.5, else g - (g - m)*(1 - w))
    v  = beta * v + (1 - beta) * g * g
    p  = p - (lr / c) * m / (sqrt(v) / sqrt(c) + eps)

which is torch.optim.AdamW(betas=(beta, beta)) operation for operation. The scalars (c, lr/c,
sqrt(c), 1 - lr*wd) are computed once per program in fp64 from the group's hyperparameters, as
torch computes them in Python floats.

The launcher (``launch_tied_adamw``) lives below the kernel; the tables it passes are built
by the generic engine in ``multi_tensor.py``.

Note [telemetry]
----------------
With TELEMETRY (a constexpr: compiled out when off) each program also reduces, over its chunk
and from values already in registers (no extra memory reads), five per-tensor quantities:
sum g^2, sum u^2 and max |u| for u = m_hat / (sqrt(v_hat) + eps) (the update before lr),
the count of non-finite grads, and the count of elements with |m_hat| / sqrt(v_hat) above a
threshold (high signal-to-noise). Each goes to the tensor's row of an fp32 [T, 5] buffer with
one atomic per program. Tied betas bound |u| <= |m_hat| / sqrt(v_hat) <= 1.
In the loop each thread keeps its own partial sums in registers (squares as fused
multiply-adds; telemetry is not bound to torch's rounding); they are reduced across threads
once per program. u = q / c with q = m / (sqrt(v) / sqrt(c) + eps) the kernel's own
quotient, so sums of q^2 and max |q| are scaled by 1/c once; the high-SNR test
|m| / (sqrt(c) sqrt(v)) > threshold is made as |m| > threshold * sqrt(c) * sqrt(v), without a
division (equal but at rounding boundaries).

Note [ratio8 kernel]
--------------------
STATE = int8 is ``state_dtype="ratio8"`` (Note [ratio8] in ratio8.py): exp_avg holds int8
codes q of r = m / sqrt(v), exp_avg_sq bf16 v. The block decodes m = (q / 127) sqrt(v_old) in
registers, steps as above, rounds v to bf16 (nearest, or the high 16 random bits), stores it,
and encodes m against that stored v (the low 16 bits): no fp32 moment in memory, 3 bytes of
state per element. The operations are ratio8.py's (Note [ratio8 arithmetic]) in its order, so
the interpreter gives the CPU paths' codes bit for bit; the GPU takes its sqrt and rsqrt as
the fast approximations (MUFU, a few ulp), which can move a code by one at a rounding boundary
and cost a few instructions where the IEEE forms cost a subroutine each (perf/kernel_report.py
counts them).

Note [clipping]
---------------
With ``max_grad_norm`` (optim/clipping.py) the host side computes the global grad norm on the
device and hands the kernel two scalars (fp32, or fp64 when a grad is fp64, as torch computes
them): the coefficient min(1, max_norm / (norm + 1e-6)) and a flag for a non-finite norm. The kernel multiplies each grad by the coefficient after
AMP's unscaling, before the moments (telemetry sees the clipped grad), and never writes the
clipped grad back: that write is what clip_grad_norm_ costs beyond this kernel. A non-finite
norm skips the step as AMP's found_inf does (nothing written, the step count not bumped).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import layout as L
from . import ratio8
from .multi_tensor import ALIGN_BYTES, MultiTensorTable

_ALIGN = tl.constexpr(ALIGN_BYTES)  # bytes promised by tl.multiple_of (Note [alignment])
# Philox-4x32 constants (Salmon et al., SC'11), as in triton.language.random.
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_ROUNDS = tl.constexpr(7)  # Note [philox rounds]
_FP32_MAX = tl.constexpr(3.4028234663852886e38)
# ratio8 (Note [ratio8 kernel]): ratio8.py's constants, one definition.
_LEVELS = tl.constexpr(float(ratio8.LEVELS))
_INV_LEVELS = tl.constexpr(ratio8.INV_LEVELS)
_NOISE_SCALE = tl.constexpr(ratio8.NOISE_SCALE)
_TINY = tl.constexpr(ratio8.TINY)
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + this rounds x half to even

# The shared layouts (layout.py): rows of the address table, columns of the hyperparameter
# table and of the telemetry rows.
_ROLE_PARAM = tl.constexpr(L.ROLE_PARAM)
_ROLE_GRAD = tl.constexpr(L.ROLE_GRAD)
_ROLE_EXP_AVG = tl.constexpr(L.ROLE_EXP_AVG)
_ROLE_EXP_AVG_SQ = tl.constexpr(L.ROLE_EXP_AVG_SQ)
_ROLE_MASTER = tl.constexpr(L.ROLE_MASTER)
_ROLE_STEP = tl.constexpr(L.ROLE_STEP)
_N_HYPER = tl.constexpr(L.N_HYPER)
_TELEMETRY_WIDTH = tl.constexpr(L.TELEMETRY_WIDTH)

# Note [block size]
# Each program walks one CHUNK of one tensor in BLOCK-sized steps, so the chunk table stays
# small (1B elements -> 16K rows). Every variant gives each thread 4 elements per step (2 for
# fp64, so no role needs more than one 128-bit access): fp32 roles then move in 128-bit
# accesses and bf16/fp16 roles in 64-bit ones (a warp still reads 256 contiguous bytes), and
# every role shares one register layout. Giving each thread 16 bytes of the *narrowest* dtype
# instead (8 elements with bf16) made fp32 roles need a second layout: every block went
# through shared memory (convert_layout) and the mixed-precision variants used 148-178
# registers; at 4 elements none moves data between threads in the loop (perf/kernel_report.py).
#
# Note [registers]
# A memory-bound loop needs loads in flight, so occupancy: at most 64 registers per thread
# keeps 1,024 threads (32 warps) per SM at 4 warps per program. ``maxnreg`` makes ptxas hold
# every variant to that; the kernel report checks that none spills for it.
#
# Note [no pipelining]
# ``num_stages=1``: Triton's software pipeliner would stage the loop's loads through shared
# memory (cp.async) to overlap iterations; an elementwise loop has nothing to overlap them with
# and it cost registers (a loop bounded by the chunk's element count compiled to 80).
#
# Note [step counts]
# The kernel bumps each tensor's step count (torch's state["step"], a one-element fp32 tensor
# the address table points at): no per-step foreach op on the host. Every program of a tensor
# reads the count at its start and uses t = count + 1; at its end it takes a ticket (an atomic
# add on the tensor's slot of a zeroed int32 buffer), and the program that draws the last
# ticket, cdiv(numel, CHUNK) - 1, stores t and resets the slot to 0 for the next launch. The
# last program to take a ticket is the last to finish, so every program of the tensor has read
# the count before it changes. An empty tensor has one program (it still counts a step, as
# torch.optim.AdamW counts one). An AMP step with found_inf returns before any of this: the
# count stays.
#
# Note [ticket ordering]
# Every thread of a program loads the step count at the program's start; the ticket is one
# scalar atomic, which Triton issues from one thread. Warps of a program run independently
# through the loop (nothing in an elementwise loop synchronises them), so without a barrier
# the first warp to finish could take the last ticket, and its program store t, while another
# warp of the same program has not yet loaded the count: that warp would step with t + 1. A
# ``tl.debug_barrier()`` (bar.sync) before the atomic makes every thread's load happen before
# the ticket; the atomic's acquire-release order (Triton's default) then orders the tickets of
# different programs. Once, the masked tail's telemetry reduction made Triton emit a barrier
# there by chance; this one does not depend on what else the kernel does.
#
# Note [fp64]
# fp64 params step in fp64. The one bias-correction division per element, sqrt(v) / sqrt(c),
# becomes a multiplication by 1 / sqrt(c) computed once per program: within an ulp of torch's
# division (the fp64 tests compare at rtol 1e-12), and an fp64 division is ~15 instructions.
# fp32 keeps torch's division, bit for bit.
CHUNK = 65536
NUM_WARPS = 4
_THREADS = tl.constexpr(32 * NUM_WARPS)
NUM_STAGES = 1  # Note [no pipelining]
MAX_REGISTERS = 64  # Note [registers]


@functools.lru_cache(maxsize=None)
def block_for(param_dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
    widest = max(d.itemsize for d in (param_dtype, state_dtype))
    return min(4, 16 // widest) * 32 * NUM_WARPS


# FMA contraction off: results then match torch's op-by-op rounding, on every Triton version
# (Triton 3.9 warns that its default flips in 3.10).
ENABLE_FP_FUSION = False

# int8 as the state dtype is ratio8: int8 exp_avg codes, bf16 exp_avg_sq (Note [ratio8 kernel]).
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64, torch.int8: tl.int8}

# Launch counter: tests assert one launch per (device, dtype) group per step.
launches = 0


@triton.jit
def _rne_bf16(x):
    """fp32 -> bf16, round to nearest even, with integer operations, for arithmetic results.

    Note [bf16 rounding]: the Triton interpreter truncates fp32->bf16 casts whatever
    ``fp_downcast_rounding`` says, so a cast would give the GPU and the CPU tests different
    bits. Rounding the bits ourselves gives both the same, so CPU tests check it exactly:
    add 0x7FFF plus the lowest kept bit (ties go to even), keep the high half. NaN: the
    values rounded here are results of arithmetic, whose NaNs are quiet; a signed minimum with
    0x7FC00000 first makes every positive one (the GPU's is always 0x7FFFFFFF) the canonical
    0x7FC00000, so the result is 0x7FC0 as torch's ``.to(torch.bfloat16)`` gives, where adding
    to 0x7FFFFFFF would carry into the sign bit. (A negative quiet NaN, x86's default NaN in
    the interpreter, stays a negative NaN.) One integer minimum instead of a float compare and
    a select on each value: the bf16-state loop needs 4 instructions per value, not 6."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.minimum(bits, 0x7FC00000)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    # the high halves: packing two of them into a register is one PRMT, the shift is free
    return (rounded >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_to_bf16(x, r16, STOCHASTIC: tl.constexpr):
    """fp32 -> bf16. Stochastic: add 16 random low bits, then truncate, so that
    E[round(x)] = x (unbiased); the result is exact in bf16, so no cast rounding is involved.
    Otherwise round to nearest even (Note [bf16 rounding])."""
    if STOCHASTIC:
        # NaN: the same minimum as _rne_bf16 keeps the GPU's 0x7FFFFFFF from carrying into
        # the sign bit (it would become -0.0).
        bits = tl.minimum(x.to(tl.int32, bitcast=True), 0x7FC00000) + r16.to(tl.int32)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return _rne_bf16(x)


@triton.jit
def _ratio8_encode(m, v, r16, bound, STOCHASTIC: tl.constexpr):
    """int8 code of m against the stored v (Note [ratio8 arithmetic] in ratio8.py): x =
    m rsqrt(max(v, TINY)) * 127 clamped to [-B, B] (B = ``bound``, a whole number <= 127: Note
    [ratio8 update bound]), then floor(x + u) with u = 16 random bits * 2**-16 (unbiased), or
    rounded half to even; neither crosses B."""
    x = (m * tl.rsqrt(tl.maximum(v, _TINY))) * _LEVELS
    x = tl.clamp(x, -bound, bound)  # NaN -> -B (maxNum/minNum, as torch.fmax/fmin)
    if STOCHASTIC:
        # u * 2**-16 is exact, so the fused form rounds as x + u * 2**-16 does
        return tl.floor(tl.fma(r16.to(tl.float32), _NOISE_SCALE, x)).to(tl.int8)
    else:
        # the low byte of x + 1.5 * 2**23 is x rounded half to even, as an int8
        return (x + _RNE_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _philox(key, c0, c1, c2, c3):
    """Philox-4x32 with PHILOX_ROUNDS rounds of counter (c0, c1, c2, c3) under the 64-bit
    ``key``: the same function as ``tl.philox(..., n_rounds=PHILOX_ROUNDS)``
    (tests/test_rng.py checks bit equality), with each round's 32x32-bit products taken from
    one widening multiply. ``tl.philox`` asks for the high and low halves separately and ptxas
    keeps them as two instructions: 4 multiplies per round instead of 2.

    Note [philox rounds]: 7 rounds, not tl.philox's default 10. Salmon et al. (SC'11,
    "Parallel random numbers: as easy as 1, 2, 3") report Philox-4x32-7 as passing TestU01's
    BigCrush, and recommend 10 as a safety margin. Stochastic rounding only needs noise
    uniform and uncorrelated with the value; the three rounds saved are 6 instructions per
    element of pure bf16 (two calls per 4 elements), what brings that variant under its
    instruction budget (perf/kernel_report.py)."""
    key = key.to(tl.uint64)
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        pa = c0.to(tl.uint64) * _PHILOX_ROUND_A
        pb = c2.to(tl.uint64) * _PHILOX_ROUND_B
        n0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        n2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        c0 = n0
        c2 = n2
        k0 = k0 + _PHILOX_KEY_A
        k1 = k1 + _PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def _random_bits(key, base, t_u32, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """32 random bits for each element ``base + [0, BLOCK)`` (``ra``), and 32 more (``rb``) when
    WIDE.

    Note [rng]: Philox-4x32-7 (Note [philox rounds]) keyed by the tensor's stream key (Note [rng streams] in
    tiedadam/optim/rng.py: seed, param group, position, shard), counter = (element group lo,
    element group hi, step, stream) where an element group is 4 neighbouring elements, which
    one thread holds in registers (Note [block size]): one call gives each of them 32 bits
    (bf16 exp_avg takes the low 16, exp_avg_sq the high 16), and join + reshape hand them out
    without moving data between threads. Pure bf16 also rounds the param: a second call
    (stream 1) gives 32 more bits per element, of which the param takes 16. Reproducible for a key and step, independent across elements, steps
    and tensors, and nothing to save in a checkpoint."""
    q = (base >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    lo = q.to(tl.uint32)
    hi = (q >> 32).to(tl.uint32)
    t = tl.zeros([BLOCK // 4], dtype=tl.uint32) + t_u32
    r0, r1, r2, r3 = _philox(key, lo, hi, t, t * 0)
    ra = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])
    rb = ra
    if WIDE:
        r0, r1, r2, r3 = _philox(key, lo, hi, t, t * 0 + 1)
        rb = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])
    return ra, rb


@triton.jit
def _sum_squares(x, BLOCK: tl.constexpr):
    """[BLOCK] -> [THREADS]: sum of squares of each thread's elements as a chain of fused
    multiply-adds (one instruction per element; telemetry is not bound to torch's rounding)."""
    if BLOCK // _THREADS == 4:
        a, b = tl.split(tl.reshape(x, [_THREADS, 2, 2]))
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return tl.fma(b1, b1, tl.fma(a1, a1, tl.fma(b0, b0, a0 * a0)))
    else:
        a0, a1 = tl.split(tl.reshape(x, [_THREADS, 2]))
        return tl.fma(a1, a1, a0 * a0)


@triton.jit
def _per_thread(x, BLOCK: tl.constexpr, MAX: tl.constexpr):
    """[BLOCK] -> [THREADS]: the sum (or max) of the elements each thread holds, in registers
    (thread i holds elements [E*i, E*i + E), Note [block size])."""
    rows = tl.reshape(x, [_THREADS, BLOCK // _THREADS])
    if MAX:
        return tl.max(rows, axis=1)
    else:
        return tl.sum(rows, axis=1)


@triton.jit
def _sqrt(x, COMPUTE: tl.constexpr):
    # IEEE round-to-nearest in both precisions (fp64 sqrt is always correctly rounded).
    if COMPUTE == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _tied_adamw_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, w_ptrs, mask, base,
                      decay, one_minus_beta, beta, lerp_coef, step_size, bc_sqrt, eps,
                      inv_scale, clip_coef, key, t_u32, thr_bc, code_bound,
                      PARAM: tl.constexpr, STATE: tl.constexpr, HAS_MASTER: tl.constexpr,
                      HAS_SCALE: tl.constexpr, CLIP: tl.constexpr, STATE_SR: tl.constexpr,
                      PARAM_SR: tl.constexpr, TELEMETRY: tl.constexpr, MASKED: tl.constexpr,
                      BLOCK: tl.constexpr):
    """One BLOCK of the update, elements ``base + [0, BLOCK)`` of the tensor. ``mask`` is None
    on whole blocks of aligned tensors (unmasked access).

    Math in fp32 registers, or fp64 for fp64 params (as torch.optim.AdamW computes in the
    param's dtype). Returns this block's telemetry partials (Note [telemetry]); zeros when
    TELEMETRY is off, which the compiler removes. The partials are per thread
    ([THREADS]: each thread's elements summed in registers), reduced across threads once per
    program, after the loop."""
    COMPUTE: tl.constexpr = tl.float64 if PARAM == tl.float64 else tl.float32
    g = tl.load(g_ptrs, mask=mask).to(COMPUTE)
    if HAS_SCALE:
        g = g * inv_scale
        # Note [amp]: the unscaled grad is written back, as torch's fused AdamW does, so that
        # p.grad reads the same after scaler.step() on every backend.
        if PARAM == tl.bfloat16:
            tl.store(g_ptrs, _rne_bf16(g), mask=mask)
        else:
            tl.store(g_ptrs, g.to(PARAM), mask=mask)
    if CLIP:
        g = g * clip_coef  # Note [clipping]: after the write-back, which stays unclipped
    if HAS_MASTER:
        p = tl.load(w_ptrs, mask=mask)
    else:
        p = tl.load(p_ptrs, mask=mask).to(COMPUTE)
    v = tl.load(v_ptrs, mask=mask).to(COMPUTE)
    if STATE == tl.int8:  # ratio8: m = r sqrt(v) (Note [ratio8 kernel])
        # sqrt(inf) decodes as FP32_MAX: code 0 stays m = 0 where v overflowed (Note [ratio8])
        m = (tl.load(m_ptrs, mask=mask).to(tl.float32) * _INV_LEVELS) * tl.minimum(
            tl.sqrt(v), _FP32_MAX, propagate_nan=tl.PropagateNan.ALL)
    else:
        m = tl.load(m_ptrs, mask=mask).to(COMPUTE)

    p = p * decay
    # torch's lerp_(g, w) with w = 1 - beta, both of its branches: m + w*(g - m) for w < 0.5,
    # else g - (g - m)*beta (exact at w = 1, beta = 0). Written as base + coef*d with coef = w
    # or -beta (g + d*(-beta) is g - d*beta bit for bit): one multiply-add and a select per
    # element, where two branches if-converted cost both.
    d = g - m
    m = tl.where(one_minus_beta < 0.5, m, g) + lerp_coef * d
    v = v * beta + one_minus_beta * g * g
    if STATE == tl.int8:
        # ratio8: the GPU's fast sqrt and division (Note [ratio8 kernel]); bc_sqrt holds
        # 1 / sqrt(c)
        sqrt_v = tl.sqrt(v)
        q = tl.fdiv(m, sqrt_v * bc_sqrt + eps)
    else:
        sqrt_v = _sqrt(v, COMPUTE)
        if COMPUTE == tl.float64:
            denom = sqrt_v * bc_sqrt + eps  # Note [fp64]: bc_sqrt holds 1 / sqrt(c) here
        else:
            denom = _div(sqrt_v, bc_sqrt, COMPUTE) + eps
        q = _div(m, denom, COMPUTE)
    p = p - step_size * q

    gsq = 0.0
    qsq = 0.0
    qmax = 0.0
    nonfinite = 0.0
    high = 0.0
    if TELEMETRY:
        # Note [telemetry]: per-thread partial sums (no data leaves the thread in the loop).
        # u = q / c is scaled once per program; |m_hat| / sqrt(v_hat) > threshold is tested as
        # |m| > threshold * sqrt(c) * sqrt(v), without a division.
        bad = (~(tl.abs(g) <= _FP32_MAX)).to(tl.float32)  # NaN or +-inf
        hi = (tl.abs(m) > thr_bc * sqrt_v).to(tl.float32)
        g32 = g.to(tl.float32)
        q32 = q.to(tl.float32)
        qa = tl.abs(q32)
        if MASKED:
            g32 = tl.where(mask, g32, 0.0)
            q32 = tl.where(mask, q32, 0.0)
            qa = tl.where(mask, qa, 0.0)
            bad = tl.where(mask, bad, 0.0)
            hi = tl.where(mask, hi, 0.0)
        gsq = _sum_squares(g32, BLOCK)
        qsq = _sum_squares(q32, BLOCK)
        qmax = _per_thread(qa, BLOCK, True)
        nonfinite = _per_thread(bad, BLOCK, False)
        high = _per_thread(hi, BLOCK, False)

    if STATE_SR or PARAM_SR:
        ra, rb = _random_bits(key, base, t_u32, BLOCK, PARAM_SR)
    if STATE == tl.float32 or STATE == tl.float64:
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
    elif STATE == tl.int8:
        if STATE_SR:
            vb = _round_to_bf16(v, ra >> 16, True)
            q = _ratio8_encode(m, vb.to(tl.float32), ra & 0xFFFF, code_bound, True)
        else:
            vb = _rne_bf16(v)
            q = _ratio8_encode(m, vb.to(tl.float32), 0, code_bound, False)
        tl.store(v_ptrs, vb, mask=mask)
        tl.store(m_ptrs, q, mask=mask)
    elif STATE_SR:
        tl.store(m_ptrs, _round_to_bf16(m, ra & 0xFFFF, True), mask=mask)
        tl.store(v_ptrs, _round_to_bf16(v, ra >> 16, True), mask=mask)
    else:
        tl.store(m_ptrs, _round_to_bf16(m, 0, False), mask=mask)
        tl.store(v_ptrs, _round_to_bf16(v, 0, False), mask=mask)
    if HAS_MASTER:
        tl.store(w_ptrs, p, mask=mask)
    if PARAM == tl.float32 or PARAM == tl.float64:
        tl.store(p_ptrs, p, mask=mask)
    elif PARAM_SR:
        tl.store(p_ptrs, _round_to_bf16(p, rb & 0xFFFF, True), mask=mask)
    else:
        if PARAM == tl.bfloat16:
            tl.store(p_ptrs, _rne_bf16(p), mask=mask)
        else:  # fp16: the interpreter's cast (numpy) rounds to nearest even, as the GPU does
            tl.store(p_ptrs, p.to(PARAM, fp_downcast_rounding="rtne"), mask=mask)
    return gsq, qsq, qmax, nonfinite, high


@triton.jit
def _tensor_of_program(pid, addr_ptr, meta_ptr, chunk_ptr, n_tensors,
                       flat_p, flat_g, flat_m, flat_v, flat_w, flat_step, flat_numel,
                       flat_aligned, flat_group, flat_key,
                       PARAM: tl.constexpr, STATE: tl.constexpr, FLAT: tl.constexpr,
                       CHUNK: tl.constexpr):
    """The tensor this program steps: (index in the bucket, first element of its chunk, numel,
    param group, aligned flag, rounding stream key, and the base pointers of param, grad,
    exp_avg, exp_avg_sq, master and step). FLAT: one tensor passed as direct arguments (a ZeRO
    partition); otherwise read from the chunk, meta and address tables (Note [tables] in
    multi_tensor.py; roles in layout.py)."""
    if FLAT:
        tid = pid * 0  # one tensor: index 0 (a tensor, so it converts like the table's)
        start = pid.to(tl.int64) * CHUNK
        numel = flat_numel.to(tl.int64)
        group = flat_group
        aligned = flat_aligned
        key = flat_key
        p_base = flat_p
        g_base = flat_g
        m_base = flat_m
        v_base = flat_v
        w_base = flat_w
        step_ptr = flat_step
    else:
        tid = tl.load(chunk_ptr + pid)
        start = tl.load(chunk_ptr + tl.num_programs(0) + pid)
        numel = tl.load(meta_ptr + tid)
        group = tl.load(meta_ptr + n_tensors + tid)
        aligned = tl.load(meta_ptr + 2 * n_tensors + tid)
        key = tl.load(meta_ptr + 3 * n_tensors + tid)
        p_base = tl.load(addr_ptr + _ROLE_PARAM * n_tensors + tid).to(tl.pointer_type(PARAM))
        g_base = tl.load(addr_ptr + _ROLE_GRAD * n_tensors + tid).to(tl.pointer_type(PARAM))
        m_base = tl.load(addr_ptr + _ROLE_EXP_AVG * n_tensors + tid).to(
            tl.pointer_type(STATE))
        # ratio8 (STATE int8): exp_avg holds the codes, exp_avg_sq bf16 v
        V_STATE: tl.constexpr = tl.bfloat16 if STATE == tl.int8 else STATE
        v_base = tl.load(addr_ptr + _ROLE_EXP_AVG_SQ * n_tensors + tid).to(
            tl.pointer_type(V_STATE))
        w_base = tl.load(addr_ptr + _ROLE_MASTER * n_tensors + tid).to(
            tl.pointer_type(tl.float32))
        step_ptr = tl.load(addr_ptr + _ROLE_STEP * n_tensors + tid).to(
            tl.pointer_type(tl.float32))
    return (tid, start, numel, group, aligned, key, p_base, g_base, m_base, v_base, w_base,
            step_ptr)


@triton.jit
def _tied_adamw_kernel(
    addr_ptr, meta_ptr, chunk_ptr, n_tensors,  # tables (unused when FLAT)
    hyper_ptr,  # fp64 [G, 4]: lr, beta, eps, weight_decay
    scale_ptr, found_inf_ptr,  # fp32 scalars, read only when HAS_SCALE
    clip_ptr,  # [2] fp32 (fp64 with fp64 grads): coefficient, non-finite flag; when CLIP
    flat_p, flat_g, flat_m, flat_v, flat_w, flat_step, flat_numel, flat_aligned,  # FLAT only
    flat_group,  # FLAT only: the tensor's row in the hyperparameter table
    flat_key,  # FLAT only: the tensor's rounding stream key (Note [rng])
    tele_ptr, snr_threshold,  # fp32 [T, 5] per-tensor telemetry sums (used when TELEMETRY)
    ticket_ptr,  # int32 [T] zeros: programs of each tensor that finished (Note [step counts])
    PARAM: tl.constexpr, STATE: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, CLIP: tl.constexpr, STATE_SR: tl.constexpr,
    PARAM_SR: tl.constexpr, TELEMETRY: tl.constexpr, FLAT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Tied-beta AdamW over one chunk of one tensor (formula in the module docstring)."""
    pid = tl.program_id(0)
    COMPUTE: tl.constexpr = tl.float64 if PARAM == tl.float64 else tl.float32
    skip = False
    if HAS_SCALE:
        # AMP: a step with non-finite grads changes nothing (the host never looks).
        skip = tl.load(found_inf_ptr) != 0
        inv_scale = (1.0 / tl.load(scale_ptr)).to(COMPUTE)
    else:
        inv_scale = 1.0
    if CLIP:
        # Note [clipping]: a non-finite global norm skips the step as AMP's found_inf does
        clip_coef = tl.load(clip_ptr).to(COMPUTE)
        if HAS_SCALE:
            skip = skip | (tl.load(clip_ptr + 1) != 0)
        else:
            skip = tl.load(clip_ptr + 1) != 0
    else:
        clip_coef = 1.0

    (tid, start, numel, group, aligned, key, p_base, g_base, m_base, v_base, w_base,
     step_ptr) = _tensor_of_program(pid, addr_ptr, meta_ptr, chunk_ptr, n_tensors, flat_p,
                                    flat_g, flat_m, flat_v, flat_w, flat_step, flat_numel,
                                    flat_aligned, flat_group, flat_key, PARAM, STATE, FLAT,
                                    CHUNK)

    # Note [loop bounds]: a program updates the elements of its chunk that exist,
    # rem = min(numel - start, CHUNK), and no iteration touches nothing. Aligned tensors: an
    # unmasked, hinted loop over the whole BLOCKs of rem, then one masked block for what is
    # left (a tensor's tail). Misaligned views: a masked loop over rem. A 1,000-element tensor
    # costs 2 iterations, not CHUNK / BLOCK.
    rem = tl.minimum(numel - start, CHUNK)
    n_full = tl.where(aligned != 0, rem - rem % BLOCK, 0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    gsq = tl.zeros([_THREADS], dtype=tl.float32)
    qsq = tl.zeros([_THREADS], dtype=tl.float32)
    qmax = tl.zeros([_THREADS], dtype=tl.float32)
    nonfinite = tl.zeros([_THREADS], dtype=tl.float32)
    high = tl.zeros([_THREADS], dtype=tl.float32)
    if skip:
        if TELEMETRY:
            # The grads of a skipped step are still reported (their non-finite count is why
            # the step was skipped); nothing is written.
            for i in range(0, rem, BLOCK):
                o = start + i + lanes
                g = tl.load(g_base + o, mask=o < numel, other=0.0).to(tl.float32) * inv_scale
                bad = (~(tl.abs(g) <= _FP32_MAX)).to(tl.float32)
                gsq += _per_thread(g * g, BLOCK, False)
                nonfinite += _per_thread(bad, BLOCK, False)
            row = tele_ptr + _TELEMETRY_WIDTH * tid
            tl.atomic_add(row + 0, tl.sum(gsq, axis=0))
            tl.atomic_add(row + 3, tl.sum(nonfinite, axis=0))
        return

    # Per-program scalars in fp64, as torch computes them in Python floats.
    lr = tl.load(hyper_ptr + _N_HYPER * group + 0)  # columns: layout.HYPER_FIELDS
    beta = tl.load(hyper_ptr + _N_HYPER * group + 1)
    eps = tl.load(hyper_ptr + _N_HYPER * group + 2)
    weight_decay = tl.load(hyper_ptr + _N_HYPER * group + 3)
    t32 = tl.load(step_ptr) + 1.0  # this step's count (Note [step counts])
    t = t32.to(tl.float64)
    t_u32 = t32.to(tl.uint32)
    c = 1.0 - tl.exp(t * tl.log(beta))  # beta**t; beta = 0 gives exp(-inf) = 0
    step_size = (lr / c).to(COMPUTE)
    if COMPUTE == tl.float64:
        bc_sqrt = 1.0 / tl.sqrt(c)  # Note [fp64]
    elif STATE == tl.int8:
        bc_sqrt = (1.0 / tl.sqrt(c)).to(COMPUTE)  # Note [ratio8 kernel]
    else:
        bc_sqrt = tl.sqrt(c).to(COMPUTE)
    decay = (1.0 - lr * weight_decay).to(COMPUTE)
    one_minus_beta = (1.0 - beta).to(COMPUTE)
    beta_c = beta.to(COMPUTE)
    lerp_coef = tl.where(one_minus_beta < 0.5, one_minus_beta, -beta_c)
    eps_c = eps.to(COMPUTE)
    inv_c = 1.0 / c
    thr_bc = (snr_threshold * tl.sqrt(c)).to(COMPUTE)
    # ratio8's code bound floor(127 sqrt(c)) (Note [ratio8 update bound]; truncation is the
    # floor of this value in [0, 127])
    code_bound = (tl.sqrt(c) * _LEVELS).to(tl.int32).to(tl.float32)

    # Whole blocks of an aligned tensor: unmasked, hinted 16-byte-aligned vector access.
    # Pointers move to the chunk's start once: in the loops, offsets are int32 (< CHUNK) and
    # each address is one widening multiply-add, not a 64-bit add.
    p_c = p_base + start
    g_c = g_base + start
    m_c = m_base + start
    v_c = v_base + start
    w_c = w_base + start
    rem32 = rem.to(tl.int32)
    lanes32 = tl.arange(0, BLOCK)
    for i in range(0, n_full.to(tl.int32), BLOCK):
        base = start + i
        o = i + lanes32
        a, b, mx, nf, hi = _tied_adamw_block(
            tl.multiple_of(p_c + o, _ALIGN), tl.multiple_of(g_c + o, _ALIGN),
            tl.multiple_of(m_c + o, _ALIGN), tl.multiple_of(v_c + o, _ALIGN),
            tl.multiple_of(w_c + o, _ALIGN), None, base,
            decay, one_minus_beta, beta_c, lerp_coef, step_size, bc_sqrt, eps_c, inv_scale,
            clip_coef, key, t_u32, thr_bc, code_bound,
            PARAM, STATE, HAS_MASTER, HAS_SCALE, CLIP, STATE_SR, PARAM_SR, TELEMETRY, False,
            BLOCK)
        gsq += a
        qsq += b
        qmax = tl.maximum(qmax, mx)
        nonfinite += nf
        high += hi
    # The rest: a tail of an aligned tensor, or all of a misaligned view. Masked, no promise.
    # (A second loop, not a branch in the first: the hinted loop must stay free of the masked
    # body for its registers and its SASS, perf/sass.py Note [hot loop].)
    for i in range(n_full.to(tl.int32), rem32, BLOCK):
        base = start + i
        o = i + lanes32
        a, b, mx, nf, hi = _tied_adamw_block(
            p_c + o, g_c + o, m_c + o, v_c + o, w_c + o, o < rem32, base,
            decay, one_minus_beta, beta_c, lerp_coef, step_size, bc_sqrt, eps_c, inv_scale,
            clip_coef, key, t_u32, thr_bc, code_bound,
            PARAM, STATE, HAS_MASTER, HAS_SCALE, CLIP, STATE_SR, PARAM_SR, TELEMETRY, True,
            BLOCK)
        gsq += a
        qsq += b
        qmax = tl.maximum(qmax, mx)
        nonfinite += nf
        high += hi
    # Note [step counts]: the last of the tensor's programs to finish stores t; Note [ticket
    # ordering]: every thread of this program has read the count before the ticket is taken.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + tid, 1)
    if ticket == tl.maximum(tl.cdiv(numel, CHUNK), 1) - 1:
        tl.store(step_ptr, t32)
        tl.store(ticket_ptr + tid, 0)
    if TELEMETRY:
        # Note [telemetry]: one atomic per metric per program into the tensor's row.
        row = tele_ptr + _TELEMETRY_WIDTH * tid
        # u = q / c: sum u^2 = sum q^2 / c^2, max |u| = max |q| / c.
        tl.atomic_add(row + 0, tl.sum(gsq, axis=0))
        tl.atomic_add(row + 1, tl.sum(qsq, axis=0) * (inv_c * inv_c).to(tl.float32))
        tl.atomic_max(row + 2, tl.max(qmax, axis=0) * inv_c.to(tl.float32))
        tl.atomic_add(row + 3, tl.sum(nonfinite, axis=0))
        tl.atomic_add(row + 4, tl.sum(high, axis=0))


@functools.lru_cache(maxsize=None)
def launch_config(param_dtype: torch.dtype, state_dtype: torch.dtype, has_master: bool,
                  has_scale: bool, state_sr: bool, param_sr: bool, telemetry: bool,
                  clip: bool = False) -> dict:
    """The constexprs and launch options of one kernel variant (made once, not per launch)."""
    state_sr = state_sr and state_dtype in (torch.bfloat16, torch.int8)
    param_sr = param_sr and param_dtype == torch.bfloat16 and not has_master
    return dict(PARAM=_TL_DTYPES[param_dtype], STATE=_TL_DTYPES[state_dtype],
                HAS_MASTER=has_master, HAS_SCALE=has_scale, CLIP=clip, STATE_SR=state_sr,
                PARAM_SR=param_sr, TELEMETRY=telemetry, CHUNK=CHUNK,
                BLOCK=block_for(param_dtype, state_dtype), num_warps=NUM_WARPS,
                num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS, enable_fp_fusion=ENABLE_FP_FUSION)


def launch_tied_adamw(table: MultiTensorTable, hyper: torch.Tensor, *,
                      param_dtype: torch.dtype, state_dtype: torch.dtype, has_master: bool,
                      grad_scale: torch.Tensor | None = None,
                      found_inf: torch.Tensor | None = None,
                      state_sr: bool = False, param_sr: bool = False,
                      telemetry: torch.Tensor | None = None, snr_threshold: float = 0.5,
                      tickets: torch.Tensor, clip: torch.Tensor | None = None) -> None:
    """Launch the kernel once over a table (each tensor's group and rounding stream key travel
    in it; one flat tensor goes through ``launch_flat``).

    The step counts hold the count before this step; the kernel increments them (Note [step
    counts]). ``tickets``: int32 zeros, one per tensor (the kernel leaves them zero).
    ``clip``: [2] (coefficient, non-finite flag) on the device (Note [clipping]).
    """
    global launches
    has_scale = grad_scale is not None
    dummy = hyper  # any tensor: unused pointer arguments still need a value
    scale = grad_scale if has_scale else dummy
    tele = telemetry if telemetry is not None else dummy
    inf = found_inf if has_scale else dummy
    consts = launch_config(param_dtype, state_dtype, has_master, has_scale, state_sr, param_sr,
                           telemetry is not None, clip is not None)
    grid = (table.n_chunks,)
    _tied_adamw_kernel[grid](table.addr, table.meta, table.chunk, table.n_tensors, hyper,
                             scale, inf, dummy if clip is None else clip, dummy, dummy, dummy,
                             dummy, dummy, dummy, 0, 0, 0, 0, tele, snr_threshold, tickets, FLAT=False, **consts)
    launches += 1


def launch_flat(consts: dict, hyper: torch.Tensor, scale: torch.Tensor, inf: torch.Tensor,
                clip: torch.Tensor, tele: torch.Tensor, snr_threshold: float,
                tickets: torch.Tensor, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
                v: torch.Tensor, w: torch.Tensor, step: torch.Tensor, group: int,
                key: int) -> None:
    """One flat tensor (Note [flat] in optim/triton_backend.py) with its arguments resolved:
    ``consts`` from ``launch_config``, ``scale``/``inf``/``clip``/``tele`` tensors (``hyper``
    where unused). Positional, for the flat path's per-step call (Note [flat]; perf/bench_host.py's flat row). The
    alignment promise is computed here from the addresses, every launch."""
    global launches
    n = p.numel()
    # aligned iff every address is a multiple of ALIGN_BYTES (a power of two): then so is
    # their OR, and only then
    aligned = int(not (p.data_ptr() | g.data_ptr() | m.data_ptr() | v.data_ptr()
                       | w.data_ptr()) % ALIGN_BYTES)
    grid = (max(-(-n // CHUNK), 1),)  # an empty tensor still counts its step
    _tied_adamw_kernel[grid](hyper, hyper, hyper, 0, hyper, scale, inf, clip, p, g, m, v, w,
                             step, n, aligned, group, key, tele, snr_threshold, tickets,
                             FLAT=True, **consts)
    launches += 1
