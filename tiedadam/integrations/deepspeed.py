"""DeepSpeed: ``"optimizer": {"type": "TiedAdamW", ...}`` in a DeepSpeed config, after
``import tiedadam``. No optimizer math here.

Note [deepspeed registration]
-----------------------------
DeepSpeed (0.19.8) has no optimizer registry: a config ``"type"`` that is not one of its
built-ins is looked up as ``getattr(torch.optim, name)`` and called with the model parameters and
the config's ``"params"``. So TiedAdamW is published as ``torch.optim.TiedAdamW``. (The name must
not lower-case to a built-in such as ``adamw``: DeepSpeed lower-cases those.)

ZeRO then refuses optimizers whose exact type is not in
``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` unless the user adds
``zero_allow_untested_optimizer``. TiedAdamW is appended to that list as soon as DeepSpeed's
module is imported (right away if it already is), so ``import tiedadam`` never imports DeepSpeed
itself (seconds, and accelerator probing) for users who do not use it.

What TiedAdamW does that ZeRO needs (docs/design.md §7): it reads params from ``param_groups`` on
every ``step()`` (ZeRO-1/2 swap in one flat fp32 partition per group per call; ZeRO-3 fills
groups with sub-group partitions), keys its caches by the tensors themselves, not by group
index, keeps ``step`` per parameter, and steps CPU partitions (ZeRO-Offload) with torch's fused
CPU AdamW. A single flat partition goes to the Triton kernel as direct arguments.

Passing an instance (``deepspeed.initialize(optimizer=TiedAdamW(...))``) or a callable also
works; with ``offload_optimizer`` DeepSpeed then insists on its own CPU Adam unless the config
sets ``"zero_force_ds_cpu_optimizer": false``. The config-name path needs no flag.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Callable

import torch

from ..optim import TiedAdamW

_ZERO_UTILS = "deepspeed.runtime.zero.utils"


def allow_in_zero(zero_utils) -> None:
    """Add TiedAdamW to DeepSpeed's list of optimizers that ZeRO accepts."""
    supported = zero_utils.ZERO_SUPPORTED_OPTIMIZERS
    if TiedAdamW not in supported:
        supported.append(TiedAdamW)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after ``name`` is first imported, then removes itself."""

    def __init__(self, name: str, callback: Callable):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.callback(module)

        spec.loader.exec_module = exec_module  # the loader is this module's own instance
        return spec


def register() -> None:
    """Publish ``torch.optim.TiedAdamW`` and allow it under ZeRO (idempotent)."""
    torch.optim.TiedAdamW = TiedAdamW
    mod = sys.modules.get(_ZERO_UTILS)
    if mod is not None:
        allow_in_zero(mod)
    elif not any(isinstance(f, _AfterImport) and f.name == _ZERO_UTILS for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_ZERO_UTILS, allow_in_zero))
