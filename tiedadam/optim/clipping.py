"""Clip-by-global-norm inside the step (``TiedAdamW(max_grad_norm=...)``): the global norm of
the grads a step updates, taken on the device, and the coefficient the update multiplies each
grad by (Note [clipping] in kernels/tied_adamw.py). No host sync anywhere here.

Note [global norm]
------------------
The norm is what ``torch.nn.utils.clip_grad_norm_`` computes, the 2-norm of all the grads
together after AMP's unscaling, taken in one read of the grads:

* Unsharded, without AMP: ``torch.nn.utils.get_total_norm``, clip_grad_norm_'s own (torch >=
  2.6; before, the same operations here): per device and grad dtype, torch's multi-tensor norm,
  each tensor's norm in the grad's own dtype (a bf16 grad's norm is rounded to bf16), then the
  norm of the per-tensor norms on the first grad's device after torch.stack's type promotion:
  one launch per (device, dtype) plus one reduction, the same bits as clip_grad_norm_ for any
  mix of grad dtypes. (The coefficient is then applied to each grad in fp32 registers and not
  rounded to a bf16/fp16 grad's dtype, where clip_grad_norm_ writes the clipped grad back
  rounded: bf16/fp16 params agree with it to that rounding, fp32/fp64 params bit for bit.)
* AMP: the kernel unscales the grads in its own pass, so the grads are still scaled when the
  norm is taken. Each tensor's norm is then taken in fp64 and divided by the scale before
  they are combined (norm(g / s) = norm(g) / s up to rounding), and the result rounded to
  fp32: the scaled grads' squares cannot overflow fp64, so a scaled norm beyond fp32's range
  (grads near 1e19 times the scale: GradScaler's scale keeps doubling while no grad
  overflows, and bf16 or fp32 grads overflow late) never skips a step whose unscaled norm is
  finite. GradScaler could not be told of such a skip: it hands the optimizer a sum of its
  found_inf flags and reads its own per-device flags afterwards, so its scale would go on
  growing and every later step would skip. Not bit for bit with unscale_ + clip_grad_norm_,
  which rounds each unscaled grad and sums in fp32 (bf16/fp16 grads' norms in their dtype):
  within fp32 rounding of the exact norm. A step AMP skips has a non-finite norm anyway.
* Without AMP a norm whose fp32 sum of squares overflows (norm > ~1.8e19) with every grad
  finite is inf, as clip_grad_norm_'s is; the step is skipped as for a NaN or inf grad
  (``last_grad_norm`` inf, telemetry's "(clip)" ``skipped``) where clip_grad_norm_ would
  multiply every grad by 0 and step on.
* Sharded params. DTensor grads (FSDP2, tensor parallel): the local sum of squares of each
  (mesh, placements) set becomes a DTensor that is ``Partial`` over the mesh dimensions the
  grads are sharded on and ``Replicate`` over the others, and ``full_tensor()`` all-reduces it
  (clip_grad_norm_ reaches the same sum through DTensor ops). Plain tensors that FSDP1 shards
  (flat params, either ``use_orig_params``): their sum is all-reduced over
  ``norm_process_group`` (FSDP1's ``model.process_group``); a step over FSDP1 params without
  one is refused, since each rank would clip by the norm of its own shard.
* The coefficient is torch's, min(1, max_norm / (norm + 1e-6)), and a non-finite norm raises
  a flag on which the kernel skips the step, as on AMP's found_inf: clip_grad_norm_ would
  multiply every grad by NaN (or 0) and the optimizer would write that into every param.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .. import _compat
from .._compat import is_dtensor

EPS = 1e-6  # torch's clip_grad_norm_: max_norm / (total_norm + 1e-6)
# clip_grad_norm_'s norm as a public function (torch >= 2.6); older torch: the same operations
# here, in first-seen (device, dtype) order, which may sum the per-dtype norms in another order
_total_norm = getattr(torch.nn.utils, "get_total_norm", None)


def check_max_grad_norm(value) -> float | None:
    """None, or a positive finite number (as a float)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_grad_norm must be a positive float or None, got "
                        f"{type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid max_grad_norm={value!r}: it must be a positive finite "
                         f"number (None turns clipping off)")
    return float(value)


def deepspeed_refusal(max_grad_norm: float) -> str:
    """Why a TiedAdamW inside a DeepSpeed engine may not clip (Note [deepspeed clipping] in
    integrations/deepspeed.py), and the fix."""
    return (f"TiedAdamW(max_grad_norm={max_grad_norm}) inside a DeepSpeed engine: DeepSpeed "
            f"clips the grads itself, over all ranks' partitions, with the config's "
            f"\"gradient_clipping\"; the optimizer would clip again by the norm of one "
            f"partition. Remove max_grad_norm from the optimizer and set "
            f"\"gradient_clipping\": {max_grad_norm} in the DeepSpeed config")


def check_group(group) -> None:
    """None or a torch.distributed ProcessGroup."""
    if group is None:
        return
    import torch.distributed as dist
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"norm_process_group must be a torch.distributed ProcessGroup (FSDP1: "
                        f"model.process_group) or None, got {type(group).__name__}")


def check_not_fsdp1(params: Sequence[Tensor]) -> None:
    """Refuse FSDP1 shards when no process group is given (Note [global norm])."""
    if any(_compat.fsdp1_flattened(p) for p in params):
        raise RuntimeError(
            "max_grad_norm with FSDP1: these params are shards of FSDP1 flat params, so each "
            "rank holds part of the grads; pass norm_process_group=model.process_group to "
            "TiedAdamW so the norm is summed over the ranks (or clip with "
            "model.clip_grad_norm_ and leave max_grad_norm=None)")


