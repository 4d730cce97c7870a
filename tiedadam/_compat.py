"""Every private torch API tiedadam uses, reached from here only.

Each entry says what it is for, the torch versions it was checked on, how its behaviour is
verified where that matters, and what happens when this torch lacks it. Nothing else in
``tiedadam/`` names a ``torch._...`` attribute or a DTensor's private fields.

| name here | torch API | used for | checked on | when missing |
|---|---|---|---|---|
| ``set_grad_enabled`` | ``torch._C._set_grad_enabled`` | ``step()`` under no_grad without a context manager's cost | 2.11, 2.13 | ``torch.set_grad_enabled`` |
| ``fused_adamw_`` | ``torch._fused_adamw_`` | the torch backend's step | 2.4-2.13 | CPU backend refuses with the reason |
| ``foreach_add_``, ``foreach_sub_``, ``foreach_copy_``, ``foreach_div_`` | ``torch._foreach_*`` | step counts; the compiled CPU step's outputs; unscaling grads before clipping (torch backend) | 2.4-2.13 | (required by torch.optim itself) |
| ``foreach_norm`` | ``torch._foreach_norm`` | the global grad norm of ``max_grad_norm`` (what ``clip_grad_norm_`` uses) | 2.11, 2.13 | one ``torch.linalg.vector_norm`` per grad |
| ``fsdp1_flattened`` | ``torch.distributed.fsdp._common_utils._is_fsdp_flattened`` | refusing ``max_grad_norm`` over FSDP1 shards without a process group | 2.13 | the ``_fsdp_flattened`` attribute it reads |
| ``TensorGuards``, ``dict_version`` | ``torch._C._dynamo.guards`` | the guard's fast check | 2.13 | ``fast_guard_works()`` False: full comparison |
| ``local_tensor``, ``LOCAL``, ``SPEC`` | ``DTensor._local_tensor``, ``._spec`` | a DTensor's local shard / sharding without autograd | 2.11, 2.13 | ``to_local()`` |
| ``shard_offset`` | ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` | rounding streams of DTensor shards | 2.13 | offset 0 |
| ``fresh_code`` | (dynamo counts recompilations per code object) | one compile budget per CPU-step mode | 2.13 | — |

``self_test()`` runs the behavioural checks (the guard's, the DTensor accessors'); the test suite
calls it (tests/test_compat.py), so a torch upgrade that breaks one fails there, not at a user's
step.
"""

from __future__ import annotations

import types
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

# -------------------------------------------------------------------------- autograd
set_grad_enabled = getattr(torch._C, "_set_grad_enabled", None)
if set_grad_enabled is None:  # pragma: no cover - every torch we know has it
    def set_grad_enabled(mode: bool) -> None:
        torch.set_grad_enabled(mode)

# -------------------------------------------------------------------------- fused ops
fused_adamw_ = getattr(torch, "_fused_adamw_", None)  # None: no fused AdamW in this torch
foreach_add_ = torch._foreach_add_
foreach_sub_ = torch._foreach_sub_
foreach_copy_ = torch._foreach_copy_
foreach_div_ = torch._foreach_div_
_foreach_norm = getattr(torch, "_foreach_norm", None)


def foreach_norm(tensors: list, dtype: torch.dtype | None = None) -> list:
    """The 2-norm of each tensor, returned in ``dtype`` (None: each tensor's own dtype, as
    ``clip_grad_norm_`` takes them) (one multi-tensor launch per device and dtype where torch
    has ``_foreach_norm``)."""
    if _foreach_norm is not None:
        return list(_foreach_norm(tensors, 2, dtype=dtype))
    return [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]


def fsdp1_flattened(t: Tensor) -> bool:
    """Whether FSDP1 made ``t`` (a FlatParameter) or flattened it into one (an original
    param under ``use_orig_params=True``). Imported when first asked: importing FSDP costs
    ~0.6 s, which ``import tiedadam`` should not pay."""
    try:
        from torch.distributed.fsdp._common_utils import _is_fsdp_flattened
    except ImportError:  # pragma: no cover - the attribute it reads
        return bool(getattr(t, "_fsdp_flattened", False))
    return bool(_is_fsdp_flattened(t))

