"""The tied-beta AdamW update for CPU tensors, in one pass over memory, for the modes torch's
fused AdamW does not cover: bf16 states (rounded to nearest or stochastically), ratio8 moments, fp32 master
weights for bf16/fp16 params, pure bf16 params. One elementwise function that torch.compile
(inductor) turns into one vectorised C++ loop over the tensor; nothing hand-written in C++.

Math: the Triton kernel's (module docstring of ``tied_adamw.py``), operation for operation in
fp32, with the same per-tensor scalars (``scalars``), so round-to-nearest results equal the
kernel's bit for bit (tests/test_cpu_step.py). Inductor compiles without floating-point
contraction (its default), as the kernel does (``ENABLE_FP_FUSION = False``).

Note [cpu rng]
--------------
Stochastic rounding adds 16 random bits below a bf16's last bit and truncates (unbiased:
E[round(x)] = x), as the kernel does. The kernel's bits come from Philox-4x32, whose 32x32->64
bit multiplies have no AVX2 vector instruction; emulated in vectorised int64 code they would
cost more than the rest of the step. Here each element's 32 bits are a counter-based hash of
its index under the (tensor, step) key k = mix(stream key, t) (``optim/rng.py``): two rounds of
Wellons' lowbias32 (xor-shift / multiply, 32-bit integer vector operations; best-known
avalanche for its size), ``h = H(H(i ^ k_lo) ^ k_hi)``. exp_avg takes the low 16 bits,
exp_avg_sq the high 16; a pure-bf16 param draws one more round. Like the kernel's: reproducible
from the seed and step (resumed runs round as uninterrupted ones), independent across elements,
steps and tensors, nothing to checkpoint. Not the kernel's bits: stochastic results agree with
the Triton kernel in distribution (tests), not bit for bit. Element indices are taken modulo
2**32 (xor-ed with the index's high word), far beyond any partition size in use.

Note [cpu nan]
--------------
Adding noise to a NaN's bits can carry: into the sign bit from the GPU's 0x7FFFFFFF (-0.0),
and from a negative NaN whose high half is 0xFFFF (0xFFFFFFFF, a negated GPU NaN) through zero
(+0.0). The Triton kernel clamps with one integer minimum, enough there: GPU arithmetic returns
the canonical 0x7FFFFFFF for every NaN (Note [bf16 rounding] in tied_adamw.py). x86 arithmetic
instead passes an input NaN's sign and payload on: with that minimum, a grad holding 0xFFFFFFFF
made the moments +0.0 (and the torch-op path, optim/torch_backend.py, had no guard at all: the
GPU's NaN became -0.0 there). Both now round through one function, ``round_bf16``
(bf16_round.py), which makes every NaN 0x7FC00000 before the noise (a vector compare and a
select per value). tests/test_cpu_step.py feeds such NaNs
through both and NaN grads through the compiled step.

Note [cpu compile]
------------------
One compiled graph per mode (flags), ``dynamic=True`` so that every tensor size shares it. Each
mode compiles a function of its own, a copy of ``tied_adamw_step``'s code: dynamo counts
recompilations per code object and fails at 8 (``recompile_limit``; ``fullgraph=True`` makes
that an error), and the modes of one process (the test suite runs a dozen) with their variants
(grad mode, requires_grad, size-1 tensors) would reach it on one code object. The
first call of a mode in a process compiles (inductor caches the C++ on disk, so later processes
load it quickly); ``compile_seconds`` records what each mode cost, for the benchmarks to
report (perf/bench_offload.py). Without a working C++ compiler the caller
falls back to torch ops (``optim/torch_backend.py``), warning once.

Note [cpu fallback]
-------------------
``run`` never raises into a step: by the time it runs, the step counts of its bucket are bumped
and other tensors may be stepped. A failure to compile the first time (no C++ compiler), or
later (dynamo guards the compiled function on torch's global state: the thread count,
deterministic algorithms, autocast, grad mode; a change compiles a new variant, and after
``recompile_limit`` variants dynamo raises ``FailOnRecompileLimitHit``), comes from dynamo and
inductor before the compiled code runs, so nothing was written: ``run`` returns False, the
caller steps that tensor with torch ops, and every later call in the process does the same
(one warning says why).

Note [compile threads]
----------------------
Inductor writes the OpenMP loop only when the process has more than one thread at compile time,
and its on-disk cache does not key on the thread count: a step compiled in a 1-thread process
(a test run under OMP_NUM_THREADS=1) is loaded, serial, by a later 2-thread process with the
same cache directory, and runs several times slower. Set the thread count before the first step (DeepSpeed does), and keep test
runs and training runs in different TORCHINDUCTOR_CACHE_DIRs. perf/bench_offload.py compiles in
a fresh cache directory for this reason.

Note [cpu tiling]
-----------------
Inductor picks its vector tile from the fp32 width (8 elements on AVX2) unless *every* node of
the fused kernel involves a 16-bit type; then 16 (``TilingSelect.select_tiling`` in
torch/_inductor/codegen/cpp.py). At 8, each bf16 load and store moves half a vector through a
stack buffer, and the bf16-state step (20 bytes per element) ran slower than torch's fused fp32
step (28 bytes).

The node that held the tile at 8 was a copy. ``p.copy_(new_p)`` on an input that the new value
also reads is lowered as a computed buffer plus a pure copy into the input, and for an fp32
param that copy touches nothing but fp32. A foreach copy (``_compat.foreach_copy_``) of all
outputs at once is lowered differently: inductor writes each computed value straight into its
input (no copy node, the path torch.optim's compiled foreach step takes), so every node reads a
bf16 moment and the tile is 16; round to nearest then beats torch's fused fp32 step, as its
bytes say it should.

Stochastic rounding's int32/fp32 bit casts have no vector form in inductor's code generator
(it casts element by element through a stack buffer); at 16 wide that costs more than the wider
tile saves, so stochastic rounding of bf16 states for an fp32 param keeps per-output copies and
the 8-wide tile, the faster of the two. Modes that also run 8 wide: AMP unscaling of an fp32
grad (its write-back is fp32 only) and fp32 master weights (the master's write-back copies a
buffer both outputs read). This step is the route where the native one (native_cpu.cpp) cannot
be built; the native one sets the CPU speed.

Note [cpu index]
----------------
The element index is hashed as int32 (``torch.arange(n, dtype=torch.int32)``): vectorised 32-bit
lanes. An int64 index costs AVX2 a scalar 64-bit shift and narrowing per element.
Tensors of 2**31 elements or more (``wide``, a separate compile) take the int64 index and fold
its high word in: the same bits as the int32 path below 2**31. Inductor builds the index vector
from 16 scalars.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import Tensor

from .. import _compat
from . import ratio8
from .bf16_round import round_bf16, rounded_bf16_value

_MASK16 = 0xFFFF
_LOWBIAS_A = 0x7FEB352D
_LOWBIAS_B = 0x846CA68B - (1 << 32)  # as int32 (two's complement: same low 32 bits)
_STREAM1 = 0x632BE5AB  # a second stream for the pure-bf16 param's bits
_INT32_MAX = (1 << 31) - 1


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int32 bits (torch's >> is arithmetic for signed ints)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _lowbias32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 on int32 bits: x ^= x >> 16; x *= A; x ^= x >> 15; x *= B;
    x ^= x >> 16 (multiplies wrap modulo 2**32, as the vector instructions do)."""
    x = x ^ _shr(x, 16)
    x = x * _LOWBIAS_A
    x = x ^ _shr(x, 15)
    x = x * _LOWBIAS_B
    return x ^ _shr(x, 16)


