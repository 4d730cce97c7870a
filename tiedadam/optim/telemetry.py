"""Update telemetry (opt-in, ``TiedAdamW(..., telemetry=True)``): what the optimizer did to each
parameter at the last step, read out without a host sync until asked.

Per parameter, in an fp32 row of ``FIELDS`` (Note [telemetry] in kernels/tied_adamw.py): sum of g^2,
sum of u^2 and max |u| for the update before lr u = m_hat / (sqrt(v_hat) + eps), the count of
non-finite grads, and the count of high signal-to-noise elements, |m_hat| / sqrt(v_hat) >
``snr_threshold`` (tied betas bound that ratio, and so |u|, by 1).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from ..kernels import ratio8
from ..kernels.layout import TELEMETRY_FIELDS as FIELDS
from ..kernels.multi_tensor import upload
from .bucket import MAX_CACHED

CLIP_ENTRY = "(clip)"  # telemetry()'s entry for max_grad_norm's global norm (not a param name)


@torch.no_grad()
def torch_rows(out: Tensor, grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *, beta: float,
               eps: float, snr_threshold: float, grad_scale: Tensor | None = None) -> None:
    """The same five quantities as the kernel, with torch ops, after the step, from the
    moments its update read (fp32, before the state's rounding: ``torch_tied_adamw``'s
    ``moments``), as the kernel reduces them from registers (torch's fused op exposes no hook
    to compute them in its pass)."""
    for i, (g, m, v, t) in enumerate(zip(grads, exp_avgs, exp_avg_sqs, steps)):
        g = g.float() if grad_scale is None else g.float() / grad_scale.to(g.device)
        m = ratio8.decode(m, v) if m.dtype == torch.int8 else m.float()
        v = v.float()
        c = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=t.device),
                            t.to(torch.float64)).to(torch.float32)
        sqrt_v = v.sqrt()
        u = (m / c) / (sqrt_v / c.sqrt() + eps)
        ratio = m.abs() / torch.where(sqrt_v > 0, sqrt_v * c.sqrt(), torch.ones_like(sqrt_v))
        out[i, 0] = (g * g).sum()
        out[i, 1] = (u * u).sum()
        out[i, 2] = u.abs().amax() if u.numel() else 0.0
        out[i, 3] = (~torch.isfinite(g)).sum()
        out[i, 4] = (ratio > snr_threshold).sum()


def replication(p: Tensor) -> int:
    """How many ranks hold the same values of ``p``: product of a DTensor's Replicate mesh dims."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return 1
    return math.prod(p.device_mesh.size(i) for i, pl in enumerate(placements) if pl.is_replicate())


