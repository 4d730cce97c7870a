"""The native CPU step (native_cpu.cpp): built at first use by ``torch.utils.cpp_extension``,
as DeepSpeed builds its CPU Adam, cached on disk (torch's extensions directory, keyed by the
source and flags), with OpenMP over the tensor and the widest of AVX-512 / AVX2 that torch
reports for this CPU (``torch.backends.cpu.get_cpu_capability()``).

``run`` has the compiled step's signature (tied_adamw_cpu.run) and the same math: bit for bit
the Triton kernel's when rounding to nearest, the compiled step's bits when rounding
stochastically (native_cpu.cpp's header). Where it cannot be built (no C++ compiler, a build
error) it says why once and returns False, and the caller takes the next route.
"""

from __future__ import annotations

import os
import time
import warnings

import torch
from torch import Tensor

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_cpu.cpp")
# ATen's vector types pick their width from these macros (Note [CPU_CAPABILITY namespace] in
# ATen/cpu/vec/vec_base.h); -ffp-contract=off: no fused multiply-adds, as the kernel computes
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f",
               "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}

_module = None
_broken: str | None = None
build_seconds: float | None = None  # the first load's time in this process (a build, or the cache)
isa: str | None = None


def _flags() -> tuple[str, list[str]]:
    cap = torch.backends.cpu.get_cpu_capability()
    name = "AVX512" if "AVX512" in cap else "AVX2" if "AVX2" in cap else "DEFAULT"
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    return name, flags + _ISA_FLAGS.get(name, [])


def load():
    """The built module, or None (the reason in ``unavailable_reason()``, warned once)."""
    global _module, _broken, build_seconds, isa
    if _module is not None or _broken is not None:
        return _module
    name, flags = _flags()
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load as build
        _module = build(name=f"tiedadam_native_cpu_{name.lower()}", sources=[_SOURCE],
                        extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, a build error: the caller's next route
        _broken = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        warnings.warn(f"tiedadam: the native CPU step could not be built ({_broken}); CPU "
                      f"tensors in bf16-state, ratio8, master-weight and bf16-param modes use "
                      f"the slower paths from now on in this process", RuntimeWarning,
                      stacklevel=3)
        return None
    build_seconds = time.perf_counter() - t0
    isa = name
    return _module


def unavailable_reason() -> str | None:
    load()
    return _broken


def run_many(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
             exp_avg_sqs: list[Tensor], masters: list[Tensor | None], s: Tensor, keys: Tensor,
             *, has_scale: bool, state_sr: bool, param_sr: bool, rows: Tensor | None = None,
             snr_threshold: float = 0.0) -> Tensor | None:
    """Step a param group's CPU tensors in place with one native call (Note [native many] in
    native_cpu.cpp): ``s`` fp32 [N, 12] (``tied_adamw_cpu.scalars`` per tensor and c = 1 -
    beta^t), ``keys`` int32 [N, 2]; ``rows``, fp32 [N, 5], receives the telemetry fields
    (optim/telemetry.py) of the tensors stepped, computed in the same pass. Returns which
    tensors it stepped (bool [N]: layouts it does not walk are left untouched), or None
    without a build."""
    mod = load()
    if mod is None:
        return None
    return mod.step_many(params, grads, exp_avgs, exp_avg_sqs, masters, s, keys, has_scale,
                         state_sr, param_sr, rows, snr_threshold)


def run(p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor | None, s: Tensor,
        keys: Tensor, *, has_scale: bool, state_sr: bool, param_sr: bool) -> bool:
    """Step one contiguous CPU tensor in place (the caller verified layouts and dtypes);
    ``s``, ``keys`` as for tied_adamw_cpu.run. False (nothing changed) without a build."""
    mod = load()
    if mod is None:
        return False
    mod.step(p, g, m, v, w, s, keys, has_scale, state_sr, param_sr)
    return True
