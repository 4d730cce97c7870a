"""Sharded tensors as the kernels see them: a DTensor (FSDP2, TP) is updated through its local
shard; everything else is its own local tensor."""

from __future__ import annotations

from torch import Tensor


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself.

    ``_local_tensor`` is DTensor's own field: reading it costs an attribute lookup, where
    ``to_local()`` goes through autograd (microseconds per call, every step, every param)."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        return local
    return t.to_local() if hasattr(t, "to_local") else t
