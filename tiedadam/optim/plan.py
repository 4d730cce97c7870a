"""What one ``step()`` will touch, verified before anything is touched.

Note [what the kernel may trust]
--------------------------------
The Triton kernel walks every role of a tensor (param, grad, exp_avg, exp_avg_sq, master) as
``numel`` elements of flat memory from a raw address, and the torch backend's fused op assumes
the same. So before any launch, every step, for every parameter with a grad:

1. **Grad.** Dense, the param's shape, dtype and device (else an error naming the parameter).
   A grad whose strides differ from the param's walk order (a transposed grad, the stride-0
   ``expand`` that autograd returns for a param used through ``.sum()``) is copied into the
   param's layout for this step: handled, not refused.
2. **Param layout.** A param that is non-overlapping and dense (contiguous, channels_last, any
   permutation) is walked in its own storage order; every role must then have *the same
   strides*. A param with gaps or overlap (a strided view) is stepped through a contiguous
   working copy that is written back after the launch.
3. **State.** ``exp_avg``/``exp_avg_sq`` (and ``master_param`` with master weights) have the
   param's shape and walk strides, live on its device, and have the expected dtype: the
   group's ``state_dtype`` (fp32 master), or fp64 for fp64 params. ``step`` is a one-element
   fp32 tensor on the param's device. Empty state is created; anything else that does not
   match (a param resized or re-typed after its state was made, a state tensor replaced by one
   of another size) raises before anything changes, saying how to reset that state.
4. **Cached plans** (buckets, address tables) are reused only while everything they trust
   still holds: the identity of each parameter's state dict and state tensors, and the
   address, size, strides, dtype and device of the param and of every state role; each grad
   has the param's shape, dtype and device (Note [guard] in guard.py, which checks all of it
   at every step without a Python loop over the parameters). A replaced state tensor, a
   cleared state, a re-typed, resized or moved param can never be stepped through a plan made
   for the old one: any difference sends the step through the full check above and builds a
   new plan and table. Grads are fresh every step: their layout is checked each step and
   their addresses re-pointed in the table (Note [table cache] in kernels/multi_tensor.py).

Only after all of that holds for every bucket of the step does any kernel run, so a refused
step is never half-applied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .shards import local_tensor

MASTER_KEY = "master_param"
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # group["state_dtype"]
LOW_PRECISION = (torch.bfloat16, torch.float16)


class Entry(NamedTuple):
    """One parameter of one step, as the backends will see it (local shards)."""
    group: int
    position: int  # index in its group's params
    source: Tensor  # the Parameter (or DTensor) that holds .grad
    param: Tensor  # what the kernel updates: the local shard, or a contiguous working copy
    grad: Tensor  # in the param's walk layout
    exp_avg: Tensor
    exp_avg_sq: Tensor
    master: Tensor | None
    step: Tensor
    writeback: Tensor | None  # the non-dense param to copy ``param`` back into, if any
    grad_out: Tensor | None  # the user's grad, when ``grad`` is a layout copy of it


def state_dtype_for(param_dtype: torch.dtype, group: dict) -> torch.dtype:
    """fp64 params keep fp64 state (as torch does); others the group's ``state_dtype``."""
    if param_dtype == torch.float64:
        return torch.float64
    return _STATE_DTYPES[group["state_dtype"]]


def wants_master(param_dtype: torch.dtype, group: dict) -> bool:
    return bool(group["master_weights"]) and param_dtype in LOW_PRECISION


def _name(gi: int, i: int, p: Tensor) -> str:
    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)}, {p.dtype})"


_RESET = ("reset it with `del optimizer.state[p]` (fresh moments) or load a checkpoint made "
          "for this parameter")


def check_grad(gi: int, i: int, p: Tensor, g: Tensor) -> None:
    """Raise the error that explains why ``g`` cannot be used as the grad of ``p``."""
    name = _name(gi, i, p)
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"TiedAdamW does not support sparse gradients: {name} has a "
                           f"{g.layout} grad; use dense gradients (e.g. "
                           f"nn.Embedding(sparse=False)) or torch.optim.SparseAdam")
    if g.shape != p.shape or g.dtype != p.dtype:
        raise RuntimeError(f"grad of {name} has shape {tuple(g.shape)} and dtype {g.dtype}; "
                           f"it must match the param ({tuple(p.shape)}, {p.dtype})")
    if g.device != p.device:
        raise RuntimeError(f"grad of {name} is on {g.device}, the param on {p.device}")


