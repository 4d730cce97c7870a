"""TiedAdamW through torch's own fused AdamW (``_compat.fused_adamw_`` with betas (beta, beta)).

The backend for CPU tensors (``"auto"`` picks it there), and for any device with
``backend="torch"``: the same semantics, no Triton. Torch's fused op wants states in the param
dtype; the other modes (fp32 state with bf16 params, master weights, bf16 or ratio8 state, pure
bf16, and fp32 with telemetry) go, for CPU tensors, through the native CPU step
(kernels/native_cpu.cpp: one call per param group, the Triton kernel's math and rounding), or
where it cannot be built the compiled one (kernels/tied_adamw_cpu.py); elsewhere, or for a
layout neither walks, the math runs on fp32 working copies that are written back, rounded to
nearest or stochastically.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from .. import _compat
from ..kernels import ratio8
from ..kernels.bf16_round import round_bf16
from ..kernels.layout import TELEMETRY_WIDTH
from .amp import per_device
from .rng import mix


# Note [torch rng]
# The rounding noise of a tensor at step t comes from a generator seeded with mix(key, t), key
# the tensor's stream key (Note [rng streams] in rng.py): a pure function of what a checkpoint
# holds, so a resumed run rounds exactly as the uninterrupted one would (as the kernel's Philox
# counter does), and no generator state needs saving. Reading t costs a host read of the step
# count: free for CPU tensors, a sync for CUDA tensors stepped with backend="torch".


def stochastic_round_to_bf16_(dst: Tensor, src: Tensor, generator: torch.Generator) -> None:
    """dst (bf16) <- src (fp32) rounded stochastically with 16 random low bits from
    ``generator``: ``round_bf16``, the compiled step's construction (NaN-safe, unbiased; on CUDA
    this path rounds the GPU's 0x7FFFFFFF NaN, Note [cpu nan] in kernels/tied_adamw_cpu.py)."""
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device,
                          generator=generator)
    dst.copy_(round_bf16(src.contiguous(), noise))


