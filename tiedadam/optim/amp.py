"""AMP's grad scale and found-inf flag as the backends take them (``torch.amp.GradScaler``
hands them to optimizers with ``_step_supports_amp_scaling``, as torch's fused AdamW)."""

from __future__ import annotations

import torch


def per_device(grad_scale, found_inf, device):
    """AMP's scale and found-inf flag as fp32 scalars on ``device`` (no host sync)."""
    if grad_scale is None and found_inf is None:
        return None, None
    scale = (grad_scale.to(device, torch.float32, non_blocking=True) if grad_scale is not None
             else torch.ones((), device=device))
    inf = (found_inf.to(device, torch.float32, non_blocking=True) if found_inf is not None
           else torch.zeros((), device=device))
    return scale, inf
