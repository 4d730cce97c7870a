"""The tensors of one launch (one per device, param dtype, state dtype, master), shared by both
backends. No Triton import here: the torch backend must work where Triton is not installed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Bucket:
    """The tensors of one launch, in a fixed order (grads are fetched fresh every step)."""
    device: torch.device
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    has_master: bool
    params: list[Tensor] = field(default_factory=list)  # local tensors (DTensor unwrapped)
    sources: list[Tensor] = field(default_factory=list)  # what holds .grad (the Parameter)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    masters: list[Tensor | None] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    dtensor: bool = False  # some params are DTensors: their local shards are re-read each step
    names: list[str] = field(default_factory=list)  # for telemetry
    telemetry: Tensor | None = None  # fp32 [T, 5] when telemetry is on

    def refresh_locals(self, local) -> None:
        """FSDP2 may re-point a DTensor's local shard (reset_sharded_param): read it afresh so
        the table cache's address check sees the memory that will actually be updated."""
        if self.dtensor:
            self.params = [local(s) for s in self.sources]
