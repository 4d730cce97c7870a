"""The per-step check that lets a cached plan be reused (Note [what the kernel may trust], 4, in
plan.py), written so that the loop over the parameters runs in C.

Note [guard]
------------
A plan made at one step holds the tensors it verified then. Before it is reused, every one of
these must still hold, for every parameter of the step:

* ``optimizer.state[p]`` is the dict the plan saw, with as many keys, and each state role
  (step, exp_avg, exp_avg_sq, master_param) is the tensor object the plan holds;
* the param (its local shard) and every state role have the address, shape, strides, dtype and
  device they had: ``set_``, ``resize_``, ``.data =`` or an in-place view op (``t_``) keep a
  tensor's identity but change these;
* the grad has the param's shape, dtype and device, and the walk strides (a grad in another
  layout is copied into them for the step, as when the plan was built).

Any difference sends the step down the full check (plan.py), which explains what is wrong or
builds a new plan. Ids are compared only for objects the plan holds, so no id can have been
reused by another object meanwhile.

Each check is ``list(map(getter, tensors)) == expected``: ``map`` calls the C getter for every
parameter and ``==`` compares the lists, so there is no Python bytecode per parameter; the cost
is the attribute reads themselves (about 40-100 ns each here, see perf/bench_host.py), a few
times less than the per-parameter Python loop this replaced.
"""

from __future__ import annotations

from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter

import torch
from torch import Tensor

from .plan import MASTER_KEY, layout_grad
from .shards import local_tensor

_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_LAYOUT = attrgetter("layout")
_PTR = Tensor.data_ptr
_STRIDE = Tensor.stride
_DEVICE = Tensor.get_device  # an int (-1 for CPU): the cheap form of .device, which builds an object
_ROLES = itemgetter("step", "exp_avg", "exp_avg_sq")
_MASTER = itemgetter(MASTER_KEY)


def layout(ts: list) -> tuple:
    """(addresses, shapes, strides, dtypes, devices) of ``ts``: what a plan trusts of a role."""
    return (list(map(_PTR, ts)), list(map(_SHAPE, ts)), list(map(_STRIDE, ts)),
            list(map(_DTYPE, ts)), list(map(_DEVICE, ts)))


def _same_layout(ts: list, expected: tuple) -> bool:
    ptrs, shapes, strides, dtypes, devices = expected
    return (list(map(_PTR, ts)) == ptrs and list(map(_SHAPE, ts)) == shapes
            and list(map(_STRIDE, ts)) == strides and list(map(_DTYPE, ts)) == dtypes
            and list(map(_DEVICE, ts)) == devices)


class Guard:
    """What a plan verified when it was built, and the check that it still holds (Note
    [guard]). ``entries`` are the plan's verified entries, in step order."""

    def __init__(self, entries: list, state, sharded: bool):
        self.sharded = sharded
        sources = [e.source for e in entries]
        sts = list(map(state.get, sources))
        self.st_ids = list(map(id, sts))
        self.st_lens = list(map(len, sts))
        self.masters = [j for j, e in enumerate(entries) if e.master is not None]
        held = self._held(sts)
        self.held_ids = list(map(id, held))
        locals_ = list(map(local_tensor, held)) if sharded else held
        self.local_ids = list(map(id, locals_))
        params = list(map(local_tensor, sources)) if sharded else sources
        # One list for every tensor the kernel touches besides the grads: params, then states.
        self.layout = layout(params + locals_)
        n = len(params)
        _, shapes, _, dtypes, devices = self.layout
        self.shapes, self.dtypes, self.devices = shapes[:n], dtypes[:n], devices[:n]  # grads'
        self.walk = [e.exp_avg.stride() for e in entries]  # every role's walk strides
        self.copied = [j for j, e in enumerate(entries) if e.writeback is not None]

    def _held(self, sts: list) -> list:
        """The state tensors of ``sts``, flattened: (step, exp_avg, exp_avg_sq) per parameter,
        then the master weights of those that have them. KeyError if one is missing."""
        held = list(chain.from_iterable(map(_ROLES, sts)))
        if self.masters:
            held += map(_MASTER, [sts[j] for j in self.masters])
        return held

    def reuse(self, state, sources: list, grads: list) -> tuple | None:
        """This step's grads (in the walk layout) and {j: (working copy or None, the user's
        grad if it was copied)}, if everything the plan trusts still holds; else None."""
        sts = list(map(state.get, sources))
        if list(map(id, sts)) != self.st_ids or list(map(len, sts)) != self.st_lens:
            return None
        try:
            held = self._held(sts)
        except KeyError:
            return None
        if list(map(id, held)) != self.held_ids:
            return None
        sharded = self.sharded
        if sharded:
            held = list(map(local_tensor, held))
            if list(map(id, held)) != self.local_ids:
                return None
        locals_ = list(map(local_tensor, sources)) if sharded else sources
        if not _same_layout(locals_ + held, self.layout):
            return None
        if sharded:
            grads = list(map(local_tensor, grads))
        elif not all(map(is_, map(type, grads), repeat(Tensor))):
            return None  # a subclass (a DTensor grad of a plain param): the full check unwraps
        if (list(map(_SHAPE, grads)) != self.shapes or list(map(_DTYPE, grads)) != self.dtypes
                or list(map(_DEVICE, grads)) != self.devices
                or not all(map(is_, map(_LAYOUT, grads), repeat(torch.strided)))):
            return None  # the full check names the parameter and what is wrong (sparse grads)
        strides = list(map(_STRIDE, grads))
        special = {}
        if strides != self.walk:  # a transposed or expanded grad: copied into the walk layout
            grads = list(grads)
            for j, (s, w) in enumerate(zip(strides, self.walk)):
                if s != w and locals_[j].numel() > 1:
                    grads[j], out = layout_grad(grads[j], locals_[j], w)
                    special[j] = (None, out)
        for j in self.copied:  # a non-dense param: stepped through a fresh working copy
            local = locals_[j]
            work = torch.empty_strided(local.shape, self.walk[j], dtype=local.dtype,
                                       device=local.device)
            work.copy_(local)
            special[j] = (work, special.get(j, (None, None))[1])
        return grads, special