def random_bits(n: int, keys: Tensor, stream: int = 0, wide: bool = False) -> Tensor:
    """int32 [n]: 32 random bits per element for key (k_lo, k_hi) = ``keys`` (Note [cpu rng]).
    ``wide`` for n > 2**31 - 1 (Note [cpu index]); the bits are the same either way."""
    if wide:
        idx = torch.arange(n, dtype=torch.int64)
        lo = (idx ^ (idx >> 32)).to(torch.int32)
    else:
        lo = torch.arange(n, dtype=torch.int32)
    h = _lowbias32(lo ^ keys[0])
    h = _lowbias32(h ^ keys[1])
    if stream:
        h = _lowbias32(h ^ stream)
    return h


def tied_adamw_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor | None,
                    s: Tensor, keys: Tensor, has_master: bool, has_scale: bool,
                    state_sr: bool, param_sr: bool, wide: bool = False) -> None:
    """One step of one flat CPU tensor, in place. ``s`` fp32 [11] = ``scalars(...)``; ``keys``
    int32 [2] (Note [cpu rng]); ``w`` the fp32 master (``has_master``); ``wide`` for tensors
    of 2**31 elements or more (Note [cpu index])."""
    decay, omb, beta, coef, step_size, bc_sqrt, eps, inv_scale, inv_bc_sqrt, clip, bound = (
        s[i] for i in range(11))
    gf = g.float()
    if has_scale:
        gf = gf * inv_scale
    gu = gf * clip  # Note [clipping] in tied_adamw.py (1.0 without clipping: exact)
    pf = w if has_master else p.float()
    vf = v.float()
    mf = ratio8.decode(m, vf) if m.dtype == torch.int8 else m.float()
    pf = pf * decay
    d = gu - mf
    mf = torch.where(omb < 0.5, mf, gu) + coef * d  # torch's lerp_, as the kernel writes it
    vf = vf * beta + omb * gu * gu
    if m.dtype == torch.int8:  # ratio8's order (Note [ratio8 arithmetic] in ratio8.py)
        q = mf / (torch.sqrt(vf) * inv_bc_sqrt + eps)
    else:
        q = mf / (torch.sqrt(vf) / bc_sqrt + eps)
    pf = pf - step_size * q
    n = p.numel()
    r = random_bits(n, keys, wide=wide) if state_sr or param_sr else None
    if m.dtype == torch.bfloat16:
        mn = round_bf16(mf, r & _MASK16 if state_sr else None)
        vn = round_bf16(vf, _shr(r, 16) if state_sr else None)
    elif m.dtype == torch.int8:  # ratio8: m encoded against the stored v (Note [ratio8])
        vs = rounded_bf16_value(vf, _shr(r, 16) if state_sr else None)
        vn = vs.to(torch.bfloat16)  # exact
        mn = ratio8.encode(mf, vs, r & _MASK16 if state_sr else None, bound=bound)
    else:
        mn, vn = mf, vf
    if param_sr:
        pn = round_bf16(pf, random_bits(n, keys, _STREAM1, wide) & _MASK16)
    else:
        pn = pf.to(p.dtype)  # fp32, or the nearest bf16/fp16
    dst, src = [p, m, v], [pn, mn, vn]
    if has_master:
        dst.append(w)
        src.append(pf)
    if has_scale:
        dst.append(g)  # Note [amp] in the kernel: the grad holds its unscaled value afterwards
        src.append(gf.to(g.dtype))
    if state_sr and not param_sr and p.dtype == torch.float32:
        for d_, s_ in zip(dst, src):  # the 8-wide tile (Note [cpu tiling])
            d_.copy_(s_)
    else:
        _compat.foreach_copy_(dst, src)  # the 16-wide tile (Note [cpu tiling])


