"""The optimizers the benchmarks compare, each with the bytes one step must move per parameter
(reads + writes, the floor that bandwidth is counted against) and whether it is the same
algorithm as TiedAdamW. A provider that cannot run here raises Unavailable with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class Unavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Provider:
    make: Callable
    param_dtype: torch.dtype
    bytes_per_param: int
    algorithm: str = "AdamW, tied betas"
    reference: str = "torch-fused"  # the provider its speedup is measured against


def _tied(**kw):
    def make(params, lr, beta, device):
        from tiedadam import TiedAdamW
        return TiedAdamW(params, lr=lr, beta=beta, weight_decay=0.01, **kw)
    return make


def _torch(**kw):
    def make(params, lr, beta, device):
        if kw.get("fused") and device == "cpu" and not hasattr(torch, "_fused_adamw_"):
            raise Unavailable("this torch has no fused CPU AdamW")
        return torch.optim.AdamW(params, lr=lr, betas=(beta, beta), weight_decay=0.01, **kw)
    return make


def _torch_compiled(params, lr, beta, device):
    if device != "cuda":
        raise Unavailable("compiling the step with inductor on a 2-core CPU takes minutes; "
                          "measured on CUDA only")
    opt = torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), betas=(beta, beta),
                            weight_decay=0.01, foreach=True, capturable=True)
    compiled = torch.compile(opt.step)

    class Compiled:
        def step(self):
            compiled()
    return Compiled()


class _FusedPlusCopy:
    """torch fused AdamW on fp32 master copies, then copy_ into the bf16 params: the usual
    two-pass recipe that TiedAdamW's master-weight mode does in one pass (28 + 6 bytes)."""

    def __init__(self, params, lr, beta, device):
        self.params = params
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in params]
        for m, p in zip(self.masters, params):
            m.grad = p.grad.float()  # as if backward produced fp32 grads
        self.opt = torch.optim.AdamW(self.masters, lr=lr, betas=(beta, beta),
                                     weight_decay=0.01, fused=True)
        self.grad_params = self.masters  # what the benchmarks hand fresh grads to

    @torch.no_grad()
    def step(self):
        self.opt.step()
        torch._foreach_copy_(self.params, self.masters)


class _ClipThenFused:
    """torch.nn.utils.clip_grad_norm_ (a foreach norm reading every grad, a foreach multiply
    reading and writing every grad) then torch's fused AdamW: 4 + 8 + 28 bytes per param."""

    def __init__(self, params, lr, beta, device, max_norm=1.0):
        self.params, self.max_norm = params, max_norm
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(beta, beta), weight_decay=0.01,
                                     fused=True)

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()


def _deepspeed_fused(params, lr, beta, device):
    if device != "cuda":
        raise Unavailable("DeepSpeed FusedAdam is a CUDA op")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise Unavailable("deepspeed is not installed") from None
    try:
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(params, lr=lr, betas=(beta, beta), weight_decay=0.01, adam_w_mode=True)
    except Exception as e:
        raise Unavailable(f"DeepSpeed FusedAdam: {type(e).__name__}: {e}") from None


def _deepspeed_cpu(params, lr, beta, device):
    if device != "cpu":
        raise Unavailable("DeepSpeedCPUAdam steps CPU tensors (ZeRO-Offload)")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise Unavailable("deepspeed is not installed") from None
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=lr, betas=(beta, beta), weight_decay=0.01,
                                adamw_mode=True)
    except Exception as e:
        raise Unavailable(f"DeepSpeedCPUAdam: {type(e).__name__}: {e}") from None


def _bnb(params, lr, beta, device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise Unavailable("bitsandbytes is not installed") from None
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(beta, beta), weight_decay=0.01)


def _torchao(params, lr, beta, device):
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise Unavailable("torchao is not installed") from None
    return AdamW8bit(params, lr=lr, betas=(beta, beta), weight_decay=0.01)


BF16 = torch.bfloat16
PROVIDERS: dict[str, Provider] = {
    # TiedAdamW's modes; bytes per param: README "Mixed precision and memory" table
    "tiedadam": Provider(_tied(), torch.float32, 28),
    "tiedadam-master-bf16": Provider(_tied(master_weights=True), BF16, 28),
    "tiedadam-bf16-state": Provider(_tied(state_dtype=BF16), torch.float32, 20),
    "tiedadam-pure-bf16": Provider(_tied(state_dtype=BF16, param_stochastic_rounding=True),
                                   BF16, 14),
    # ratio8 moments: read p, g fp32, m int8, v bf16; write p, m, v (Note [ratio8])
    "tiedadam-ratio8": Provider(_tied(state_dtype="ratio8"), torch.float32, 18),
    "tiedadam-telemetry": Provider(_tied(telemetry=True), torch.float32, 28),
    # clipping by the global norm (max 1.0; the benchmarks' grads have norm > 1): the norm
    # reads every grad once (4), the update applies the coefficient (28)
    "tiedadam-clip": Provider(_tied(max_grad_norm=1.0), torch.float32, 4 + 28,
                              reference="torch-fused-clip"),
    "torch-foreach": Provider(_torch(foreach=True), torch.float32, 28),
    "torch-fused": Provider(_torch(fused=True), torch.float32, 28),
    "torch-fused-clip": Provider(_ClipThenFused, torch.float32, 4 + 8 + 28,
                                 reference="torch-fused-clip"),
    "torch-compiled": Provider(_torch_compiled, torch.float32, 28),
    "torch-fused+copy-bf16": Provider(_FusedPlusCopy, torch.bfloat16, 34),
    "deepspeed-fused": Provider(_deepspeed_fused, torch.float32, 28),
    "deepspeed-cpu": Provider(_deepspeed_cpu, torch.float32, 28),
    "bnb-adamw8bit": Provider(_bnb, torch.float32, 4 + 4 + 2 + 4 + 2,
                              "AdamW, 8-bit blockwise states (different algorithm)"),
    "torchao-adamw8bit": Provider(_torchao, torch.float32, 4 + 4 + 2 + 4 + 2,
                                  "AdamW, 8-bit blockwise states (different algorithm)"),
}


def make_optimizer(name, params, lr, beta, device):
    return PROVIDERS[name].make(params, lr, beta, device)


def state_bytes(opt) -> int:
    """Bytes of optimizer state: TiedAdamW reports its own; others are summed from .state
    (plus the fp32 master copies of the fused+copy recipe)."""
    if hasattr(opt, "state_bytes"):
        return sum(opt.state_bytes().values())
    inner = getattr(opt, "opt", opt)
    total = sum(v.numel() * v.element_size() for st in inner.state.values()
                for v in st.values() if torch.is_tensor(v))
    if isinstance(opt, _FusedPlusCopy):
        total += sum(m.numel() * 4 for m in opt.masters)
    return total