def torch_tied_adamw(params: Sequence[Tensor], grads: Sequence[Tensor],
                     exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                     masters: Sequence[Tensor | None], state_steps: Sequence[Tensor], *,
                     lr: float | Tensor, beta: float, eps: float, weight_decay: float,
                     grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                     keys: Sequence[int] | None = None, state_sr: bool = False,
                     param_sr: bool = False, clip: Tensor | None = None,
                     clip_buffer=None, moments: dict | None = None,
                     rows: Tensor | None = None, snr_threshold: float = 0.0) -> set[int]:
    """One step for one param group. ``state_steps`` must already hold t. ``keys`` (one per
    tensor: mix(stream key, t), Note [torch rng]) are needed when rounding stochastically. With
    ``grad_scale`` the grads hold their unscaled values afterwards (unless ``found_inf``), as
    torch's fused AdamW leaves them. ``clip``: the clip coefficient (0-dim, on the params'
    device; Note [clipping] in kernels/tied_adamw.py): the update uses g * clip, the grads are
    not clipped in place; ``found_inf`` then already holds the non-finite-norm flag too. Where
    torch's fused op needs the clipped grad as a tensor, it is written into ``clip_buffer(i)``
    (kept by the caller across steps: a fresh CPU tensor of a grad's size costs its page
    faults every step, several times the multiply itself), or a new tensor without one.
    ``moments``: a dict that receives {i: (m, v)}, the fp32 moments the update of tensor i
    read, before the state's rounding (telemetry describes the update applied); those with
    bf16 or ratio8 moments then step through torch ops on fp32 copies, where the moments exist
    unrounded, unless the native CPU step takes them: with ``rows`` (fp32 [len(params), 5],
    telemetry on), the tensors it steps get their telemetry rows computed in its pass (Note
    [native telemetry] in kernels/native_cpu.cpp), fp32 ones included (one pass instead of
    torch's fused op and the rows' own passes). Returns the indices whose rows were written."""
    if not params:
        return set()
    exact = (torch.float32, torch.float64)  # moments stored as the update reads them
    # (the native step is built at its first use: not for fp32 tensors without telemetry)
    tel_native = rows is not None and _native_available(params[0])
    plain = [i for i, p in enumerate(params)
             if masters[i] is None and p.dtype == exp_avgs[i].dtype
             and not ((state_sr or param_sr) and p.dtype == torch.bfloat16)
             and (moments is None or p.dtype in exact)
             and not (tel_native and p.dtype == torch.float32)]
    divisor = None
    if clip is not None and grad_scale is not None:
        # Clipping multiplies the unscaled grads: unscale first. The fused op's own grads in
        # place, in their dtype (fp32/fp64, or bf16 with bf16 moments: as the fused op would);
        # the others in fp32 below, never in place in fp16/bf16, where small unscaled grads
        # would underflow. A skipped step divides by 1.
        divisor = torch.where(found_inf != 0, torch.ones_like(grad_scale), grad_scale)
        if plain:
            _compat.foreach_div_([grads[i] for i in plain], divisor)
    kw = dict(lr=lr, beta1=beta, beta2=beta, weight_decay=weight_decay, eps=eps,
              amsgrad=False, maximize=False, grad_scale=None if divisor is not None else
              grad_scale, found_inf=found_inf)
    if moments is not None:
        for i in plain:
            moments[i] = (exp_avgs[i], exp_avg_sqs[i])
    if plain:
        gp = [grads[i] for i in plain]
        if clip is not None:  # the clipped grads the update reads; the user's stay as given
            gp = [torch.mul(g, clip.to(g.dtype), out=clip_buffer(i)) if clip_buffer else
                  g * clip.to(g.dtype) for i, g in zip(plain, gp)]
        _compat.fused_adamw_([params[i] for i in plain], gp,
                            [exp_avgs[i] for i in plain], [exp_avg_sqs[i] for i in plain], [],
                            [state_steps[i] for i in plain], **kw)
    if len(plain) == len(params):
        return set()
    other = sorted(set(range(len(params))) - set(plain))
    written: set[int] = set()
    if params[other[0]].device.type == "cpu":
        if found_inf is not None and float(found_inf) != 0:
            return written  # a skipped step changes nothing (a CPU tensor: no sync to read it)
        if tel_native or _native_available(params[other[0]]):
            taken = _native_cpu_steps(
                [params[i] for i in other], [grads[i] for i in other],
                [exp_avgs[i] for i in other], [exp_avg_sqs[i] for i in other],
                [masters[i] for i in other], [state_steps[i] for i in other],
                lr=lr, beta=beta, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
                keys=[keys[i] for i in other] if keys else None, state_sr=state_sr,
                param_sr=param_sr, clip=clip, rows=rows, rows_at=other,
                snr_threshold=snr_threshold)
            if rows is not None:
                written.update(i for i, t in zip(other, taken) if t)
            other = [i for i, t in zip(other, taken) if not t]
        if not other:
            return written
        other = [i for i in other if (moments is not None and exp_avgs[i].dtype not in exact)
                 or not _compiled_cpu_step(
            params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i], state_steps[i],
            lr=lr, beta=beta, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
            found_inf=found_inf, key=keys[i] if keys else 0, state_sr=state_sr,
            param_sr=param_sr, clip=clip)]
        if not other:
            return written
    # fp32 working copies: the master weight when there is one, else the upcast param.
    work = [masters[i] if masters[i] is not None else params[i].float() for i in other]
    m32 = [ratio8.decode(exp_avgs[i], exp_avg_sqs[i]) if exp_avgs[i].dtype == torch.int8
           else exp_avgs[i].float() for i in other]
    v32 = [exp_avg_sqs[i].float() for i in other]
    g32 = [grads[i].float() for i in other]
    if divisor is not None:
        _compat.foreach_div_(g32, divisor)  # in fp32 (an fp32 grad: in place, as given)
    unscaled = g32
    if clip is not None:
        g32 = [g * clip for g in g32]
    _compat.fused_adamw_(work, g32, m32, v32, [], [state_steps[i] for i in other], **kw)
    if moments is not None:
        moments.update({i: (m32[j], v32[j]) for j, i in enumerate(other)})
    for j, i in enumerate(other):
        gen = None
        if state_sr or param_sr:  # one generator per tensor, consumed before the next
            gen = torch.Generator(device=params[i].device)
            gen.manual_seed(keys[i])
        if grad_scale is not None and unscaled[j] is not grads[i]:
            grads[i].copy_(unscaled[j])  # unscaled (not clipped), as the fused op leaves them
        if params[i].dtype == torch.bfloat16 and param_sr and masters[i] is None:
            stochastic_round_to_bf16_(params[i], work[j], gen)
        elif work[j] is not params[i]:
            params[i].copy_(work[j])  # round to nearest even
        if exp_avgs[i].dtype == torch.int8:  # ratio8: v first, m encoded against it
            if state_sr:
                stochastic_round_to_bf16_(exp_avg_sqs[i], v32[j], gen)
                noise = torch.randint(0, 1 << 16, m32[j].shape, dtype=torch.int32,
                                      device=m32[j].device, generator=gen)
            else:
                exp_avg_sqs[i].copy_(v32[j])
                noise = None
            bound = ratio8.code_bound_of(beta, state_steps[i])  # Note [ratio8 update bound]
            exp_avgs[i].copy_(ratio8.encode(m32[j], exp_avg_sqs[i], noise, bound=bound))
        elif exp_avgs[i].dtype != torch.float32:
            if state_sr and exp_avgs[i].dtype == torch.bfloat16:
                stochastic_round_to_bf16_(exp_avgs[i], m32[j], gen)
                stochastic_round_to_bf16_(exp_avg_sqs[i], v32[j], gen)
            else:
                exp_avgs[i].copy_(m32[j])
                exp_avg_sqs[i].copy_(v32[j])
    return written