def _check_role(gi: int, i: int, p: Tensor, local: Tensor, role: str, t, dtype: torch.dtype,
                strides: tuple) -> Tensor:
    if not isinstance(t, Tensor):
        raise RuntimeError(f"optimizer.state[p][{role!r}] of {_name(gi, i, p)} is "
                           f"{type(t).__name__}, not a tensor; {_RESET}")
    t = local_tensor(t)
    if t.shape != local.shape:
        raise RuntimeError(
            f"optimizer.state[p][{role!r}] of {_name(gi, i, p)} has shape {tuple(t.shape)} "
            f"but the parameter has {tuple(local.shape)} (was the parameter resized after its "
            f"state was created, or a state dict for another model loaded?); {_RESET}")
    if t.dtype != dtype:
        raise RuntimeError(
            f"optimizer.state[p][{role!r}] of {_name(gi, i, p)} is {t.dtype}, expected "
            f"{dtype} for a {local.dtype} parameter (was the parameter re-typed after its "
            f"state was created?); {_RESET}")
    if t.device != local.device:
        raise RuntimeError(f"optimizer.state[p][{role!r}] of {_name(gi, i, p)} is on "
                           f"{t.device}, the parameter on {local.device}; {_RESET}")
    if t.numel() > 1 and t.stride() != strides:
        raise RuntimeError(f"optimizer.state[p][{role!r}] of {_name(gi, i, p)} has strides "
                           f"{t.stride()}, the parameter is walked with {strides}; {_RESET}")
    return t


def _check_step(gi: int, i: int, p: Tensor, local: Tensor, t) -> Tensor:
    if not isinstance(t, Tensor) or t.numel() != 1 or t.dtype != torch.float32 \
            or t.device != local.device:
        what = (f"{t.numel()}-element {t.dtype} tensor on {t.device}" if isinstance(t, Tensor)
                else type(t).__name__)
        raise RuntimeError(f"optimizer.state[p]['step'] of {_name(gi, i, p)} is a {what}; "
                           f"TiedAdamW keeps a one-element float32 tensor on the parameter's "
                           f"device ({local.device}); load checkpoints with load_state_dict, "
                           f"which converts it")
    return t


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill exactly ``numel`` consecutive slots in some
    dimension order (contiguous, channels_last, any permutation). torch's own test of this is
    private (``torch._prims_common``, renamed between releases)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def walk_strides(local: Tensor) -> tuple[tuple, bool]:
    """(strides every role is walked with, whether the param itself can be walked in place)."""
    if local.numel() <= 1 or is_dense(local):
        return local.stride(), True
    return torch.empty(local.shape, device="meta").stride(), False  # contiguous working copy


def entry(gi: int, i: int, p: Tensor, g: Tensor, st: dict, group: dict) -> Entry:
    """Verify one parameter's roles (Note [what the kernel may trust]) and return its Entry.
    Raises before anything is changed. ``st`` must already hold the state (see ``init``)."""
    local = local_tensor(p)
    g = local_tensor(g)
    strides, in_place = walk_strides(local)
    dtype = state_dtype_for(local.dtype, group)
    if "exp_avg" not in st or "exp_avg_sq" not in st or "step" not in st:
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
        raise RuntimeError(f"optimizer.state[p] of {_name(gi, i, p)} lacks {missing}; "
                           f"{_RESET}")
    m = _check_role(gi, i, p, local, "exp_avg", st["exp_avg"], dtype, strides)
    v = _check_role(gi, i, p, local, "exp_avg_sq", st["exp_avg_sq"], dtype, strides)
    step = _check_step(gi, i, p, local, st["step"])
    master = None
    if wants_master(local.dtype, group):
        master = _check_role(gi, i, p, local, MASTER_KEY, st[MASTER_KEY], torch.float32,
                             strides)
    elif MASTER_KEY in st:
        raise RuntimeError(f"optimizer.state[p] of {_name(gi, i, p)} holds {MASTER_KEY!r}, "
                           f"but this parameter gets no master weights (its dtype is "
                           f"{local.dtype}, master_weights={group['master_weights']}); delete "
                           f"it with `del optimizer.state[p][{MASTER_KEY!r}]`")
    g, grad_out = layout_grad(g, local, strides)
    if in_place:
        return Entry(gi, i, p, local, g, m, v, master, step, None, grad_out)
    work = torch.empty_strided(local.shape, strides, dtype=local.dtype, device=local.device)
    work.copy_(local)
    return Entry(gi, i, p, work, g, m, v, master, step, local, grad_out)


def init(p: Tensor, st: dict, group: dict) -> None:
    """Create missing state for ``p``: zeros for the moments, a copy of ``p`` as master."""
    local = local_tensor(p)
    if not st:
        dtype = state_dtype_for(local.dtype, group)
        _, in_place = walk_strides(local)
        st["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
        # Laid out as the param is walked: its own strides when dense, else contiguous (as the
        # working copy); DTensors get DTensor state sharded like the param.
        fmt = torch.preserve_format if in_place else torch.contiguous_format
        st["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=fmt)
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=fmt)
    init_master(p, st, group)


def init_master(p: Tensor, st: dict, group: dict) -> None:
    if wants_master(local_tensor(p).dtype, group) and MASTER_KEY not in st and "exp_avg" in st:
        st[MASTER_KEY] = p.detach().to(torch.float32, copy=True)


def layout_grad(g: Tensor, local: Tensor, strides: tuple) -> tuple[Tensor, Tensor | None]:
    """(the grad in the param's walk layout, the user's grad if that needed a copy)."""
    if local.numel() > 1 and g.stride() != strides:
        out = torch.empty_strided(local.shape, strides, dtype=g.dtype, device=g.device)
        out.copy_(g)
        return out, g
    return g, None
