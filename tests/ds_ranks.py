"""Rank bodies for the DeepSpeed tests (importable: spawn pickles them by reference)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import tiedadam  # noqa: F401  what a user does: publishes "TiedAdamW" for DeepSpeed configs

BETA = 0.9
N_IN, HIDDEN = 12, 24


class Net(nn.Module):
    """Linear layers with biases and a LayerNorm: two param groups (decay / no decay)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(N_IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.b = nn.Linear(HIDDEN, HIDDEN)
        self.c = nn.Linear(HIDDEN, 1)

    def forward(self, x, y):
        x = x.to(self.a.weight.dtype)
        h = torch.tanh(self.b(self.norm(torch.relu(self.a(x)))))
        return ((self.c(h).float().squeeze(-1) - y) ** 2).mean()


def groups(model, wd=0.1):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def ds_config(stage: int, precision: str, *, opt_type="TiedAdamW", offload=False,
              clipping=1.0, opt_params=None) -> dict:
    params = {"lr": 1e-2, "betas": [BETA, BETA], "weight_decay": 0.1}
    if opt_type == "AdamW":
        params["torch_adam"] = True  # DeepSpeed's FusedAdam is a CUDA op
    else:
        # the Triton kernel (interpreted) on "device" partitions; torch's fused CPU AdamW on
        # offloaded CPU partitions, which is what "auto" picks there
        params["backend"] = "auto" if offload else "triton"
    if opt_params:
        params.update(opt_params)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clipping,
        "optimizer": {"type": opt_type, "params": params},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2,
                       "hysteresis": 1, "min_loss_scale": 1}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def batches(rank, n_steps, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return [(torch.randn(4, N_IN, generator=g), torch.randn(4, generator=g))
            for _ in range(n_steps)]


def full_params(engine, stage):
    import deepspeed
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def train(cfg, model, data, optimizer=None, ckpt=None, stage=0):
    """Train on ``data``; ``ckpt=(dir, "save"|"load", at)``: save after step ``at`` / load a
    checkpoint before training (continuing from ``at``)."""
    import deepspeed
    kw = dict(model=model, config=copy.deepcopy(cfg))
    if optimizer is None:
        kw["model_parameters"] = groups(model)
    else:
        kw["optimizer"] = optimizer
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            kw["model_parameters"] = groups(model)
    engine, opt, _, _ = deepspeed.initialize(**kw)
    start = 0
    if ckpt is not None and ckpt[1] == "load":
        engine.load_checkpoint(ckpt[0], tag="t")
        start = ckpt[2]
    losses = []
    for i, (x, y) in enumerate(data[start:], start=start):
        loss = engine(x.to(engine.device), y.to(engine.device))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if ckpt is not None and ckpt[1] == "save" and i + 1 == ckpt[2]:
            engine.save_checkpoint(ckpt[0], tag="t")
    out = dict(losses=losses, params=full_params(engine, stage),
               opt_type=type(engine.optimizer).__name__,
               basic=type(getattr(engine, "basic_optimizer", None) or opt).__name__,
               skipped=int(getattr(engine, "skipped_steps", 0)), **state_footprint(engine),
               **stream_keys(engine))
    engine.destroy()
    return out


def state_footprint(engine) -> dict:
    """Host bytes per parameter of what the optimizer keeps (the fp32 partitions it steps and
    their moments), measured from the tensors, and the moments' dtypes."""
    from tiedadam import TiedAdamW
    tied = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if not isinstance(tied, TiedAdamW):
        return {}
    parts = list(tied.state)  # the partitions stepped (ZeRO swaps them in and out of the groups)
    numel = sum(p.numel() for p in parts)
    held = sum(p.numel() * p.element_size() for p in parts)
    held += sum(st[k].numel() * st[k].element_size() for st in tied.state.values()
                for k in ("exp_avg", "exp_avg_sq"))
    return dict(bytes_per_param=held / numel,
                state_dtypes=sorted({str(st["exp_avg"].dtype) for st in tied.state.values()}),
                v_dtypes=sorted({str(st["exp_avg_sq"].dtype) for st in tied.state.values()}))


def stream_keys(engine) -> dict:
    """How many tensors the optimizer holds state for (ZeRO's flat partitions) and how many
    distinct rounding stream keys its cached plans gave them (Note [rng streams])."""
    from tiedadam import TiedAdamW
    tied = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if not isinstance(tied, TiedAdamW):
        return {}
    from tiedadam.optim import introspect
    keys = introspect.stream_keys(tied)
    return dict(partitions=len(tied.state), distinct_keys=len(keys - {0}))


def zero3_sub_groups(rank, world, offload, steps, at, ckpt_dir):
    """ZeRO-3 with a small ``sub_group_size``: several fp32 partitions per param group, each
    stepped alone through the same group dict. bf16 states rounded stochastically: a stream of
    its own for every partition, and a resumed run bitwise the uninterrupted one."""
    data = batches(rank, steps)
    torch.manual_seed(0)
    base = Net()
    cfg = ds_config(3, "fp32", offload=offload, opt_params={"state_dtype": "bfloat16"})
    cfg["zero_optimization"]["sub_group_size"] = 100
    whole = train(cfg, copy.deepcopy(base), data, ckpt=(ckpt_dir, "save", at), stage=3)
    torch.manual_seed(123)
    resumed = train(cfg, Net(), data, ckpt=(ckpt_dir, "load", at), stage=3)
    return whole, resumed


def parity(rank, world, stage, precision, offload, steps):
    """TiedAdamW (config name, Triton path or CPU path) vs DeepSpeed's own AdamW."""
    data = batches(rank, steps)
    torch.manual_seed(0)
    base = Net()
    ours = train(ds_config(stage, precision, offload=offload), copy.deepcopy(base), data,
                 stage=stage)
    ref = train(ds_config(stage, precision, opt_type="AdamW", offload=offload),
                copy.deepcopy(base), data, stage=stage)
    return ours, ref


def resume(rank, world, stage, precision, offload, steps, at, ckpt_dir, state_dtype=None):
    """Uninterrupted run (saving at ``at``) vs fresh engine + load + continue."""
    data = batches(rank, steps)
    torch.manual_seed(0)
    base = Net()
    cfg = ds_config(stage, precision, offload=offload,
                    opt_params={"state_dtype": state_dtype} if state_dtype else None)
    # the uninterrupted run saves at ``at`` on its way (saving changes nothing it trains)
    whole = train(cfg, copy.deepcopy(base), data, ckpt=(ckpt_dir, "save", at), stage=stage)
    torch.manual_seed(123)  # the resumed model starts from different weights: load must fix it
    resumed = train(cfg, Net(), data, ckpt=(ckpt_dir, "load", at), stage=stage)
    return whole, resumed


def compact_state_offload(rank, world, state_dtype, steps, at, ckpt_dir):
    """ZeRO-Offload, stages 1-3, ``"state_dtype": state_dtype`` in the JSON config ("bfloat16"
    or "ratio8"; stochastic rounding, the compiled CPU step): an fp32-state run, a run in that
    state dtype that saves at ``at``, and that checkpoint loaded into a fresh engine and
    continued."""
    from tiedadam.optim import torch_backend
    torch_backend.USE_COMPILED_CPU_STEP = True  # the suite turns it off (tests/conftest.py)
    data = batches(rank, steps)
    torch.manual_seed(0)
    base = Net()
    out = {}
    for stage in (1, 2, 3):
        cfg32 = ds_config(stage, "fp32", offload=True)
        cfg16 = ds_config(stage, "fp32", offload=True, opt_params={"state_dtype": state_dtype})
        fp32 = train(cfg32, copy.deepcopy(base), data, stage=stage)
        whole = train(cfg16, copy.deepcopy(base), data,
                      ckpt=(f"{ckpt_dir}/{stage}", "save", at), stage=stage)
        resumed = train(cfg16, Net(), data, ckpt=(f"{ckpt_dir}/{stage}", "load", at),
                        stage=stage)
        out[stage] = dict(fp32=fp32, whole=whole, resumed=resumed)
    from tiedadam.kernels import tied_adamw_cpu
    out["compiled_modes"] = len(tied_adamw_cpu.compile_seconds)
    return out


def client_optimizer(rank, world, kind, stage, offload, steps):
    """TiedAdamW passed to deepspeed.initialize(optimizer=...) as an instance or a callable."""
    from tiedadam import TiedAdamW
    data = batches(rank, steps)
    torch.manual_seed(0)
    base = Net()
    cfg = ds_config(stage, "fp32", offload=offload)
    del cfg["optimizer"]
    if offload:
        cfg["zero_force_ds_cpu_optimizer"] = False
    model = copy.deepcopy(base)
    backend = "auto" if offload else "triton"
    if kind == "instance":
        opt = TiedAdamW(groups(model), lr=1e-2, beta=BETA, weight_decay=0.1, backend=backend)
    else:
        def opt(params):
            return TiedAdamW(params, lr=1e-2, beta=BETA, weight_decay=0.1, backend=backend)
    ours = train(cfg, model, data, optimizer=opt, stage=stage)
    ref = train(ds_config(stage, "fp32", opt_type="AdamW", offload=offload),
                copy.deepcopy(base), data, stage=stage)
    return ours, ref


def untied(rank, world):
    import deepspeed
    cfg = ds_config(1, "fp32")
    cfg["optimizer"]["params"]["betas"] = [0.9, 0.999]
    model = Net()
    try:
        deepspeed.initialize(model=model, model_parameters=groups(model), config=cfg)
    except ValueError as e:
        return str(e)
    return None



def telemetry(rank, world, steps):
    """ZeRO-2 flat partitions: telemetry(reduce=True) totals over ranks equal those of a
    stage-0 run (whole grads on every rank, no reduction)."""
    from tiedadam.optim.telemetry import to_floats
    data = batches(rank, steps)
    torch.manual_seed(0)
    base = Net()
    out = {}
    for stage in (0, 2):
        cfg = ds_config(stage, "fp32", opt_params={"telemetry": True})
        import deepspeed
        model = copy.deepcopy(base)
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model),
                                                 config=cfg)
        for x, y in data:
            engine.backward(engine(x, y))
            engine.step()
        tied = engine.optimizer if stage == 0 else engine.optimizer.optimizer
        out[stage] = to_floats(tied.telemetry(reduce=stage != 0))
        engine.destroy()
    return out