def _native_available(p: Tensor) -> bool:
    """Whether CPU tensors can go to the native step (kernels/native_cpu.cpp): switched on and
    built (the first call builds it)."""
    if not USE_NATIVE_CPU_STEP or p.device.type != "cpu":
        return False
    from ..kernels import native_cpu as N
    return N.load() is not None


def _native_cpu_steps(params, grads, exp_avgs, exp_avg_sqs, masters, steps, *, lr,
                      beta: float, eps: float, weight_decay: float, grad_scale: Tensor | None,
                      keys: Sequence[int] | None, state_sr: bool, param_sr: bool,
                      clip: Tensor | None, rows: Tensor | None, rows_at: Sequence[int],
                      snr_threshold: float) -> list[bool]:
    """CPU tensors of one param group through one native call (Note [native many] in
    kernels/native_cpu.cpp), the step already counted and not skipped; which ones it stepped
    (the others, layouts it does not walk, are untouched). Telemetry rows, with ``rows``, go
    to ``rows[rows_at[k]]``."""
    from ..kernels import native_cpu as N
    from ..kernels import tied_adamw_cpu as C
    inv_scale = 1.0 if grad_scale is None else float(1.0 / grad_scale.float())
    clip_f = 1.0 if clip is None else float(clip)
    lr_f = float(lr)
    by_step: dict[float, Tensor] = {}  # the scalars of each step count present
    table = []
    for t in torch.stack(steps).tolist() if steps else []:  # one read of all counts
        if t not in by_step:
            c = C.bias_correction(beta, t)  # telemetry's u = q / c (Note [native telemetry])
            by_step[t] = torch.cat([C.scalars(lr_f, beta, eps, weight_decay, t, inv_scale,
                                              clip_f), torch.tensor([c], dtype=torch.float32)])
        table.append(by_step[t])
    s = torch.stack(table)
    k = [0] * len(params) if keys is None else keys
    keys_t = torch.tensor([[_i32(x & 0xFFFFFFFF), _i32(x >> 32)] for x in k], dtype=torch.int32)
    out = None if rows is None else torch.zeros(len(params), rows.shape[1])
    taken = N.run_many(params, grads, exp_avgs, exp_avg_sqs, masters, s, keys_t,
                       has_scale=grad_scale is not None, state_sr=state_sr, param_sr=param_sr,
                       rows=out, snr_threshold=snr_threshold)
    if taken is None:
        return [False] * len(params)
    taken = taken.tolist()
    if rows is not None:
        at = [r for r, t in zip(rows_at, taken) if t]
        rows[at] = out[torch.tensor(taken)].to(rows.device)
    return taken


def _i32(x: int) -> int:
    """An unsigned 32-bit word as the int32 with its bits."""
    return x - (1 << 32) if x >= 1 << 31 else x


def _compiled_cpu_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor | None,
                       step: Tensor, *, lr, beta: float, eps: float, weight_decay: float,
                       grad_scale: Tensor | None, found_inf: Tensor | None, key: int,
                       state_sr: bool, param_sr: bool, clip: Tensor | None = None) -> bool:
    """One CPU tensor through the compiled one-pass step (kernels/tied_adamw_cpu.py), where the
    native one cannot take it; False when it cannot either (a layout it does not walk, no
    build: torch ops then)."""
    if not USE_COMPILED_CPU_STEP or not (
            p.is_contiguous() and g.is_contiguous() and m.is_contiguous()
            and v.is_contiguous()):
        return False
    from ..kernels import tied_adamw_cpu as C
    # dynamo specialises sizes 0 and 1 even under dynamic=True: one more compile each, for
    # tensors where one pass over memory buys nothing
    if p.numel() <= 1 or not C.compiled_available():
        return False
    if found_inf is not None and float(found_inf) != 0:
        return True  # AMP: a step with non-finite grads changes nothing (the count is undone)
    inv_scale = 1.0 if grad_scale is None else float(1.0 / grad_scale.float())
    s = C.scalars(float(lr), beta, eps, weight_decay, float(step), inv_scale,
                  1.0 if clip is None else float(clip))
    keys = torch.tensor([_i32(key & 0xFFFFFFFF), _i32(key >> 32)], dtype=torch.int32)
    args = (p.view(-1), g.view(-1), m.view(-1), v.view(-1), None if w is None else w.view(-1),
            s, keys)
    flags = dict(has_scale=grad_scale is not None, state_sr=state_sr, param_sr=param_sr)
    return C.run(*args, **flags)


