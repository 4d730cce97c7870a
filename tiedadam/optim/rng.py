"""Which random stream each tensor's stochastic rounding draws from.

Note [rng streams]
------------------
Stochastic rounding adds random low bits before truncating to bf16 (unbiased: E[round(x)] = x).
Two tensors must never get the same noise at the same (element, step): correlated rounding
errors add up instead of cancelling. So each tensor has its own 63-bit stream key,

    key = mix(seed, group ordinal, position in the group, shard offset[, slot])

* ``seed``: the group's ``seed`` option (``torch.initial_seed()`` by default).
* group ordinal: the group's number in the order this optimizer first saw its groups. For a
  plain run that is the index in ``param_groups``. DeepSpeed ZeRO steps one group per
  ``step()`` call with ``param_groups`` swapped to a one-group list, where every group is at
  index 0: the ordinal still tells the flat partitions apart (they are first seen in the same
  order on every run, and after every checkpoint load, which renumbers).
* position: the parameter's index in its group.
* slot: how many other tensors were first seen at this (group ordinal, position) before this
  one, folded in only when it is not 0 (so a plain run's keys are the same as without it).
  ZeRO-3 with ``sub_group_size`` steps each fp32 sub-group partition alone, through the same
  group dict with ``params=[partition]``: every partition is at (ordinal, 0), and the slot
  tells them apart. DeepSpeed steps the sub-groups in a fixed order every step, the same after
  a checkpoint load (which renumbers slots as it renumbers ordinals), so a resumed run draws
  the noise of the uninterrupted one.
* shard offset: for a DTensor (FSDP2, tensor parallel), the flat offset of the local shard in
  the full tensor, so shards on different ranks draw different noise while replicas
  (``Replicate`` mesh dimensions, HSDP) draw the same and stay bit-identical. A plain tensor
  gets 0: the optimizer cannot tell a rank-local partition (ZeRO) from a replica (DDP), and
  giving replicas different noise would make them drift apart silently, so plain tensors on
  different ranks share a stream (each still unbiased; only ZeRO's partitions are affected).

The kernel draws Philox-4x32 under that key with counter (element group, step) (Note [rng] in
tiedadam/kernels/tied_adamw.py); the torch backend seeds a generator per tensor and step with
mix(key, step). Both are pure functions of what a checkpoint holds: a resumed run rounds as
the uninterrupted one, and no generator state is saved.
"""

from __future__ import annotations

import weakref

from torch import Tensor

from .._compat import shard_offset

_M64 = 0xFFFFFFFFFFFFFFFF


def mix(*xs: int) -> int:
    """splitmix64's finaliser folded over the inputs: a well-spread 63-bit value (non-negative
    as an int64, so it travels in an int64 table)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def stream_key(seed: int, ordinal: int, position: int, shard: int, slot: int = 0) -> int:
    """The tensor's stream key (Note [rng streams])."""
    if slot:
        return mix(seed, ordinal, position, shard, slot)
    return mix(seed, ordinal, position, shard)


class StreamKeys:
    """Group ordinals and slots in the order this optimizer first saw them (Note [rng streams]),
    and the stream key they give a tensor. ``reset()`` after a load: a resumed run numbers as
    a fresh one."""

    def __init__(self):
        self.ordinals: dict[int, tuple[int, dict]] = {}  # id(group) -> (ordinal, group)
        self.slots: dict[tuple, list] = {}  # (ordinal, position) -> weakrefs, first seen first

    def reset(self) -> None:
        self.ordinals.clear()
        self.slots.clear()

    def ordinal(self, group: dict, groups: list) -> int:
        """The group's number: its index in ``groups`` for a plain run, the call order for
        DeepSpeed's one-group-per-call steps."""
        seen = self.ordinals.get(id(group))
        if seen is None or seen[1] is not group:
            for g in (*groups, group):
                s = self.ordinals.get(id(g))
                if s is None or s[1] is not g:
                    self.ordinals[id(g)] = (self._copied_from(g), g)
            seen = self.ordinals[id(group)]
        return seen[0]

    def _copied_from(self, group: dict) -> int:
        """A new group's ordinal: that of the group it is a copy of (``param_groups[i] =
        {**g, ...}`` shares g's params list; an edit, not a new group), else the next one."""
        params = group.get("params")
        for ordinal, g in list(self.ordinals.values()):
            if params is not None and g.get("params") is params:
                return ordinal
        return len({o for o, _ in self.ordinals.values()})

    def slot(self, ordinal: int, position: int, tensor: Tensor) -> int:
        """How many other tensors were first seen at this (group ordinal, position) before
        ``tensor``: 0 in a plain run; ZeRO-3's sub-group partitions in stepping order."""
        refs = self.slots.setdefault((ordinal, position), [])
        for k, ref in enumerate(refs):
            if ref() is tensor:
                return k
        refs.append(weakref.ref(tensor))
        return len(refs) - 1

    def key(self, group: dict, groups: list, position: int, tensor: Tensor) -> int:
        ordinal = self.ordinal(group, groups)
        return stream_key(group["seed"], ordinal, position, shard_offset(tensor),
                          self.slot(ordinal, position, tensor))
