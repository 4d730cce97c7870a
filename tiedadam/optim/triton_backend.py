"""TiedAdamW through the Triton multi-tensor kernel: one launch per (device, param dtype,
state dtype, master) bucket per step, across all param groups.

Per step the host does: build the per-group hyperparameter table (G rows), bump the step
counts (one foreach op per bucket, as torch's fused AdamW does), look the table up in the
cache (address comparisons only, Note [table cache]) and launch. No host-device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
from torch import Tensor

from ..kernels import tied_adamw as K
from ..kernels.multi_tensor import TableCache, upload


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
    masters: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)


def hyper_table(groups: Sequence[dict], device: torch.device) -> Tensor:
    """fp64 [G, 4] (lr, beta, eps, weight_decay) on ``device``, without a sync.

    lr may be a device tensor (capturable/scheduled on device): then the table is assembled
    on the device; otherwise on the host and uploaded through pinned memory.
    """
    if any(isinstance(g["lr"], Tensor) and g["lr"].device.type != "cpu" for g in groups):
        rows = [torch.stack([torch.as_tensor(g["lr"], device=device).to(torch.float64).reshape(()),
                             *(torch.tensor(float(g[k]), dtype=torch.float64, device=device)
                               for k in ("beta", "eps", "weight_decay"))]) for g in groups]
        return torch.stack(rows)
    host = torch.tensor([[float(g["lr"]), g["beta"], g["eps"], g["weight_decay"]]
                         for g in groups], dtype=torch.float64)
    return upload(host, device)


def triton_step(buckets: Sequence[Bucket], bucket_keys: Sequence[Hashable],
                groups: Sequence[dict], cache: TableCache, *,
                grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    hypers: dict[torch.device, Tensor] = {}
    for key, b in zip(bucket_keys, buckets):
        grads = [s.grad for s in b.sources]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        torch._foreach_add_(b.steps, 1.0)
        hyper = hypers.get(b.device)
        if hyper is None:
            hyper = hypers[b.device] = hyper_table(groups, b.device)
        masters = b.masters if b.has_master else b.params
        scale, inf = _per_device(grad_scale, found_inf, b.device)
        if len(b.params) == 1:
            # Note [flat]: one tensor (a ZeRO partition, an FSDP1 flat shard) goes to the kernel
            # as direct arguments: no tables to look up or re-point when ZeRO swaps the grad.
            K.launch_tied_adamw(None, hyper, param_dtype=b.param_dtype,
                                state_dtype=b.state_dtype, has_master=b.has_master,
                                grad_scale=scale, found_inf=inf,
                                flat=(b.params[0], grads[0], b.exp_avgs[0], b.exp_avg_sqs[0],
                                      masters[0], b.steps[0]))
        else:
            roles = (b.params, grads, b.exp_avgs, b.exp_avg_sqs, masters, b.steps)
            table = cache.get(key, roles, b.groups, K.N_ELEMENTWISE, K.CHUNK, b.device,
                              watched=(K.ROLE_PARAM, K.ROLE_GRAD), volatile=(K.ROLE_GRAD,))
            K.launch_tied_adamw(table, hyper, param_dtype=b.param_dtype,
                                state_dtype=b.state_dtype, has_master=b.has_master,
                                grad_scale=scale, found_inf=inf)
        if inf is not None:
            torch._foreach_sub_(b.steps, inf)  # a skipped step does not count


def _per_device(grad_scale, found_inf, device):
    if grad_scale is None and found_inf is None:
        return None, None
    scale = (grad_scale.to(device, torch.float32, non_blocking=True) if grad_scale is not None
             else torch.ones((), device=device))
    inf = (found_inf.to(device, torch.float32, non_blocking=True) if found_inf is not None
           else torch.zeros((), device=device))
    return scale, inf
