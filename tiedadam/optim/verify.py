"""Verification: what one ``step()`` will touch, checked before anything is touched, and the
state it creates or converts.

Note [what the kernel may trust]
--------------------------------
The Triton kernel walks every role of a tensor (param, grad, exp_avg, exp_avg_sq, master) as
``numel`` elements of flat memory from a raw address, and the torch backend's fused op assumes
the same. So before any launch, every step, for every parameter with a grad:

1. **Grad.** Dense, the param's shape, dtype and device (else an error naming the parameter);
   for a DTensor param, a DTensor grad on the param's mesh with its placements (the local
   shards then cover the same elements); a plain param needs a plain grad. A grad the kernel
   cannot walk in place is copied into the param's walk layout for this step: handled, not
   refused. That is a grad whose strides differ from the walk order (a transposed grad, the
   stride-0 ``expand`` autograd returns for a param used through ``.sum()``), a grad with the
   negative or conjugate bit set (``x.conj().imag`` of a complex x: its memory holds the
   negated values), and a tensor subclass without storage of its own (a wrapper subclass: ``copy_`` dispatches
   to it, as torch's own AdamW would).
2. **Param layout.** A param that is non-overlapping and dense (contiguous, channels_last, any
   permutation) is walked in its own storage order; every role must then have *the same
   strides*. A param with gaps (a strided view) is stepped through a contiguous working copy
   that is written back after the launch. A param whose elements share memory (a stride-0
   ``expand``) cannot take an update and is refused, as torch's in-place ops refuse it; so is
   a param with the negative or conjugate bit, or without storage.
3. **State.** ``exp_avg``/``exp_avg_sq`` (and ``master_param`` with master weights) have the
   param's shape and walk strides, live on its device, and have the expected dtype: the
   group's ``state_dtype`` (fp32 master), or fp64 for fp64 params. ``step`` is a one-element
   fp32 tensor on the param's device. Empty state is created; anything else that does not
   match (a param resized or re-typed after its state was made, a state tensor replaced by one
   of another size) raises before anything changes, saying how to reset that state.
4. **Storage extents.** Every tensor the kernel walks through an address (param, grad, each
   state role) lies inside its storage: storage offset plus the walk's reach, in bytes, is at
   most the storage's ``nbytes()``. A storage freed or shrunk under a tensor
   (``untyped_storage().resize_(0)``, which FSDP does to unsharded params) keeps the tensor's
   shape and strides; without this check the kernel would step through address 0 or past the
   end.
5. **Cached plans** (buckets, address tables) are reused only while everything they trust
   still holds: the identity of each parameter's state dict and state tensors, and the
   address, size, strides, dtype, device and storage size of the param and of every state
   role; each grad has the param's shape, dtype, device and (DTensors) placements, no
   negative bit, and lies inside its storage (Note [guard] in guard.py, which checks all of
   it at every step without a Python loop over the parameters). A replaced state tensor, a
   cleared state, a re-typed, resized or moved param can never be stepped through a plan made
   for the old one: any difference sends the step through the full check above and builds a
   new plan and table. Grads are fresh every step: their layout is checked each step and
   their addresses re-pointed in the table (Note [table cache] in kernels/multi_tensor.py).
6. **Option edits.** A group whose options (``state_dtype``, ``master_weights``, ``seed``, the
   rounding flags) changed has its plans dropped; the state of each param is converted, at
   the param's next step, as ``load_state_dict`` converts a checkpoint holding the new values
   (``apply_options``: moments cast to the new state dtype, master weights made from the
   param or dropped), so an uninterrupted run and one resumed from a checkpoint step alike.
   Per param, not per group: ZeRO-3 steps one sub-group partition per call.

Only after all of that holds for every parameter of the step is anything written: state that
must be created or converted is staged and committed once everything checked out, and only
then does any kernel run. Launches and write-backs come last and cannot raise on user input,
so a refused step is never half-applied (docs/design.md §3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._compat import is_dtensor, local_tensor
from ..kernels import ratio8
from .group_rules import LOW_PRECISION, STATE_PAIRS, state_dtypes_for, wants_master

MASTER_KEY = "master_param"


class Entry(NamedTuple):
    """One parameter of one step, verified, as the backends will see it."""
    group: int
    position: int  # index in its group's params
    param: Tensor  # the Parameter (or DTensor) that holds .grad and keys the state
    local: Tensor  # what the kernel updates: its local shard, or a contiguous working copy
    grad: Tensor  # the grad in the walk layout (the user's, or a copy of it)
    exp_avg: Tensor
    exp_avg_sq: Tensor
    master: Tensor | None
    step: Tensor
    write_back_to: Tensor | None  # the non-dense local param ``local`` is a working copy of
    user_grad: Tensor | None  # the user's grad, where ``grad`` is a copy of it


def _name(gi: int, i: int, p: Tensor) -> str:
    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)}, {p.dtype})"


_RESET = ("reset it with `del optimizer.state[p]` (fresh moments) or load a checkpoint made "
          "for this parameter")


# ---------------------------------------------------------------------- memory facts
def storage_of(t: Tensor):
    """``t``'s UntypedStorage, or None for a tensor without storage of its own (a wrapper
    subclass: its ``data_ptr()`` is 0, its storage object raises when asked for an address)."""
    try:
        storage = t.untyped_storage()
        storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return storage


def walk_reach(shape, strides, itemsize: int, offset: int = 0) -> int:
    """Bytes from the start of a storage through the last element of a walk over ``shape``
    with ``strides`` from element ``offset`` (0 when there is no element)."""
    if 0 in shape:
        return 0
    return (offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * itemsize


def reach_bytes(t: Tensor) -> int:
    """Bytes from the start of ``t``'s storage through the last element its walk touches (0
    for an empty tensor): what the storage must hold (Note [what the kernel may trust], 4)."""
    return walk_reach(t.shape, t.stride(), t.element_size(), t.storage_offset())


def fits_storage(t: Tensor, storage) -> bool:
    return reach_bytes(t) <= storage.nbytes()


def _has_bits(t: Tensor) -> bool:
    """The negative or conjugate bit: the memory holds other values than the tensor reads."""
    return t.is_neg() or t.is_conj()


def is_expanded(t: Tensor) -> bool:
    """Elements that share memory (a stride-0 dimension of size > 1): what torch's in-place
    ops refuse ("more than one element of the written-to tensor refers to a single memory
    location")."""
    return any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride()))