def clipping_refused(rank, world, kind):
    """max_grad_norm in the config's "params", or on an instance passed in: refused at
    initialize (DeepSpeed clips with "gradient_clipping"), naming the fix."""
    import deepspeed
    from tiedadam import TiedAdamW
    model = Net()
    cfg = ds_config(2, "fp32")
    kw = {}
    if kind == "config":
        cfg["optimizer"]["params"]["max_grad_norm"] = 1.0
    else:
        del cfg["optimizer"]
        kw["optimizer"] = TiedAdamW(groups(model), lr=1e-2, beta=BETA, backend="triton",
                                    max_grad_norm=1.0)
    try:
        deepspeed.initialize(model=model, model_parameters=groups(model), config=cfg, **kw)
    except ValueError as e:
        return str(e)
    return None


def clipping_set_after_initialize(rank, world, stage):
    """max_grad_norm set on the engine's TiedAdamW after deepspeed.initialize (the check at
    initialize cannot see it): refused at the assignment, with DeepSpeed's fix, and training
    goes on unclipped by the optimizer."""
    import deepspeed
    model = Net()
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model),
                                             config=ds_config(stage, "fp32"))
    tied = engine.optimizer if stage == 0 else engine.optimizer.optimizer
    msg = None
    try:
        tied.max_grad_norm = 1.0
    except ValueError as e:
        msg = str(e)
    x, y = batches(rank, 1)[0]
    engine.backward(engine(x, y))
    engine.step()
    out = (msg, tied.max_grad_norm)
    engine.destroy()
    return out
