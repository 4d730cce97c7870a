"""The tensors of one launch (one per device, param dtype, state dtype, master, rounding mode),
shared by both backends. No Triton import here: the torch backend must work where Triton is
not installed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# How many step plans (and, per backend, address tables and hyperparameter tables) are kept:
# DeepSpeed steps one group per call, ZeRO-3 one sub-group partition per call, each a plan.
MAX_CACHED = 64


@dataclass
class Bucket:
    """The tensors of one launch, in a fixed order. Built once per plan (Note [what the kernel
    may trust] in verify.py); ``grads`` (and ``params`` where a working copy stands in for a
    non-dense param) are set afresh every step by ``bind``."""
    device: torch.device
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    has_master: bool
    state_sr: bool = False  # bf16 states rounded stochastically
    param_sr: bool = False  # bf16 params (no master) rounded stochastically
    index: list[int] = field(default_factory=list)  # positions in the step's entry list
    params: list[Tensor] = field(default_factory=list)  # the param role: local shards or copies
    grads: list[Tensor] = field(default_factory=list)
    parameters: list[Tensor] = field(default_factory=list)  # the Parameters (what holds .grad)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    masters: list[Tensor | None] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # rounding stream keys (rng.py)
    names: list[str] = field(default_factory=list)  # for telemetry
    telemetry: Tensor | None = None  # fp32 [T, layout.TELEMETRY_WIDTH] when telemetry is on
    tickets: Tensor | None = None  # int32 [T] zeros for the kernel's step counts (triton)
    whole: bool = False  # the only bucket of its step: index is every entry, in order
    has_copies: bool = False  # some params step through working copies
    base_params: list | None = None  # params outside a step (copies: the build step's, unused)
    clip_buffers: dict = field(default_factory=dict)  # torch backend: clipped grads, by position

    def clip_buffer(self, i: int) -> Tensor:
        """A tensor laid out like this step's grad ``i``, kept across steps, for the clipped
        grad torch's fused op reads (optim/torch_backend.py)."""
        g = self.grads[i]
        buf = self.clip_buffers.get(i)
        if (buf is None or buf.shape != g.shape or buf.dtype != g.dtype
                or buf.device != g.device or buf.stride() != g.stride()):
            buf = self.clip_buffers[i] = torch.empty_like(g)
        return buf

    def bind(self, inputs) -> None:
        """This step's grads and working copies (``step_plan.StepInputs``), verified."""
        grads = inputs.grads
        self.grads = grads if self.whole else [grads[i] for i in self.index]
        if self.has_copies:
            if self.base_params is None:
                self.base_params = list(self.params)
            copies = inputs.copies
            self.params = [copies.get(i, b) for i, b in zip(self.index, self.base_params)]

    def release(self) -> None:
        """Drop this step's grads (and working copies) once launched."""
        self.grads = []
        if self.has_copies:
            self.params = list(self.base_params)
