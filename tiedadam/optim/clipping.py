"""Clip-by-global-norm inside the step (``TiedAdamW(max_grad_norm=...)``): the global norm of
the grads a step updates, taken on the device, and the coefficient the update multiplies each
grad by (Note [clipping] in kernels/tied_adamw.py). No host sync anywhere here.

Note [global norm]
------------------
The norm is what ``torch.nn.utils.clip_grad_norm_`` computes, the 2-norm of all the grads
together after AMP's unscaling, taken in one read of the grads:

* Per device and grad dtype, torch's multi-tensor norm (``_compat.foreach_norm``, what
  clip_grad_norm_ uses; fp32 accumulation, fp64 for fp64 grads), then the norm of the
  per-tensor norms on the first grad's device: one launch per (device, dtype) plus one
  reduction, the same operations as clip_grad_norm_ (so the same bits, unsharded).
* AMP: the kernel unscales the grads in its own pass, so the grads are still scaled when the
  norm is taken; the norm is divided by the scale (norm(g / s) = norm(g) / s up to rounding).
  A step AMP skips has a non-finite norm anyway.
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


def _norm(grads: Sequence[Tensor], device: torch.device) -> Tensor:
    """The 2-norm of ``grads`` together, as ``clip_grad_norm_`` takes it: each tensor's norm by
    one foreach norm per (device, dtype), then the norm of those on ``device``, in fp64 if any
    grad is fp64 (torch.stack's promotion in clip_grad_norm_), else fp32."""
    by_kind: dict = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    norms = []
    for (dev, dtype), ts in by_kind.items():
        norms += [n.to(device, acc, non_blocking=True) for n in _compat.foreach_norm(
            ts, torch.float64 if dtype == torch.float64 else torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms), 2)


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
    if plain:
        n = _norm(plain, device)
        if norm_group is None and not sharded:
            squares = None  # one local set: torch's own norm, bit for bit
        else:
            sq = n.square()
            if norm_group is not None:
                import torch.distributed as dist
                dist.all_reduce(sq, group=norm_group)
            squares.append(sq)
    for (mesh, placements), gs in sharded.items():
        from torch.distributed.tensor import DTensor, Partial, Replicate
        sq = _norm(gs, gs[0].device).square()
        partial = [Partial() if pl.is_shard() else Replicate() for pl in placements]
        full = DTensor.from_local(sq, mesh, partial, run_check=False).full_tensor()
        squares.append(full.to(device, non_blocking=True))
    if squares is not None:
        acc = torch.float64 if any(q.dtype == torch.float64 for q in squares) else torch.float32
        n = torch.stack([q.to(acc) for q in squares]).sum().sqrt()
    if grad_scale is not None:
        n = n / grad_scale.to(device, torch.float32, non_blocking=True)
    return n


def coefficients(norm: Tensor, max_norm: float) -> Tensor:
    """[2] in ``norm``'s dtype and device: (min(1, max_norm / (norm + 1e-6)), 1.0 where the
    norm is not finite else 0.0): what the kernel reads (Note [clipping]). An fp64 coefficient
    is rounded to the compute dtype where it is used, as torch's multiply of an fp32 grad by
    clip_grad_norm_'s fp64 coefficient rounds it."""
    coef = (max_norm / (norm + EPS)).clamp(max=1.0)
    bad = (~torch.isfinite(norm)).to(norm.dtype)
    return torch.stack([torch.where(bad != 0, torch.zeros_like(coef), coef), bad])
