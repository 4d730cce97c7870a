"""TiedAdamW through torch's own fused AdamW (``torch._fused_adamw_`` with betas (beta, beta)).

The right backend for CPU tensors outside the tests (DESIGN.md §4: as fast as DeepSpeedCPUAdam
on this machine, 6x the foreach path): the same semantics, no Triton. Also serves any device
when ``backend="torch"``. Torch's fused op wants states in the param dtype; for bf16/fp16
params (fp32 state by our default) the math runs on fp32 copies that are written back.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def torch_tied_adamw(params: Sequence[Tensor], grads: Sequence[Tensor],
                     exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                     masters: Sequence[Tensor | None], state_steps: Sequence[Tensor], *,
                     lr: float | Tensor, beta: float, eps: float, weight_decay: float,
                     grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One step for one param group. ``state_steps`` must already hold t."""
    if not params:
        return
    kw = dict(lr=lr, beta1=beta, beta2=beta, weight_decay=weight_decay, eps=eps,
              amsgrad=False, maximize=False, grad_scale=grad_scale, found_inf=found_inf)
    same = [i for i, p in enumerate(params)
            if masters[i] is None and p.dtype == exp_avgs[i].dtype]
    if len(same) == len(params):
        torch._fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [],
                            list(state_steps), **kw)
        return
    if same:
        torch._fused_adamw_([params[i] for i in same], [grads[i] for i in same],
                            [exp_avgs[i] for i in same], [exp_avg_sqs[i] for i in same], [],
                            [state_steps[i] for i in same], **kw)
    other = [i for i in range(len(params)) if i not in set(same)]
    # fp32 working copies: the master weight when there is one, else the upcast param.
    work = [masters[i] if masters[i] is not None else params[i].float() for i in other]
    m32 = [exp_avgs[i].float() for i in other]
    v32 = [exp_avg_sqs[i].float() for i in other]
    torch._fused_adamw_(work, [grads[i].float() for i in other], m32, v32, [],
                        [state_steps[i] for i in other], **kw)
    for j, i in enumerate(other):
        params[i].copy_(work[j])
        if exp_avgs[i].dtype != torch.float32:
            exp_avgs[i].copy_(m32[j])
            exp_avg_sqs[i].copy_(v32[j])