def _check_memory(what: str, t: Tensor, fix: str) -> None:
    """``t`` (a param or state role) is memory the kernel may walk through its address."""
    if _has_bits(t):
        bit = "negative" if t.is_neg() else "conjugate"
        raise RuntimeError(f"{what} has the {bit} bit set (its memory holds other values "
                           f"than it reads, e.g. x.conj().imag): the kernel updates memory; "
                           f"{fix}")
    storage = storage_of(t)
    if storage is None:
        raise RuntimeError(f"{what} is a {type(t).__name__} without storage of its own (a "
                           f"wrapper tensor subclass): the kernel updates memory through its "
                           f"address; {fix}")
    if not fits_storage(t, storage):
        raise RuntimeError(f"{what} reaches {reach_bytes(t)} bytes into its storage, which "
                           f"holds {storage.nbytes()} (was the storage freed or shrunk, "
                           f"e.g. untyped_storage().resize_(0)?); {fix}")


# ---------------------------------------------------------------------- grads
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
    if is_dtensor(p) != is_dtensor(g):
        kinds = ("a DTensor", "a plain tensor") if is_dtensor(p) else ("a plain tensor",
                                                                         "a DTensor")
        raise RuntimeError(f"grad of {name} is {kinds[1]}, the param {kinds[0]}: the kernel "
                           f"steps the param's local shard with the grad's, so both must be "
                           f"DTensors with the same placements, or both plain tensors")
    if is_dtensor(p) and (g.device_mesh != p.device_mesh or
                           tuple(g.placements) != tuple(p.placements)):
        raise RuntimeError(
            f"grad of {name} is a DTensor with placements {tuple(g.placements)} on "
            f"{g.device_mesh}, the param has {tuple(p.placements)} on {p.device_mesh}: their "
            f"local shards hold different elements. Redistribute the grad first: "
            f"p.grad = p.grad.redistribute(p.device_mesh, p.placements)")


def needs_grad_copy(g: Tensor, local: Tensor, strides: tuple) -> bool:
    """The kernel cannot walk ``g`` in place (Note [what the kernel may trust], 1)."""
    return (local.numel() > 1 and g.stride() != strides) or _has_bits(g) \
        or storage_of(g) is None


