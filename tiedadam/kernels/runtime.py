"""Where Triton kernels can run in this process.

Triton compiles for CUDA devices; without one, kernels still run (slowly) in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before the kernel modules were imported
(the variable is read when ``@triton.jit`` decorates a function).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the reason it does not."""
    try:
        import triton  # noqa: F401  (only: can it be imported?)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"{type(e).__name__}: {e}"
    return None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """True when a Triton kernel can update tensors that live on ``device``."""
    if triton_import_error() is not None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def triton_unavailable_reason() -> str | None:
    """None when Triton can run somewhere in this process, else why not and what to do."""
    err = triton_import_error()
    if err is not None:
        return (f"Triton cannot be imported ({err}). Install it (`pip install triton`) or use "
                f"backend='torch' (torch's fused AdamW with betas (beta, beta)).")
    if torch.cuda.is_available() or interpreter_enabled():
        return None
    return ("Triton needs a CUDA GPU, and none is visible; its CPU interpreter is off. Use "
            "backend='torch' (or 'auto') on CPU, or set TRITON_INTERPRET=1 before importing "
            "tiedadam to run the Triton kernels in the (slow) interpreter.")