# -------------------------------------------------------------------------- DTensor
LOCAL = attrgetter("_local_tensor")  # a DTensor's local shard, read in C
SPEC = attrgetter("_spec")  # a DTensor's sharding spec (mesh, placements), read in C


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "_local_tensor")


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself. ``_local_tensor`` is an attribute
    read; ``to_local()`` goes through autograd (microseconds per call, every step, every
    param)."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        return local
    return t.to_local() if hasattr(t, "to_local") else t


def shard_offset(t: Tensor) -> int:
    """Flat offset of a DTensor's local shard in the full tensor (0 for a plain tensor)."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return 0
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # another torch: every shard keys alike (still unbiased)
        return 0
    import math
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
    strides = [math.prod(t.shape[d + 1:]) for d in range(len(t.shape))]
    return sum(int(o) * s for o, s in zip(offset, strides))


# -------------------------------------------------------------------------- dynamo guards
try:
    from torch._C._dynamo.guards import TensorGuards
    from torch._C._dynamo.guards import dict_version
except ImportError:  # another torch: the guard's full comparison only
    TensorGuards = dict_version = None


def tensor_guards(ts: list):
    """dynamo's C++ check of ``ts``' type, dispatch keys, dtype, device, requires_grad, sizes
    and strides as they are now; None if this torch's cannot be built or does not pass the
    tensors it was built from."""
    try:
        tg = TensorGuards(*ts, tensor_check_names=[f"t{i}" for i in range(len(ts))],
                          dynamic_dims_sizes=[list(t.shape) for t in ts],
                          dynamic_dims_strides=[list(t.stride()) for t in ts])
        return tg if tg.check(*ts) else None
    except Exception:  # another signature
        return None


def fast_guard_works() -> bool:
    """What the guard's fast check relies on, verified on small tensors and dicts: a dict's
    version changes when a key gets another object or is added, and the tensor check accepts a
    tensor like the one it was built from but refuses each property on its own: another
    shape, other strides with the same shape (a transposed square), another dtype, another
    type, another layout, the negative bit."""
    if TensorGuards is None or dict_version is None:
        return False
    d = {"a": 1}
    v0 = dict_version(d)
    d["a"] = 2
    v1 = dict_version(d)
    d["b"] = 3
    if len({v0, v1, dict_version(d)}) != 3:
        return False
    t = torch.zeros(3, 3)
    tg = tensor_guards([t])
    return tg is not None and tg.check(torch.ones(3, 3)) and not any(tg.check(x) for x in (
        torch.zeros(3, 4), torch.zeros(3, 3).t(), torch.zeros(3, 3, dtype=torch.float64),
        torch.nn.Parameter(torch.zeros(3, 3)), torch.zeros(3, 3).to_sparse(),
        torch.zeros(3, 3, dtype=torch.complex64).conj().imag))  # the negative bit


# -------------------------------------------------------------------------- dynamo
def fresh_code(fn, name: str):
    """A function of its own with ``fn``'s code (named ``name``). dynamo counts recompilations
    per code object and refuses after ``recompile_limit``; one code object per mode of the
    compiled CPU step gives each mode its own count (Note [cpu compile] in
    kernels/tied_adamw_cpu.py)."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


# -------------------------------------------------------------------------- self-test
def self_test() -> dict[str, bool]:
    """The behaviour each private API is trusted for, checked now: {what: holds}."""
    out = {"fast_guard": fast_guard_works()}
    out["fused_adamw"] = fused_adamw_ is not None
    ts = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.bfloat16)]
    out["foreach_norm"] = [float(x) for x in foreach_norm(ts, torch.float32)] == [5.0, 5.0]
    flat = torch.nn.Parameter(torch.zeros(2))
    flat._fsdp_flattened = True  # what FSDP1 sets (_common_utils.FSDP_FLATTENED)
    out["fsdp1_flattened"] = fsdp1_flattened(flat) and not fsdp1_flattened(torch.zeros(2))
    prev = torch.is_grad_enabled()
    set_grad_enabled(not prev)
    out["set_grad_enabled"] = torch.is_grad_enabled() is (not prev)
    set_grad_enabled(prev)
    return out
