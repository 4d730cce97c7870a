"""A step's inputs beside its plan: fresh every step, so never part of a cached plan."""

from __future__ import annotations

from torch import Tensor

from .verify import writes_back_in_place


class StepInputs:
    """One step's inputs beside its plan."""
    __slots__ = ("grads", "copies", "user_grads")

    def __init__(self, grads: list, copies: dict | None = None,
                 user_grads: dict | None = None):
        self.grads = grads  # per entry, in its walk layout (the user's grad or a copy of it)
        self.copies = copies or {}  # entry -> working copy of a non-dense param
        self.user_grads = user_grads or {}  # entry -> the user's grad that grads[j] copies

    def finish(self, entries: list, grad_scale: Tensor | None) -> None:
        """After the launches: working copies written back into their params; with AMP, the
        unscaled grad (Note [amp] in the kernel) where the user's grad can hold it, else in
        place of it (an expanded grad, one with the negative bit, a subclass)."""
        for j, work in self.copies.items():
            entries[j].write_back_to.copy_(work)
        if grad_scale is None:
            return
        for j, user in self.user_grads.items():
            if writes_back_in_place(user):
                user.copy_(self.grads[j])
            elif entries[j].param.grad is user:
                entries[j].param.grad = self.grads[j]