# TIEDADAM_CPU_NATIVE=0 / TIEDADAM_CPU_COMPILE=0 keep CPU tensors off the native / compiled
# one-pass step: for machines without a C++ compiler that should not try, and for the test
# suite, which runs each in its own tests (tests/test_native_cpu.py, tests/test_cpu_step.py)
# rather than building them in every test process.
USE_NATIVE_CPU_STEP = os.environ.get("TIEDADAM_CPU_NATIVE", "1") != "0"
USE_COMPILED_CPU_STEP = os.environ.get("TIEDADAM_CPU_COMPILE", "1") != "0"


class TorchBackend:
    """TiedAdamW for a bucket with torch ops: one fused call per param group (``triton_step``
    is one launch per bucket). Holds no caches."""
    name = "torch"

    def reset(self) -> None:
        pass

    def step(self, b, key, groups: Sequence[dict], grad_scale: Tensor | None,
             found_inf: Tensor | None, snr_threshold: float,
             clip: Tensor | None = None) -> None:
        """Bucket ``b`` (verified this step, verify.py). ``key`` names the plan (unused: no
        tables here). ``clip``: [2] (coefficient, non-finite-norm flag) on the bucket's
        device (Note [clipping] in kernels/tied_adamw.py)."""
        if _compat.fused_adamw_ is None:  # pragma: no cover - refused earlier by choose()
            raise RuntimeError("this torch has no fused AdamW op")
        _compat.foreach_add_(b.steps, 1.0)
        scale, inf = per_device(grad_scale, found_inf, b.device)
        coef = None
        if clip is not None:  # a non-finite norm skips the step as AMP's found_inf does
            coef, bad = clip[0], clip[1].to(torch.float32)  # (torch's ops read fp32 flags)
            inf = bad if inf is None else torch.maximum(inf, bad)
        for gi in sorted(set(b.groups)):
            idx = [i for i, g in enumerate(b.groups) if g == gi]
            group = groups[gi]
            # eps and weight decay may be 1-element CPU tensors (validated); torch's fused op
            # takes floats for them (lr may stay a tensor)
            eps, weight_decay = float(group["eps"]), float(group["weight_decay"])
            keys = None
            if b.state_sr or b.param_sr:
                counts = torch.stack([b.steps[i] for i in idx]).tolist()  # one read
                keys = [mix(b.keys[i], int(t)) for i, t in zip(idx, counts)]
            moments = rows = None
            if b.telemetry is not None:
                moments = {}
                rows = torch.zeros(len(idx), TELEMETRY_WIDTH, device=b.device)
            written = torch_tied_adamw(
                [b.params[i] for i in idx], [b.grads[i] for i in idx],
                [b.exp_avgs[i] for i in idx], [b.exp_avg_sqs[i] for i in idx],
                [b.masters[i] for i in idx], [b.steps[i] for i in idx],
                lr=group["lr"], beta=group["beta"], eps=eps, weight_decay=weight_decay,
                grad_scale=scale, found_inf=inf, keys=keys, state_sr=b.state_sr,
                param_sr=b.param_sr, clip=coef,
                clip_buffer=None if coef is None else (
                    lambda k, idx=idx: b.clip_buffer(idx[k])),
                moments=moments, rows=rows, snr_threshold=snr_threshold)
            if b.telemetry is not None:
                from .telemetry import torch_rows
                # The grads are unscaled now, except on a skipped (found_inf) step; the
                # update read them clipped (by coef), which the rows describe.
                one = torch.ones((), device=b.device)
                still = None if scale is None else torch.where(inf != 0, scale, one)
                if coef is not None:
                    still = torch.where(inf != 0, one if still is None else still, 1.0 / coef)
                # the moments the update read (a skipped step: the state, unchanged); the
                # native pass wrote its tensors' rows already
                rest = [k for k in range(len(idx)) if k not in written]
                if rest:
                    mv = [moments.get(k, (b.exp_avgs[idx[k]], b.exp_avg_sqs[idx[k]]))
                          for k in rest]
                    part = torch.zeros(len(rest), TELEMETRY_WIDTH, device=b.device)
                    torch_rows(part, [b.grads[idx[k]] for k in rest], [m for m, _ in mv],
                               [v for _, v in mv], [b.steps[idx[k]] for k in rest],
                               beta=group["beta"], eps=eps, snr_threshold=snr_threshold,
                               grad_scale=still)
                    rows[rest] = part
                if inf is not None:  # nothing was updated: only the grad fields are meaningful
                    rows[:, 1:3] *= (inf == 0)
                    rows[:, 4] *= (inf == 0)
                b.telemetry[idx] = rows
        if inf is not None:  # AMP: a skipped step does not count
            _compat.foreach_sub_(b.steps, [inf] * len(b.steps))
