"""Generic multi-tensor launch engine: device-side tables that let one kernel launch update
any number of tensors. No optimizer math lives here (that is in ``tied_adamw.py``).

Note [tables]
-------------
Metadata travels in device memory, not in kernel arguments, so nothing caps the number of
tensors per launch (torch's foreach kernels cap at a few hundred, apex at 36).

* ``addr``  int64 [K, T], column-major by role: ``addr[k, i]`` is the address of tensor ``i``'s
  role ``k`` (param, grad, exp_avg, ...). Column-major so that one role (the grads, which move
  under ZeRO every step) is one contiguous row that can be re-uploaded alone.
* ``meta``  int64 [4, T]: numel, param-group index, aligned flag (Note [alignment]), and a
  per-tensor tag the kernel may use (TiedAdamW: the rounding stream key).
* ``chunk`` int64 [2, C]: (tensor index, first element) of each program's chunk. Offsets are
  int64 because one tensor may hold more than 2**31 elements.

Note [alignment]
----------------
The kernel promises the compiler 16-byte alignment (``tl.multiple_of``) on full chunks so that
loads and stores become 128-bit. The promise is only made for tensors whose every elementwise
role starts on a 16-byte boundary; chunk starts are multiples of CHUNK elements, which keeps
them aligned. A view such as ``t[1:]`` breaks alignment: its flag is 0 and the kernel takes the
masked path for it, in the same launch.

Note [table cache]
------------------
Building tables costs host work proportional to the number of tensors, so a table is built once
per (caller's key) and reused. Each step the caller passes the current tensors; the addresses of
the *watched* roles (params, grads: frameworks move these: ZeRO hands out a fresh flat grad every
step, FSDP re-points params) are compared with the cached ones. A changed volatile role (grads)
re-uploads just its row; any other change rebuilds the table. Roles the optimizer owns (its state)
are covered by the caller's key, which changes whenever the optimizer replaces its state.

Note [uploads]
--------------
``torch.tensor(list, device="cuda")`` is a blocking copy that waits for the queued backward pass.
Tables are built on the host in pinned memory and copied with ``non_blocking=True``; the pinned
block belongs to torch's caching host allocator, which does not reuse it until the copy is done.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from functools import reduce
from itertools import compress, repeat
from operator import or_
from typing import Hashable, Sequence

import torch
from torch import Tensor

ALIGN_BYTES = 16


def upload(host: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> device tensor without a host-device synchronisation (Note [uploads])."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def build_chunks(numels: Tensor, chunk: int) -> Tensor:
    """int64 [2, C]: (tensor index, start) for every CHUNK-sized piece of every tensor.

    Vectorised: no Python loop over tensors or chunks. An empty tensor gets one (empty) chunk:
    its program still has per-tensor work to do (the step count).
    """
    counts = ((numels + (chunk - 1)) // chunk).clamp(min=1)
    total = int(counts.sum())
    tensor_idx = torch.repeat_interleave(torch.arange(numels.numel(), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts  # exclusive prefix sum
    starts = (torch.arange(total, dtype=torch.int64) - first_chunk[tensor_idx]) * chunk
    return torch.stack([tensor_idx, starts])


class MultiTensorTable:
    """Device tables for one launch over ``T`` tensors (Note [tables]).

    ``roles`` is a list of K lists of T tensors. The first ``n_elementwise`` roles have the
    numel of role 0 and are updated element by element; any further roles are per-tensor
    scalars (e.g. the step count), whose alignment does not matter.
    """

    def __init__(self, roles: Sequence[Sequence[Tensor]], group_index: Sequence[int],
                 tags: Sequence[int], n_elementwise: int, chunk: int, device: torch.device):
        if chunk % ALIGN_BYTES:
            raise ValueError(f"chunk={chunk} must be a multiple of {ALIGN_BYTES} elements")
        self.device = device
        self.n_tensors = len(roles[0])
        self.ptrs = [[t.data_ptr() for t in role] for role in roles]
        numels = torch.tensor([t.numel() for t in roles[0]], dtype=torch.int64)
        aligned = [all(self.ptrs[k][i] % ALIGN_BYTES == 0 for k in range(n_elementwise))
                   for i in range(self.n_tensors)]
        meta = torch.stack([numels, torch.tensor(group_index, dtype=torch.int64),
                            torch.tensor(aligned, dtype=torch.int64),
                            torch.tensor(tags, dtype=torch.int64)])
        self.numels = numels
        self.aligned = aligned
        self.addr = upload(torch.tensor(self.ptrs, dtype=torch.int64).reshape(len(roles), -1),
                           device)
        self.meta = upload(meta, device)
        chunks = build_chunks(numels, chunk)
        self.n_chunks = chunks.shape[1]
        self.chunk = upload(chunks, device)

    def refresh_role(self, k: int, tensors: Sequence[Tensor], ptrs: list[int]) -> None:
        """Re-point role ``k`` (e.g. fresh grads) without rebuilding anything else."""
        self.ptrs[k] = ptrs
        # the list's int64s as a tensor over an array's buffer: a C copy, a few times cheaper
        # than torch.tensor(list) (perf/bench_host.py: 500 fresh grads every step)
        host = (torch.frombuffer(array("q", ptrs), dtype=torch.int64) if ptrs
                else torch.empty(0, dtype=torch.int64))
        if self.device.type == "cpu":
            self.addr[k].copy_(host)
        else:
            self.addr[k].copy_(host.pin_memory(), non_blocking=True)


class TableCache:
    """A small LRU of MultiTensorTables keyed by the caller (Note [table cache]).

    Several live entries are normal: DeepSpeed calls ``step()`` once per param group with the
    groups swapped in and out, and ZeRO-3 once per sub-group partition.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._tables: OrderedDict[Hashable, MultiTensorTable] = OrderedDict()
        self.builds = 0  # number of full table builds, for tests and perf reports

    def clear(self) -> None:
        self._tables.clear()

    def get(self, key: Hashable, roles: Sequence[Sequence[Tensor]], group_index: Sequence[int],
            tags: Sequence[int], n_elementwise: int, chunk: int, device: torch.device,
            watched: Sequence[int], volatile: Sequence[int]) -> MultiTensorTable:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            for k in watched:
                ptrs = list(map(Tensor.data_ptr, roles[k]))
                if ptrs != table.ptrs[k]:
                    if k in volatile and self._same_alignment(table, ptrs):
                        table.refresh_role(k, roles[k], ptrs)
                    else:
                        table = None
                        break
        if table is None:
            table = MultiTensorTable(roles, group_index, tags, n_elementwise, chunk, device)
            self.builds += 1
            self._tables[key] = table
            if len(self._tables) > self.capacity:
                self._tables.popitem(last=False)
        return table

    @staticmethod
    def _same_alignment(table: MultiTensorTable, ptrs: list[int]) -> bool:
        # A re-pointed role may only keep the table if no tensor's aligned flag would change.
        # All aligned (the usual case, allocators hand out aligned blocks): their OR says so.
        if not ptrs or not reduce(or_, ptrs) % ALIGN_BYTES:
            return True
        return not any(compress(map(int.__mod__, ptrs, repeat(ALIGN_BYTES)), table.aligned))
