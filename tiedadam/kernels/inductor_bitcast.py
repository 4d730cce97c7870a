"""Vector bit casts in inductor's CPU code while the CPU step compiles (Note [vector bitcast]).

Note [vector bitcast]
---------------------
Stochastic rounding needs the bits of an fp32 value (``x.view(torch.int32)``) and back. Inductor
lowers that view to ``to_dtype_bitcast``; its vector code generator (``CppVecOverrides`` in
torch/_inductor/codegen/cpp.py) has no method for it, so every bit cast falls back to
``_scalarize``: store the vector to a stack array, cast element by element, load it back. At
the 8-element tile the compiler mostly sees through that; at the 16-element tile that bf16
loads and stores want (Note [cpu tiling] in tied_adamw_cpu.py) it does not, and stochastic
rounding had to stay at 8 wide, where each bf16 load and store goes through a half vector. The
8-wide tile, not the hash or the casts, was the cost (20M elements, 2 threads, the same run:
round to nearest 8 wide 27.8 ms, 16 wide 15.6-18.6; stochastic 8 wide 36.2-38.8 ms).

ATen's vector library has the operation: ``at::vec::cast<int32_t>(Vectorized<float>)`` is a
reinterpretation of the lanes (one register move on AVX2/AVX-512, a store and load in the
generic fallback), and a 16-element tile is a ``VectorizedN`` of two such vectors. While
``vector_bitcast()`` is active, a bit cast between 32-bit types in vector code is written as
that; everything else goes to inductor's own method. The generated code computes the same bits
as before (tests/test_cpu_step.py compares the compiled step with the same function run
eagerly, bit for bit), so a graph compiled without it (an older cache entry) is only slower.
Stochastic rounding at 16 wide, same run: 22.7-23.9 ms against 36.2-38.8 at 8 wide.

It is active only around tiedadam's own compiled calls (compiling happens inside the first call
of a mode), and it is left off where this torch's inductor does not have the pieces it uses
(``AVAILABLE``): then the step compiles as before, at 8 wide for stochastic rounding.
"""

from __future__ import annotations

from contextlib import contextmanager

try:
    from torch._inductor.codegen import cpp as _cpp
    from torch._inductor.codegen.cpp_utils import DTYPE_TO_CPP as _DTYPE_TO_CPP
    from torch._inductor.virtualized import V as _V

    _ORIGINAL = _cpp.CppVecOverrides.__dict__["to_dtype_bitcast"]
    AVAILABLE = (isinstance(_ORIGINAL, staticmethod)
                 and hasattr(_cpp.CppVecKernel, "_get_num_vectors"))
except Exception:  # another inductor: compile as it does
    AVAILABLE = False


def _vec_bitcast(x, dtype, src_dtype):
    """``to_dtype_bitcast`` for vector code: 32-bit lanes reinterpreted with ``at::vec::cast``;
    any other case goes to inductor's method."""
    if getattr(x, "is_vec", False) and dtype.itemsize == src_dtype.itemsize == 4:
        n = _V.kernel._get_num_vectors(src_dtype)
        cpp = _DTYPE_TO_CPP[dtype]
        if n == 1:
            return f"at::vec::cast<{cpp}>({x})"
        lanes = ", ".join(f"at::vec::cast<{cpp}>({x}[{i}])" for i in range(n))
        return f"at::vec::VectorizedN<{cpp}, {n}>({lanes})"
    return _ORIGINAL.__func__(x, dtype, src_dtype)


@contextmanager
def vector_bitcast():
    """Inside: inductor's CPU vector code bit-casts 32-bit lanes in registers (Note [vector
    bitcast]); restored on exit. Does nothing where ``AVAILABLE`` is False."""
    if not AVAILABLE:
        yield
        return
    _cpp.CppVecOverrides.to_dtype_bitcast = staticmethod(_vec_bitcast)
    try:
        yield
    finally:
        _cpp.CppVecOverrides.to_dtype_bitcast = _ORIGINAL
