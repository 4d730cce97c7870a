"""TiedAdamW through torch's own fused AdamW (``torch._fused_adamw_`` with betas (beta, beta)).

The right backend for CPU tensors outside the tests (DESIGN.md §4: as fast as DeepSpeedCPUAdam
on this machine, 6x the foreach path): the same semantics, no Triton. Also serves any device
when ``backend="torch"``. Torch's fused op wants states in the param dtype; for the other modes
(fp32 state with bf16 params, master weights, bf16 state) the math runs on fp32 working copies
that are written back, rounded to nearest or stochastically.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def stochastic_round_to_bf16_(dst: Tensor, src: Tensor, generator: torch.Generator) -> None:
    """dst (bf16) <- src (fp32) rounded stochastically: add 16 random low bits, truncate.
    The same construction as the kernel's ``_round_to_bf16``; unbiased: E[dst] = src."""
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device,
                          generator=generator)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # low 16 bits zero: exact in bf16


def torch_tied_adamw(params: Sequence[Tensor], grads: Sequence[Tensor],
                     exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                     masters: Sequence[Tensor | None], state_steps: Sequence[Tensor], *,
                     lr: float | Tensor, beta: float, eps: float, weight_decay: float,
                     grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                     generator: torch.Generator | None = None, state_sr: bool = False,
                     param_sr: bool = False) -> None:
    """One step for one param group. ``state_steps`` must already hold t."""
    if not params:
        return
    kw = dict(lr=lr, beta1=beta, beta2=beta, weight_decay=weight_decay, eps=eps,
              amsgrad=False, maximize=False, grad_scale=grad_scale, found_inf=found_inf)
    plain = [i for i, p in enumerate(params)
             if masters[i] is None and p.dtype == exp_avgs[i].dtype
             and not ((state_sr or param_sr) and p.dtype == torch.bfloat16)]
    if plain:
        torch._fused_adamw_([params[i] for i in plain], [grads[i] for i in plain],
                            [exp_avgs[i] for i in plain], [exp_avg_sqs[i] for i in plain], [],
                            [state_steps[i] for i in plain], **kw)
    if len(plain) == len(params):
        return
    other = sorted(set(range(len(params))) - set(plain))
    # fp32 working copies: the master weight when there is one, else the upcast param.
    work = [masters[i] if masters[i] is not None else params[i].float() for i in other]
    m32 = [exp_avgs[i].float() for i in other]
    v32 = [exp_avg_sqs[i].float() for i in other]
    torch._fused_adamw_(work, [grads[i].float() for i in other], m32, v32, [],
                        [state_steps[i] for i in other], **kw)
    for j, i in enumerate(other):
        if params[i].dtype == torch.bfloat16 and param_sr and masters[i] is None:
            stochastic_round_to_bf16_(params[i], work[j], generator)
        else:
            params[i].copy_(work[j])  # round to nearest even
        if exp_avgs[i].dtype != torch.float32:
            if state_sr and exp_avgs[i].dtype == torch.bfloat16:
                stochastic_round_to_bf16_(exp_avgs[i], m32[j], generator)
                stochastic_round_to_bf16_(exp_avg_sqs[i], v32[j], generator)
            else:
                exp_avgs[i].copy_(m32[j])
                exp_avg_sqs[i].copy_(v32[j])
