"""TiedAdamW through the Triton multi-tensor kernel: one launch per (device, param dtype,
state dtype, master) bucket per step, across all param groups.

Per step the host does: refresh the per-group hyperparameter table (G rows), look the tensor
table up in the cache (address comparisons only, Note [table cache]) and launch; the kernel
bumps the step counts. No host-device sync.

Note [graph buffers]
--------------------
A CUDA graph captured around ``step()`` replays the launch through the addresses it was
captured with: the step-count tickets, the address tables, the hyperparameter table and the
telemetry rows. A later step that rebuilds the plan or its table would free them under the
graph. So a launch made while its stream is capturing keeps those buffers in
``graph_buffers`` for the optimizer's life (not pickled; a load clears the caches, not these).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor

from ..kernels import ratio8
from ..kernels import tied_adamw as K
from ..kernels.layout import HYPER_FIELDS, N_ELEMENTWISE, N_HYPER, ROLE_GRAD, ROLE_PARAM
from ..kernels.multi_tensor import TableCache, upload
from .amp import per_device
from .bucket import MAX_CACHED, Bucket


def _host_rows(groups: Sequence[dict]) -> tuple | None:
    """(lr, beta, eps, weight_decay) of every group as host floats, or None where a group is
    capturable or its lr is a device tensor (one loop: the flat path reads this every step)."""
    rows = []
    for g in groups:
        lr = g["lr"]
        if type(lr) is not float and isinstance(lr, Tensor) and lr.device.type != "cpu":
            return None
        if g.get("capturable"):
            return None
        rows.append((float(lr), float(g["beta"]), float(g["eps"]), float(g["weight_decay"])))
    return tuple(rows)


def hyper_table(groups: Sequence[dict], device: torch.device, persistent: dict) -> Tensor:
    """fp64 [G, 4] (lr, beta, eps, weight_decay) on ``device``, without a host-device sync.

    Host floats: a device table kept per (device, groups) and rewritten, through pinned memory
    in one small copy, only when a value changed (a scheduler changing lr every step costs one
    such copy per step; constant hyperparameters cost a comparison of G tuples). The copy is
    ordered on the stream after the kernels that read the previous values.
    Capturable groups or an lr that is a device tensor: a persistent device table whose lr
    column is refreshed by device-side copies (captured by a CUDA graph, so a changing lr tensor
    is seen on every replay); the other columns are rewritten only when their host value changes.
    """
    rows = _host_rows(groups)
    if rows is not None:
        key = (device, tuple(map(id, groups)))
        entry = persistent.get(key)
        if entry is None or entry[1] != rows:
            host = torch.tensor(rows, dtype=torch.float64)
            if entry is None:
                table = upload(host, device)
            else:
                table = entry[0]
                table.copy_(host.pin_memory() if device.type == "cuda" else host,
                            non_blocking=True)
            if len(persistent) > MAX_CACHED:  # DeepSpeed: one per swapped-in group (list)
                persistent.clear()
            # Rows are compared by value, so a group id reused after a group is gone can only
            # find a table that is then rewritten (or already holds the same values).
            persistent[key] = entry = (table, rows)
        return entry[0]
    entry = persistent.get(device)
    if entry is None or entry[0].shape[0] != len(groups):
        entry = persistent[device] = (torch.zeros(len(groups), N_HYPER, dtype=torch.float64,
                                                  device=device), [None] * len(groups))
    table, seen = entry
    for i, g in enumerate(groups):
        lr = g["lr"]
        if isinstance(lr, Tensor):
            table[i, 0].copy_(lr.reshape(()), non_blocking=True)
        else:
            table[i, 0].fill_(float(lr))
        rest = tuple(float(g[k]) for k in HYPER_FIELDS[1:])
        if seen[i] != rest:
            for j, x in enumerate(rest, start=1):
                table[i, j].fill_(x)
            seen[i] = rest
    return table


def capturing(device: torch.device) -> bool:
    """Whether work queued on ``device`` now is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class TritonBackend:
    """One kernel launch per bucket. Owns what launches reuse: the address tables (Note [table
    cache]), the hyperparameter tables, and the buffers a captured CUDA graph uses (Note [graph
    buffers]: kept for the backend's life, which is the optimizer's; ``reset`` after a load
    clears the caches, not those)."""
    name = "triton"

    def __init__(self):
        self.tables = TableCache(MAX_CACHED)
        self.hyper: dict = {}
        self.graph_buffers: list = []

    def reset(self) -> None:
        self.tables.clear()
        self.hyper = {}

    def step(self, b: Bucket, key: Hashable, groups: Sequence[dict],
             grad_scale: Tensor | None, found_inf: Tensor | None,
             snr_threshold: float, clip: Tensor | None = None) -> None:
        """One launch for bucket ``b``, whose tensors were verified this step (verify.py). The
        kernel bumps the step counts (Note [step counts] in the kernel): no foreach op here.
        ``key`` names the bucket's plan: its address table is cached under it. ``clip``:
        [2] on the bucket's device (Note [clipping] in the kernel)."""
        hyper, table = self._launch(b, key, groups, grad_scale, found_inf, snr_threshold, clip)
        if capturing(b.device):
            self.graph_buffers.append((b.tickets, b.telemetry, hyper, table, clip))

    def _launch(self, b: Bucket, key: Hashable, groups: Sequence[dict], grad_scale,
                found_inf, snr_threshold: float, clip: Tensor | None):
        """The launch; returns the hyperparameter table and the address table (None: flat)
        it used."""
        if b.state_dtype == torch.int8 and ratio8.CODE != "linear":
            raise RuntimeError(f"the Triton kernel encodes ratio8 moments with the linear code; "
                               f"ratio8.CODE={ratio8.CODE!r} is for the torch backend's study "
                               f"runs (perf/precision_study.py): use backend='torch'")
        hyper = hyper_table(groups, b.device, self.hyper)
        masters = b.masters if b.has_master else b.params
        scale, inf = per_device(grad_scale, found_inf, b.device)
        if b.telemetry is not None:
            b.telemetry.zero_()
        if len(b.params) == 1:
            # Note [flat]: one tensor (a ZeRO partition, an FSDP1 flat shard) goes to the kernel
            # as direct arguments: no tables to look up or re-point when ZeRO swaps the grad;
            # and positionally (``launch_flat``), this path's whole host budget is ~30 us.
            consts = K.launch_config(b.param_dtype, b.state_dtype, b.has_master,
                                     scale is not None, b.state_sr, b.param_sr,
                                     b.telemetry is not None, clip is not None)
            K.launch_flat(consts, hyper, hyper if scale is None else scale,
                          hyper if scale is None else inf, hyper if clip is None else clip,
                          hyper if b.telemetry is None else b.telemetry, snr_threshold,
                          b.tickets, b.params[0], b.grads[0], b.exp_avgs[0], b.exp_avg_sqs[0],
                          masters[0], b.steps[0], b.groups[0], b.keys[0])
            return hyper, None
        roles = (b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, masters, b.steps)  # layout.ROLES
        # The key names a plan whose params' and states' addresses were verified this step
        # (Note [guard] in guard.py); grads move freely and are re-pointed. A bucket with
        # working copies (non-dense params) has fresh param memory every step: its param
        # addresses are compared too (a change rebuilds the table).
        watched = (ROLE_PARAM, ROLE_GRAD) if b.has_copies else (ROLE_GRAD,)
        table = self.tables.get(key, roles, b.groups, b.keys, N_ELEMENTWISE, K.CHUNK, b.device,
                                watched=watched, volatile=(ROLE_GRAD,))
        K.launch_tied_adamw(table, hyper, param_dtype=b.param_dtype,
                            state_dtype=b.state_dtype, has_master=b.has_master,
                            grad_scale=scale, found_inf=inf, state_sr=b.state_sr,
                            param_sr=b.param_sr, telemetry=b.telemetry,
                            snr_threshold=snr_threshold, tickets=b.tickets, clip=clip)
        return hyper, table
