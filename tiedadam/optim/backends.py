"""Which backend steps a device's tensors, and the backend objects of one optimizer (made when
first needed: the Triton one imports Triton)."""

from __future__ import annotations

import torch

from .. import _compat
from ..kernels.runtime import triton_runs_on, triton_unavailable_reason
from .torch_backend import TorchBackend


class Backends:
    """``choice`` is the optimizer's ``backend`` argument: "auto", "triton" or "torch"."""

    def __init__(self, choice: str):
        self.choice = choice
        self._made: dict = {}

    def name_for(self, device: torch.device) -> str:
        """The backend for tensors on ``device``; raises where the chosen one cannot run."""
        if self.choice == "auto":
            if device.type == "cuda" and triton_runs_on(device):
                return "triton"
            name = "torch"
        elif self.choice == "triton":
            if not triton_runs_on(device):
                raise RuntimeError(
                    f"backend='triton' cannot update tensors on {device}: "
                    f"{triton_unavailable_reason() or 'Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)'}. "
                    f"Use backend='auto' or 'torch' for these parameters.")
            return "triton"
        else:
            name = "torch"
        if _compat.fused_adamw_ is None:
            raise RuntimeError("backend='torch' needs torch's fused AdamW op, which this torch "
                               "lacks; upgrade torch (>= 2.4) or use backend='triton' on CUDA")
        return name

    def __getitem__(self, name: str):
        backend = self._made.get(name)
        if backend is None:
            if name == "triton":
                from .triton_backend import TritonBackend  # imports Triton
                backend = TritonBackend()
            else:
                backend = TorchBackend()
            self._made[name] = backend
        return backend

    def reset(self) -> None:
        """After a load: the backends' caches go (a Triton backend keeps its graph buffers)."""
        for backend in self._made.values():
            backend.reset()