def bias_correction(beta: float, t: float) -> float:
    """c = 1 - beta**t as the kernel computes it (fp64, exp(t log beta)); 1 for beta = 0."""
    return 1.0 - math.exp(t * math.log(beta)) if beta > 0 else 1.0


def scalars(lr: float, beta: float, eps: float, weight_decay: float, t: float,
            inv_scale: float = 1.0, clip: float = 1.0) -> Tensor:
    """fp32 [11]: the kernel's per-program scalars for step t, computed in fp64 as the kernel
    computes them (c = 1 - exp(t log beta)), then rounded to fp32: 1 - lr wd, 1 - beta, beta,
    the lerp coefficient, lr / c, sqrt(c), eps, 1 / grad scale, 1 / sqrt(c) (ratio8), the
    clip coefficient (Note [clipping] in tied_adamw.py) and ratio8's code bound (Note [ratio8
    update bound] in ratio8.py)."""
    c = bias_correction(beta, t)
    omb = 1.0 - beta
    beta32 = float(torch.tensor(beta, dtype=torch.float32))
    coef = omb if float(torch.tensor(omb, dtype=torch.float32)) < 0.5 else -beta32
    return torch.tensor([1.0 - lr * weight_decay, omb, beta, coef, lr / c, math.sqrt(c), eps,
                         inv_scale, 1.0 / math.sqrt(c), clip, ratio8.code_bound(beta, t)],
                        dtype=torch.float32)


compile_seconds: dict[tuple, float] = {}  # mode flags -> seconds its first call took
_compiled: dict[tuple, object] = {}  # mode flags -> its compiled function (Note [cpu compile])
_broken: str | None = None


def _step_fn(mode: tuple):
    """The compiled step for ``mode``: a function of its own over a copy of
    ``tied_adamw_step``'s code (Note [cpu compile])."""
    fn = _compiled.get(mode)
    if fn is None:
        own = _compat.fresh_code(tied_adamw_step, f"tied_adamw_step_mode{len(_compiled)}")
        fn = torch.compile(own, dynamic=True, fullgraph=True)
        _compiled[mode] = fn
    return fn


def reset_fallback() -> None:
    """Try compiling again after a fallback (Note [cpu fallback]): for tests."""
    global _broken
    _broken = None


def compiled_available() -> bool:
    """False once compiling failed in this process (then callers use torch ops)."""
    return _broken is None


def run(p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor | None, s: Tensor,
        keys: Tensor, *, has_scale: bool, state_sr: bool, param_sr: bool) -> bool:
    """Step one contiguous CPU tensor through the compiled function. False (nothing changed)
    when this process cannot compile (Note [cpu compile]); the first failure warns once."""
    global _broken
    if _broken is not None:
        return False
    wide = p.numel() > _INT32_MAX
    mode = (p.dtype, m.dtype, w is not None, has_scale, state_sr, param_sr, wide)
    first = mode not in compile_seconds
    t0 = time.perf_counter()
    try:
        # no_grad: what the optimizer runs under, so a direct call shares its compiled graph
        # (grad mode is part of dynamo's guard)
        with torch.no_grad():
            _step_fn(mode)(p, g, m, v, w, s, keys, w is not None, has_scale, state_sr, param_sr,
                       wide)
    except Exception as e:  # Note [cpu fallback]
        _broken = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        why = ("a C++ compiler is needed: inductor builds the step as C++" if first else
               "torch's global settings changed since the step compiled (thread count, "
               "deterministic algorithms, autocast, ...), and dynamo's guards on them asked "
               "for a recompilation it refused")
        warnings.warn(f"tiedadam: the compiled CPU step failed ({_broken}); CPU tensors in "
                      f"bf16-state, master-weight and bf16-param modes use the slower torch-op "
                      f"path from now on in this process ({why})", RuntimeWarning,
                      stacklevel=3)
        return False
    if first:
        compile_seconds[mode] = time.perf_counter() - t0
    return True