def _norm(grads: Sequence[Tensor], device: torch.device, like_torch: bool,
          scale: Tensor | None) -> Tensor:
    """The 2-norm of ``grads`` together: each tensor's norm by one foreach norm per (device,
    dtype), then the norm of those on ``device``. ``like_torch`` (and no ``scale``): as
    ``clip_grad_norm_`` takes it, bit for bit: each tensor's norm in its own dtype (a bf16
    grad's norm is rounded to bf16), then torch.stack's promotion (fp32 if any grad is fp32,
    fp64 if any is fp64; bf16 when all are). Otherwise (a partial sum to be reduced over ranks)
    accumulated and returned in fp32, or fp64 when a grad is fp64. ``scale``: AMP's loss
    scale, divided out of the per-tensor norms, which are then taken in fp64 (Note [global
    norm])."""
    if like_torch and scale is None and _total_norm is not None:
        return _total_norm(grads, 2.0)  # clip_grad_norm_'s own (its (device, dtype) order)
    by_kind: dict = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    wide = scale is not None or any(g.dtype == torch.float64 for g in grads)
    acc = torch.float64 if wide else torch.float32
    norms = []
    for (dev, dtype), ts in by_kind.items():
        if like_torch and scale is None:
            norms += [n.to(device, non_blocking=True) for n in _compat.foreach_norm(ts)]
        else:
            norms += [n.to(device, acc, non_blocking=True) for n in _compat.foreach_norm(
                ts, torch.float64 if wide else torch.float32)]
    norms = torch.stack(norms)
    if scale is not None:
        norms = norms / scale.to(device, torch.float64, non_blocking=True)
    return torch.linalg.vector_norm(norms, 2)


def _placement_key(p: Tensor):
    spec = _compat.SPEC(p)
    return (spec.mesh, tuple(spec.placements))


def global_norm(params: Sequence[Tensor], grads: Sequence[Tensor],
                grad_scale: Tensor | None, norm_group) -> Tensor:
    """The global 2-norm of ``grads`` (local, in the walk layout; ``params`` the Parameters
    they belong to), as a 0-dim tensor on the first grad's device, fp32 (fp64 when a grad is
    fp64, as clip_grad_norm_ returns it) (Note [global norm])."""
    device = grads[0].device
    plain, sharded = [], {}  # DTensor sets keyed by (mesh, placements), in first-seen order
    for p, g in zip(params, grads):
        if is_dtensor(p):
            sharded.setdefault(_placement_key(p), []).append(g)
        else:
            plain.append(g)
    squares = []  # squared norms of the sets, each already summed over its ranks
    if norm_group is None and not sharded:
        n = _norm(plain, device, True, grad_scale)  # one local set: torch's own norm, bit for bit
        squares = None
    elif plain or norm_group is not None:
        # (a rank without plain grads still joins norm_group's reduction, with 0; the sum
        # crosses ranks in fp64, one dtype on every rank whatever its grads and AMP)
        sq = (_norm(plain, device, False, grad_scale).square() if plain else
              torch.zeros((), dtype=torch.float64, device=device))
        if norm_group is not None:
            import torch.distributed as dist
            sq = sq.to(torch.float64)
            dist.all_reduce(sq, group=norm_group)
        squares.append(sq)
    for (mesh, placements), gs in sharded.items():
        from torch.distributed.tensor import DTensor, Partial, Replicate
        sq = _norm(gs, gs[0].device, False, grad_scale).square()
        partial = [Partial() if pl.is_shard() else Replicate() for pl in placements]
        full = DTensor.from_local(sq, mesh, partial, run_check=False).full_tensor()
        squares.append(full.to(device, non_blocking=True))
    if squares is not None:
        acc = torch.float64 if any(q.dtype == torch.float64 for q in squares) else torch.float32
        n = torch.stack([q.to(acc) for q in squares]).sum().sqrt()
    if squares is not None or grad_scale is not None:  # (fp64 partial sums, or AMP)
        n = n.to(torch.float64 if any(g.dtype == torch.float64 for g in grads) else
                 torch.float32)
    return n


def no_grad_norm(params: Sequence[Tensor], norm_group) -> Tensor:
    """The global norm of a step in which this rank holds no grads: 0, as ``clip_grad_norm_``
    returns for no grads, on the params' device; with ``norm_group`` summed over the ranks as
    ``global_norm`` sums it, so that this rank joins the collective the others make (FSDP1 with
    frozen params: a rank whose shards all lack grads)."""
    local = [_compat.local_tensor(p) for p in params]
    device = local[0].device if local else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)  # global_norm's reduction dtype
    if norm_group is not None:
        import torch.distributed as dist
        dist.all_reduce(sq, group=norm_group)
    fp64 = any(t.dtype == torch.float64 for t in local)
    return sq.sqrt().to(torch.float64 if fp64 else torch.float32)


def coefficients(norm: Tensor, max_norm: float) -> Tensor:
    """[2] in ``norm``'s dtype and device: (min(1, max_norm / (norm + 1e-6)), 1.0 where the
    norm is not finite else 0.0): what the kernel reads (Note [clipping]). An fp64 coefficient
    is rounded to the compute dtype where it is used, as torch's multiply of an fp32 grad by
    clip_grad_norm_'s fp64 coefficient rounds it."""
    coef = (max_norm / (norm + EPS)).clamp(max=1.0)  # in the norm's dtype, as torch's
    dtype = torch.float64 if norm.dtype == torch.float64 else torch.float32  # (exact)
    bad = (~torch.isfinite(norm)).to(dtype)
    return torch.stack([torch.where(bad != 0, torch.zeros_like(bad), coef.to(dtype)), bad])
