"""What an optimizer has cached, for tests and diagnostics: read-only views of its step plans,
their buckets and guards, and its backends' tables. Not a stable API: the names below follow
the implementation (docs/design.md §2); a test that needs something of the internals asks here,
so that renaming an internal changes this file and not the tests.
"""

from __future__ import annotations


def plans(opt) -> list:
    """The cached step plans (``step_plan.StepPlan``), oldest first."""
    return list(opt._plans.cache.values())


def buckets(opt) -> list:
    """(backend name, ``bucket.Bucket``) of every cached plan, in plan order."""
    return [nb for plan in plans(opt) for nb in plan.buckets]


def stream_keys(opt) -> set:
    """The rounding stream keys the cached plans give their tensors (0: no rounding)."""
    return {k for _, b in buckets(opt) for k in b.keys}


def fast_guard_armed(opt) -> list:
    """For each cached plan, whether its guard's fast check is armed (Note [guard fast
    path])."""
    return [plan.guard.fast is not None for plan in plans(opt)]


def full_checks(opt) -> int:
    """How many times a cached plan's guard took the full comparison rather than the fast
    check (Note [guard fast path])."""
    return opt._plans.full_checks


def triton_backend(opt):
    """The optimizer's Triton backend (made if it was not yet)."""
    return opt._backends["triton"]


def table_builds(opt) -> int:
    """How many address tables the Triton backend has built (Note [table cache])."""
    return triton_backend(opt).tables.builds


def tables(opt) -> list:
    """The Triton backend's cached address tables (``multi_tensor.MultiTensorTable``)."""
    return list(triton_backend(opt).tables._tables.values())


def evict_tables(opt) -> None:
    """Empty the Triton backend's table cache, as its LRU does when it is full."""
    triton_backend(opt).tables.clear()


def graph_buffers(opt) -> list:
    """What launches captured in a CUDA graph keep alive (Note [graph buffers])."""
    return triton_backend(opt).graph_buffers