def readout(names: Sequence[str], rows: Tensor, numels: Tensor, reduce: bool = False,
            replicas: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """``{name: {field: 0-dim tensor}}`` plus derived grad_norm, update_rms and
    high_snr_fraction. With ``reduce``, per-rank partial values are combined over the default
    process group with one all-gather (sums add up, divided by each param's replication; the
    max is a max), valid when each rank holds a disjoint shard (FSDP, ZeRO) or a replica."""
    n_col = len(FIELDS)  # the numel column, after the kernel's fields
    table = torch.cat([rows, numels[:, None].to(rows)], dim=1)  # [P, n_col + 1]
    if reduce:
        import torch.distributed as dist
        gathered = [torch.empty_like(table) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, table)
        stacked = torch.stack(gathered)  # [R, P, n_col + 1]
        summed = stacked.sum(0) / (replicas[:, None].to(table) if replicas is not None else 1.0)
        table = summed.clone()
        table[:, 2] = stacked[:, :, 2].amax(0)
    out = {}
    for i, name in enumerate(names):
        r = table[i]
        n = r[n_col].clamp_min(1.0)
        out[name] = {**{f: r[j] for j, f in enumerate(FIELDS)}, "numel": r[n_col],
                     "grad_norm": r[0].sqrt(), "update_rms": (r[1] / n).sqrt(),
                     "high_snr_fraction": r[4] / n}
    return out


def to_floats(tel: dict[str, dict[str, Tensor]], prefix: str = "telemetry") -> dict[str, float]:
    """Flatten ``TiedAdamW.telemetry()`` into ``{"telemetry/<name>/<field>": float}`` plus
    model-wide ``telemetry/all/...`` values (and ``telemetry/clip/...`` with max_grad_norm:
    the global norm before clipping, the coefficient, the skip flag), for TensorBoard / W&B style loggers. This is where
    the host waits for the device (one copy of everything). Under ZeRO, numel (and so RMS and
    fractions) includes the padding of DeepSpeed's flat partitions, where u = 0."""
    clip = tel.get(CLIP_ENTRY)
    extra = {} if clip is None else {f"{prefix}/clip/{k}": float(v) for k, v in clip.items()}
    tel = {n: row for n, row in tel.items() if n != CLIP_ENTRY}
    if not tel:
        return extra
    keys = ["grad_norm", "update_rms", "update_abs_max", "high_snr_fraction", "nonfinite_grads"]
    names = list(tel)
    stacked = torch.stack([torch.stack([tel[n][k].float() for k in keys + ["grad_sq_sum",
                          "update_sq_sum", "high_snr_count", "numel"]]) for n in names]).cpu()
    out = {f"{prefix}/{n}/{k}": float(stacked[i, j]) for i, n in enumerate(names)
           for j, k in enumerate(keys)}
    total = stacked[:, 8].sum().clamp_min(1.0)
    out.update({f"{prefix}/all/grad_norm": float(stacked[:, 5].sum().sqrt()),
                f"{prefix}/all/update_rms": float((stacked[:, 6].sum() / total).sqrt()),
                f"{prefix}/all/update_abs_max": float(stacked[:, 2].max()),
                f"{prefix}/all/high_snr_fraction": float(stacked[:, 7].sum() / total),
                f"{prefix}/all/nonfinite_grads": float(stacked[:, 4].sum()),
                f"{prefix}/all/update_sq_sum": float(stacked[:, 6].sum()),
                f"{prefix}/all/high_snr_count": float(stacked[:, 7].sum()),
                f"{prefix}/all/numel": float(stacked[:, 8].sum())})
    out.update(extra)
    return out


class TelemetryLog:
    """The buckets of the recent steps, newest last: DeepSpeed steps one group (or ZeRO-3
    sub-group) per call, so each parameter's latest row may be in an earlier call's buckets."""

    def __init__(self):
        self.plans: OrderedDict = OrderedDict()

    def clear(self) -> None:
        self.plans.clear()

    def record(self, key, buckets: list) -> None:
        self.plans[key] = buckets
        self.plans.move_to_end(key)
        if len(self.plans) > MAX_CACHED:
            self.plans.popitem(last=False)

    def read(self, groups: list, reduce: bool) -> dict[str, dict[str, Tensor]]:
        """``TiedAdamW.telemetry()``: each parameter's latest row, in parameter order."""
        latest = {}  # id(param) -> (name, row tensor, numel, replication); newest plan wins
        for buckets in self.plans.values():
            for _, b in buckets:
                for i, param in enumerate(b.parameters):
                    latest[id(param)] = (b.names[i], b.telemetry[i], b.params[i].numel(),
                                         replication(param))
        if not latest:
            return {}
        order = [id(p) for g in groups for p in g["params"] if id(p) in latest]
        order += [k for k in latest if k not in set(order)]  # swapped-out (DeepSpeed) groups
        names, seen = [], {}
        for k in order:  # DeepSpeed swaps one-group lists in: fallback names can repeat
            n = latest[k][0]
            seen[n] = seen.get(n, 0) + 1
            names.append(n if seen[n] == 1 else f"{n}#{seen[n] - 1}")
        numels = [latest[k][2] for k in order]
        reps = [latest[k][3] for k in order]
        rows = [latest[k][1] for k in order]
        device = rows[0].device
        return readout(names, torch.stack([r.to(device) for r in rows]),
                       upload(torch.tensor(numels, dtype=torch.float32), device),
                       reduce=reduce, replicas=upload(torch.tensor(reps, dtype=torch.float32),
                                                      device))