def layout_grad(g: Tensor, local: Tensor, strides: tuple) -> tuple[Tensor, Tensor | None]:
    """(the grad as the kernel walks it, the user's grad if that needed a copy). The copy goes
    through torch's ``copy_``, which reads any layout, resolves the negative and conjugate bits
    and dispatches to a tensor subclass. A grad walked in place must lie inside its storage:
    None is returned for the grad otherwise (the caller refuses)."""
    if needs_grad_copy(g, local, strides):
        storage = storage_of(g)
        if storage is not None and not fits_storage(g, storage):
            return None, g  # copy_ would read past the end too
        out = torch.empty_strided(local.shape, strides, dtype=g.dtype, device=g.device)
        out.copy_(g)
        return out, g
    if not fits_storage(g, g.untyped_storage()):
        return None, g
    return g, None


def writes_back_in_place(g: Tensor) -> bool:
    """Whether the unscaled grad (AMP, Note [amp] in the kernel) can be copied into the user's
    grad ``g``; otherwise ``p.grad`` is replaced by the unscaled copy (an expanded grad, one
    with the negative bit, a subclass without storage)."""
    return type(g) is Tensor and is_dense(g) and not _has_bits(g)


# ---------------------------------------------------------------------- state
def _check_role(gi: int, i: int, p: Tensor, local: Tensor, role: str, t, dtype: torch.dtype,
                strides: tuple) -> Tensor:
    if not isinstance(t, Tensor):
        raise RuntimeError(f"optimizer.state[p][{role!r}] of {_name(gi, i, p)} is "
                           f"{type(t).__name__}, not a tensor; {_RESET}")
    if is_dtensor(t) != is_dtensor(p) or is_dtensor(t) and (
            t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements)):
        raise RuntimeError(f"optimizer.state[p][{role!r}] of {_name(gi, i, p)} is not sharded "
                           f"as the parameter is (DTensor placements must match); {_RESET}")
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
    _check_memory(f"optimizer.state[p][{role!r}] of {_name(gi, i, p)}", t, _RESET)
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
    _check_memory(f"optimizer.state[p]['step'] of {_name(gi, i, p)}", local_tensor(t),
                  "load checkpoints with load_state_dict, which makes a fresh step tensor")
    return t


