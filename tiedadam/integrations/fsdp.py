"""FSDP2 and FSDP1 with TiedAdamW: checkpoint helpers; no optimizer math.

What TiedAdamW already does for sharded params (tiedadam/optim): it updates the *local shard* of
every DTensor param (FSDP2 ``fully_shard``, tensor parallel) in the same single launch as
everything else (no per-mesh grouping, so params on different meshes step together); its
``exp_avg``/``exp_avg_sq``/``master_param`` are created with ``zeros_like(param)`` and so are
DTensors with the param's mesh and placements (DCP saves local state of a DTensor param as if
replicated otherwise: wrong or failing loads); empty local shards and FSDP1's size-0 slices
without grads are skipped; ``step()`` accepts the zero-grad, ``lr=0`` step that
``get_optimizer_state_dict`` takes on a fresh optimizer.

Note [fsdp checkpoints]
-----------------------
Use ``torch.distributed.checkpoint`` with ``get_state_dict`` / ``set_state_dict`` (what ``save``
and ``load`` below do). Two torch pitfalls, checked on torch 2.13 (docs/design.md §8):

* ``FSDP.optim_state_dict`` + ``FSDP.optim_state_dict_to_load`` with ``use_orig_params=True``
  swaps exp_avg and exp_avg_sq (also with torch's AdamW): not used here.
* Loading FSDP1 *sharded* optimizer state with DCP fails when a rank holds no elements of some
  parameter unless the planner keeps sharded tensors unflattened:
  ``DefaultLoadPlanner(flatten_sharded_tensors=False)``, which ``load`` passes for FSDP1 models.

A checkpoint saved on N ranks loads on M ranks (DCP reshards), also into an unsharded model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)


def is_fsdp1(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                full: bool = False) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` sharded (default) or full (gathered, on every rank, so
    that ``set_state_dict(..., options=StateDictOptions(full_state_dict=True))`` loads it on any
    rank without a broadcast)."""
    opts = StateDictOptions(full_state_dict=full)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return {"model": msd, "optim": osd}


def save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save model and optimizer state, sharded, with DCP (Note [fsdp checkpoints])."""
    dcp.save(state_dicts(model, optimizer), checkpoint_id=path)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint written by ``save`` on any number of ranks (Note [fsdp checkpoints]).
    Optimizer state is loaded in the dtypes it was saved in (``saved_dtypes``): a ratio8
    checkpoint into an fp32-state optimizer, or the reverse, converts as ``load_state_dict``
    does, instead of DCP casting int8 codes to float (or moments to int8)."""
    state = state_dicts(model, optimizer)
    saved_dtypes(path, state)
    planner = DefaultLoadPlanner(flatten_sharded_tensors=False) if is_fsdp1(model) else None
    dcp.load(state, checkpoint_id=path, planner=planner)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def saved_dtypes(path: str, state: dict) -> None:
    """Replace each optimizer state tensor of ``state`` whose dtype differs from the one saved
    at ``path`` by an empty tensor of the saved dtype, laid out (and sharded) the same: DCP
    loads into the tensors it is given, cast to their dtype. Keys as DCP flattens them
    (``optim.state.<fqn>.<name>``)."""
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for fqn, st in state["optim"].get("state", {}).items():
        for name, t in list(st.items()):
            saved = meta.get(f"optim.state.{fqn}.{name}")
            dtype = getattr(getattr(saved, "properties", None), "dtype", None)
            if isinstance(t, torch.Tensor) and dtype is not None and dtype != t.dtype:
                st[name] = torch.empty_like(t, dtype=dtype)
