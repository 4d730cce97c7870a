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

Note [deepspeed clipping]
-------------------------
DeepSpeed clips gradients itself, with the config's ``"gradient_clipping"``, over the whole
model's grads (across ZeRO partitions) before it calls the optimizer; the optimizer only ever
sees partitions. TiedAdamW's own ``max_grad_norm`` inside an engine would clip a second time,
and by the norm of one rank's partition. So it is refused: DeepSpeed itself refuses ``"max_grad_norm"`` among a config
entry's ``"params"`` (pointing to ``"gradient_clipping"``); for an instance or a callable,
``DeepSpeedEngine._check_for_duplicates``, which every way of passing an optimizer goes
through before ZeRO wraps it, is wrapped on import to raise with the fix (DeepSpeed 0.19.8;
where the method is missing nothing is wrapped). The wrapper also marks the optimizer as the
engine's, and setting ``max_grad_norm`` on it afterwards raises the same error.

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
from ..optim.clipping import deepspeed_refusal

_ZERO_UTILS = "deepspeed.runtime.zero.utils"
_ENGINE = "deepspeed.runtime.engine"


def allow_in_zero(zero_utils) -> None:
    """Add TiedAdamW to DeepSpeed's list of optimizers that ZeRO accepts."""
    supported = zero_utils.ZERO_SUPPORTED_OPTIMIZERS
    if TiedAdamW not in supported:
        supported.append(TiedAdamW)


def refuse_clipping_in_engine(engine_module) -> None:
    """Make DeepSpeed refuse a TiedAdamW that clips (Note [deepspeed clipping])."""
    cls = engine_module.DeepSpeedEngine
    check = getattr(cls, "_check_for_duplicates", None)
    if check is None or getattr(check, "_tiedadam", False):
        return

    def _check_for_duplicates(self, basic_optimizer, *args, **kwargs):
        clip = getattr(basic_optimizer, "max_grad_norm", None)
        if isinstance(basic_optimizer, TiedAdamW) and clip is not None:
            raise ValueError(deepspeed_refusal(clip))
        if isinstance(basic_optimizer, TiedAdamW):
            basic_optimizer._in_deepspeed_engine = True  # a later max_grad_norm is refused too
        return check(self, basic_optimizer, *args, **kwargs)

    _check_for_duplicates._tiedadam = True
    cls._check_for_duplicates = _check_for_duplicates


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
    """Publish ``torch.optim.TiedAdamW``, allow it under ZeRO and refuse its max_grad_norm in
    an engine (idempotent)."""
    torch.optim.TiedAdamW = TiedAdamW
    for name, hook in ((_ZERO_UTILS, allow_in_zero), (_ENGINE, refuse_clipping_in_engine)):
        mod = sys.modules.get(name)
        if mod is not None:
            hook(mod)
        elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(name, hook))
