"""Two vector forms that inductor's CPU code generator lacks, supplied while tiedadam's CPU step
compiles (Notes [vector bitcast], [vector arange]), and the cache key that records them (Note
[codegen key]).

Note [vector bitcast]
---------------------
Stochastic rounding needs the bits of an fp32 value (``x.view(torch.int32)``) and back. Inductor
lowers that view to ``to_dtype_bitcast``; its vector code generator (``CppVecOverrides`` in
torch/_inductor/codegen/cpp.py) has no method for it, so every bit cast falls back to
``_scalarize``: store the vector to a stack array, cast element by element, load it back. At
the 8-element tile the compiler mostly sees through that; at the 16-element tile that bf16
loads and stores want (Note [cpu tiling] in tied_adamw_cpu.py) it does not, and stochastic
rounding had to stay at 8 wide, where each bf16 load and store goes through a half vector. The
8-wide tile, not the hash or the casts, was the cost.

ATen's vector library has the operation: ``at::vec::cast<int32_t>(Vectorized<float>)`` is a
reinterpretation of the lanes (one register move on AVX2/AVX-512, a store and load in the
generic fallback), and a 16-element tile is a ``VectorizedN`` of two such vectors. While
``vector_codegen()`` is active, a bit cast between 32-bit types in vector code is written as
that; everything else goes to inductor's own method. Stochastic rounding then runs at the
16-wide tile too (perf/bench_offload.py measures the step).

Note [vector arange]
--------------------
The hash of stochastic rounding takes each element's index (``torch.arange``). Inductor writes
it as ``VectorizedN<int32_t,2>::arange(x0, 1)``, and ATen builds that vector from 16 scalars
(``base + i * step``: an address add and a lane insert each, some through the stack). While
``vector_codegen()`` is active, an integer arange is written as ``VectorizedN(x0) +
VectorizedN::arange(0, 1)``: one broadcast and one add, the arange of constants folded to one
constant by the C++ compiler; the same integers, wrapping alike: a few instructions fewer per
16 elements in the stochastic step's main loop.

Note [codegen key]
------------------
Inductor keys its on-disk cache of compiled graphs on the graph and its config, not on its own
code generator, so a graph compiled without these overrides (by an older tiedadam, or where
they are unavailable) would be loaded for one compiled with them, and the other way round.
``CACHE_KEY`` is a post-grad pass that does nothing to the graph; its ``uuid()`` names this
module's overrides and their version, and inductor folds a custom pass's uuid into the key
(``CustomGraphPass`` in torch/_inductor/custom_graph_pass.py). The step compiles with it
(``compile_options()``).

Both overrides are active only around tiedadam's own compiled calls (compiling happens inside
the first call of a mode), and each is left off where this torch's inductor lacks the pieces it
uses (``AVAILABLE`` for the bit cast, ``ARANGE_AVAILABLE``): the step then compiles as inductor
writes it, slower (8 wide for stochastic rounding without the bit cast), with the same bits.
tests/test_cpu_step.py checks the compiled step bit for bit against an fp64 reference.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

VERSION = 2  # bump when the code written here changes (Note [codegen key])

from .. import _compat

_INDUCTOR = _compat.inductor_cpu_codegen()  # None: this torch's inductor lacks the pieces
try:
    _cpp, _DTYPE_TO_CPP, _V = _INDUCTOR.cpp, _INDUCTOR.DTYPE_TO_CPP, _INDUCTOR.V
    _ORIGINAL = _cpp.CppVecOverrides.__dict__["to_dtype_bitcast"]
    AVAILABLE = (isinstance(_ORIGINAL, staticmethod)
                 and hasattr(_cpp.CppVecKernel, "_get_num_vectors"))
except Exception:  # another inductor: compile as it does
    AVAILABLE = False

try:
    import inspect as _inspect

    _ORIGINAL_ARANGE = _cpp.CppVecKernel.arange
    ARANGE_AVAILABLE = (list(_inspect.signature(_ORIGINAL_ARANGE).parameters)
                        == ["self", "index", "stride"]
                        and hasattr(_cpp.CppVecKernel, "_get_vec_type"))
except Exception:  # another inductor: its own arange
    ARANGE_AVAILABLE = False

_Pass = None if _INDUCTOR is None else _INDUCTOR.CustomGraphPass
if _Pass is None:  # no custom passes: no key (and no overrides worth keying)
    AVAILABLE = ARANGE_AVAILABLE = False


def _vec_bitcast(x, dtype, src_dtype):
    """``to_dtype_bitcast`` for vector code: 32-bit lanes reinterpreted with ``at::vec::cast``;
    any other case goes to inductor's method (Note [vector bitcast])."""
    if getattr(x, "is_vec", False) and dtype.itemsize == src_dtype.itemsize == 4:
        n = _V.kernel._get_num_vectors(src_dtype)
        cpp = _DTYPE_TO_CPP[dtype]
        if n == 1:
            return f"at::vec::cast<{cpp}>({x})"
        lanes = ", ".join(f"at::vec::cast<{cpp}>({x}[{i}])" for i in range(n))
        return f"at::vec::VectorizedN<{cpp}, {n}>({lanes})"
    return _ORIGINAL.__func__(x, dtype, src_dtype)


def _vec_arange(self, index, stride):
    """``CppVecKernel.arange`` for integer lanes: a broadcast of ``index`` plus a constant arange
    (Note [vector arange]); floating-point lanes go to inductor's method."""
    if index.is_vec or index.dtype not in (torch.int32, torch.int64):
        return _ORIGINAL_ARANGE(self, index, stride)
    vec = self._get_vec_type(index.dtype)
    var = self.cse.generate(self.compute, f"({vec}({index}) + {vec}::arange(0, {stride}))")
    var.dtype = index.dtype
    var.is_vec = True
    return var


if _Pass is not None:
    class _CodegenKey(_Pass):
        """A post-grad pass that leaves the graph alone; its uuid keys inductor's cache on the
        overrides in force (Note [codegen key])."""

        def __call__(self, graph) -> None:
            return None

        def uuid(self):
            return (f"tiedadam.inductor_codegen:v{VERSION}:bitcast={AVAILABLE}"
                    f":arange={ARANGE_AVAILABLE}")

    CACHE_KEY = _CodegenKey()
else:
    CACHE_KEY = None


def compile_options() -> dict:
    """``torch.compile(options=...)`` for a function compiled under ``vector_codegen()``."""
    return {} if CACHE_KEY is None else {"post_grad_custom_post_pass": CACHE_KEY}


@contextmanager
def vector_codegen():
    """Inside: inductor's CPU vector code bit-casts 32-bit lanes in registers and builds integer
    aranges from one broadcast (Notes [vector bitcast], [vector arange]); restored on exit.
    Leaves out what this inductor cannot take."""
    saved = []
    if AVAILABLE:
        saved.append((_cpp.CppVecOverrides, "to_dtype_bitcast", _ORIGINAL))
        _cpp.CppVecOverrides.to_dtype_bitcast = staticmethod(_vec_bitcast)
    if ARANGE_AVAILABLE:
        saved.append((_cpp.CppVecKernel, "arange", _ORIGINAL_ARANGE))
        _cpp.CppVecKernel.arange = _vec_arange
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
