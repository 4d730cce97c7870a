"""Validation of TiedAdamW's hyperparameters: every error names the argument and the fix,
and is raised before any state or parameter changes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "torch")


def _scalar(name: str, value: Any, where: str) -> float | None:
    """The float value of a hyperparameter, or None for a device tensor (not read: no sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}{name} must be a float or a 1-element tensor, "
                             f"got a tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return None
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}{name} must be a float, got {type(value).__name__}: {value!r}")
    return float(value)


def check_lr(lr: Any, where: str = "") -> None:
    v = _scalar("lr", lr, where)
    if v is not None and not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {where}lr={v}: the learning rate must be finite and >= 0")


def check_beta(beta: Any, where: str = "") -> float:
    v = _scalar("beta", beta, where)
    if v is None:
        raise ValueError(f"{where}beta must be a Python float or a CPU tensor (it sets the "
                         f"bias correction), got a {beta.device.type} tensor")
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {where}beta={v}: beta must be in [0, 1) "
                         f"(0.95 is the usual tied value)")
    return v


def check_eps(eps: Any, where: str = "") -> None:
    v = _scalar("eps", eps, where)
    if v is None or not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {where}eps={eps}: eps must be a finite float >= 0")


def check_weight_decay(weight_decay: Any, where: str = "") -> None:
    v = _scalar("weight_decay", weight_decay, where)
    if v is None or not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {where}weight_decay={weight_decay}: weight_decay must be a "
                         f"finite float >= 0")


def tied_beta_from_betas(betas: Any, where: str = "") -> float:
    """``betas=(b, b)`` -> b. Untied betas are refused with the reason and the fix."""
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}betas must be a pair (beta, beta), got {betas!r}") from None
    b1 = check_beta(b1, where)
    b2 = check_beta(b2, where)
    if b1 != b2:
        raise ValueError(
            f"TiedAdamW ties beta1 = beta2 = beta, but {where}betas=({b1}, {b2}) are untied. "
            f"Tied betas make m and v the same running average, which bounds every update "
            f"element to [-lr, lr] and needs one bias correction. Pass beta={b2} "
            f"(or betas=({b2}, {b2})), or use torch.optim.AdamW for untied betas.")
    return b1


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend={backend!r}: choose one of {', '.join(BACKENDS)} "
                         f"('auto' picks Triton on CUDA, torch's fused AdamW on CPU)")
    return backend


def check_state_dtype(state_dtype: Any) -> torch.dtype:
    if state_dtype is None:
        return torch.float32
    if state_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"Unsupported state_dtype={state_dtype}: use torch.float32 (default) "
                         f"or torch.bfloat16")
    return state_dtype