# ---------------------------------------------------------------------- params
def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill exactly ``numel`` consecutive slots in some
    dimension order (contiguous, channels_last, any permutation). torch's own test of this is
    private (in torch's prims helpers, renamed between releases)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def work_copy(local: Tensor, strides: tuple) -> Tensor:
    """A contiguous working copy of a param that cannot be walked in place (Note [what the
    kernel may trust], 2); written back after the launch."""
    work = torch.empty_strided(local.shape, strides, dtype=local.dtype, device=local.device)
    work.copy_(local)
    return work


def walk_strides(local: Tensor) -> tuple[tuple, bool]:
    """(strides every role is walked with, whether the param itself can be walked in place)."""
    if local.numel() <= 1 or is_dense(local):
        return local.stride(), True
    return torch.empty(local.shape, device="meta").stride(), False  # contiguous working copy


def check_param(gi: int, i: int, p: Tensor, local: Tensor) -> None:
    """``local`` (the param or its local shard) is memory an update can be written to."""
    fix = ("pass a parameter that owns its memory (e.g. `p.data = p.data.clone()`, "
           "or `resolve_neg()`)")
    if is_expanded(local):
        raise RuntimeError(f"{_name(gi, i, p)} is an expanded view (stride 0 in a dimension "
                           f"of size > 1, strides {local.stride()}): its elements share memory, "
                           f"so no update can be written to it (torch's in-place ops refuse it "
                           f"too); {fix}")
    _check_memory(_name(gi, i, p), local, fix)


def check_readable(gi: int, i: int, p: Tensor, st: dict | None) -> None:
    """The param and its state tensors lie inside their storages: what creating or converting
    state reads (``init``, ``apply_options``) before ``entry`` verifies the rest. torch's ops
    do not compare a tensor with its storage's size either."""
    check_param(gi, i, p, local_tensor(p))
    for k, v in (st or {}).items():
        if isinstance(v, Tensor):
            t = local_tensor(v)
            storage = storage_of(t)
            if storage is not None and not fits_storage(t, storage):
                _check_memory(f"optimizer.state[p][{k!r}] of {_name(gi, i, p)}", t, _RESET)


def entry(gi: int, i: int, p: Tensor, g: Tensor, st: dict, group: dict) -> Entry:
    """Verify one parameter's roles (Note [what the kernel may trust]) and return its Entry.
    Raises before anything is changed. ``st`` must already hold the state (see ``init``):
    the committed dict, or the one staged for this step. ``check_readable`` has passed."""
    check_grad(gi, i, p, g)
    local = local_tensor(p)
    g_local = local_tensor(g)
    if g_local.shape != local.shape:
        raise RuntimeError(f"grad of {_name(gi, i, p)} has a local shard of shape "
                           f"{tuple(g_local.shape)}, the param's is {tuple(local.shape)}")
    strides, in_place = walk_strides(local)
    m_dtype, v_dtype = state_dtypes_for(local.dtype, group)
    if "exp_avg" not in st or "exp_avg_sq" not in st or "step" not in st:
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
        raise RuntimeError(f"optimizer.state[p] of {_name(gi, i, p)} lacks {missing}; "
                           f"{_RESET}")
    m = _check_role(gi, i, p, local, "exp_avg", st["exp_avg"], m_dtype, strides)
    v = _check_role(gi, i, p, local, "exp_avg_sq", st["exp_avg_sq"], v_dtype, strides)
    step = _check_step(gi, i, p, local, st["step"])
    master = None
    if wants_master(local.dtype, group):
        if MASTER_KEY not in st:
            raise RuntimeError(f"optimizer.state[p] of {_name(gi, i, p)} lacks "
                               f"{MASTER_KEY!r} (master_weights=True); {_RESET}")
        master = _check_role(gi, i, p, local, MASTER_KEY, st[MASTER_KEY], torch.float32,
                             strides)
    elif MASTER_KEY in st:
        raise RuntimeError(f"optimizer.state[p] of {_name(gi, i, p)} holds {MASTER_KEY!r}, "
                           f"but this parameter gets no master weights (its dtype is "
                           f"{local.dtype}, master_weights={group['master_weights']}); delete "
                           f"it with `del optimizer.state[p][{MASTER_KEY!r}]`")
    g_walk, grad_out = layout_grad(g_local, local, strides)
    if g_walk is None:
        storage = g_local.untyped_storage()
        raise RuntimeError(f"grad of {_name(gi, i, p)} reaches {reach_bytes(g_local)} bytes "
                           f"into its storage, which holds {storage.nbytes()} (was the storage "
                           f"freed or shrunk, e.g. untyped_storage().resize_(0)?)")
    if in_place:
        return Entry(gi, i, p, local, g_walk, m, v, master, step, None, grad_out)
    return Entry(gi, i, p, work_copy(local, strides), g_walk, m, v, master, step, local,
                 grad_out)


# ---------------------------------------------------------------------- creating state
def cast_state(p: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """A state tensor for ``p`` with ``v``'s values in ``dtype`` (round to nearest), laid out
    as the param is walked, sharded like the param (DTensors): what ``load_state_dict`` makes
    of a saved tensor, and what an option edit makes of the current state."""
    local = local_tensor(p)
    _, in_place = walk_strides(local)
    fmt = torch.preserve_format if in_place else torch.contiguous_format
    if is_dtensor(v):
        return v.detach().to(device=p.device, dtype=dtype, copy=True)
    if not is_dtensor(p):
        out = torch.empty_like(p, dtype=dtype, memory_format=fmt)
        out.copy_(v.detach())  # the param's walk layout, whatever the saved strides
        return out
    # Plain tensor state for a DTensor param: shard it like the param.
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(v.detach().to(dtype=dtype), p.device_mesh, p.placements)


def init(p: Tensor, st: dict, group: dict) -> None:
    """Create missing state for ``p`` in ``st``: zeros for the moments, a copy of ``p`` as
    master."""
    local = local_tensor(p)
    if not st:
        m_dtype, v_dtype = state_dtypes_for(local.dtype, group)
        _, in_place = walk_strides(local)
        st["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
        # Laid out as the param is walked: its own strides when dense, else contiguous (as the
        # working copy); DTensors get DTensor state sharded like the param.
        fmt = torch.preserve_format if in_place else torch.contiguous_format
        st["exp_avg"] = torch.zeros_like(p, dtype=m_dtype, memory_format=fmt)
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=v_dtype, memory_format=fmt)
    init_master(p, st, group)


def init_master(p: Tensor, st: dict, group: dict) -> None:
    if wants_master(local_tensor(p).dtype, group) and MASTER_KEY not in st and "exp_avg" in st:
        st[MASTER_KEY] = p.detach().to(torch.float32, copy=True)


def convert_moments(p: Tensor, m: Tensor, v: Tensor, target: tuple, beta: float,
                    step) -> tuple:
    """(exp_avg, exp_avg_sq) in the ``target`` dtypes, laid out and sharded like ``p``, with
    the values a checkpoint load gives them: moments cast to nearest; ratio8 codes decoded
    against their exp_avg_sq, or encoded (nearest code, within the code bound of ``beta`` at
    the saved ``step`` count, Note [ratio8 update bound]) against the new bf16 exp_avg_sq (Note
    [ratio8] in kernels/ratio8.py)."""
    tm, tv = target
    if (m.dtype, v.dtype) == (tm, tv):  # the same format: copied as saved, codes included
        return cast_state(p, m, tm), cast_state(p, v, tv)  # (re-encoding is not the identity)
    if m.dtype == torch.int8:
        m = ratio8.decode(m, v)
    if tm == torch.int8:
        v = cast_state(p, v, torch.bfloat16)
        bound = ratio8.LEVELS if step is None else ratio8.code_bound(beta, float(step))
        return cast_state(p, ratio8.encode(cast_state(p, m, torch.float32), v,
                                           bound=bound), tm), v
    return cast_state(p, m, tm), cast_state(p, v, tv)


def apply_options(p: Tensor, st: dict, group: dict) -> dict:
    """``st`` as ``load_state_dict`` would make it under ``group``'s options (Note [what the
    kernel may trust], 6): a new dict when something changes, else ``st``; nothing is written
    to ``st``. Moments in another state format TiedAdamW makes (fp32, bf16, ratio8; fp64
    params keep fp64) are converted to the group's; the master weights of a bf16/fp16 param
    whose group wants none are dropped (the param holds the rounded master); a missing master
    is made from the param."""
    local = local_tensor(p)
    out = st
    if local.dtype != torch.float64:
        target = state_dtypes_for(local.dtype, group)
        m, v = st.get("exp_avg"), st.get("exp_avg_sq")
        if (isinstance(m, Tensor) and isinstance(v, Tensor)
                and (m.dtype, v.dtype) != target and (m.dtype, v.dtype) in STATE_PAIRS):
            out = dict(out)
            out["exp_avg"], out["exp_avg_sq"] = convert_moments(p, m, v, target, group["beta"],
                                                                st.get("step"))
    if local.dtype in LOW_PRECISION and MASTER_KEY in out and not wants_master(local.dtype,
                                                                                group):
        out = dict(out) if out is st else out
        del out[MASTER_KEY]
    if wants_master(local.dtype, group) and MASTER_KEY not in out and "exp_avg" in out:
        out = dict(out) if out is st else out
        init_master(p, out, group)
    return out


def check_saved_state(p: Tensor, k, saved: dict) -> None:
    """Refuse saved state that cannot belong to ``p`` (load_state_dict, before anything is
    loaded)."""
    for n in ("exp_avg", "exp_avg_sq", MASTER_KEY):
        v = saved.get(n)
        if v is None:
            continue
        ratio_codes = n == "exp_avg" and isinstance(v, Tensor) and v.dtype == torch.int8
        if not isinstance(v, Tensor) or not (v.is_floating_point() or ratio_codes):
            raise ValueError(f"state_dict['state'][{k!r}][{n!r}] is not a floating-point "
                             f"tensor (or ratio8 codes) ({type(v).__name__})")
        if v.shape != p.shape:
            raise ValueError(
                f"state_dict['state'][{k!r}][{n!r}] has shape {tuple(v.shape)}, but the "
                f"parameter it maps to has shape {tuple(p.shape)}: the state dict was saved "
                f"for another model (or another parameter order)")
    t = saved.get("step")
    if t is not None and not (isinstance(t, (int, float)) or
                              (isinstance(t, Tensor) and t.numel() == 1)):
        raise ValueError(f"state_dict['state'][{k!r}]['step'] must be a number or a "
                         f"one-element tensor")
