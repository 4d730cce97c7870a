"""Loading a checkpoint: a TiedAdamW or torch.optim.AdamW(betas=(b, b)) state dict into a
TiedAdamW, every refusal before anything is loaded. State keys are torch's (``step``,
``exp_avg``, ``exp_avg_sq``; ``master_param`` with master weights), so checkpoints move between
the two optimizers both ways."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._compat import local_tensor
from ..kernels import ratio8
from . import group_rules as R
from . import verify as V

# State keys this optimizer owns; named as torch.optim.AdamW names them.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def split(state_dict: dict, current_groups: list) -> tuple:
    """Check ``state_dict`` against the optimizer's groups, before anything is loaded: (the
    groups to load, saved id -> param, {saved id: TiedAdamW's state tensors}, {saved id: any
    other state}, which torch's loader takes as it is)."""
    groups = state_dict["param_groups"]
    if len(groups) != len(current_groups):
        raise ValueError(f"loaded state dict has {len(groups)} parameter groups, this "
                         f"optimizer has {len(current_groups)}")
    merged_groups = [merge_group(g, current, i)
                     for i, (g, current) in enumerate(zip(groups, current_groups))]
    saved_ids = [i for g in merged_groups for i in g["params"]]
    params = [p for g in current_groups for p in g["params"]]
    params_of = dict(zip(saved_ids, params))
    named = {i: R.check_state_dtype(g["state_dtype"]) for g in groups if "state_dtype" in g
             for i in g["params"]}
    own, rest = {}, {}
    for k, s in state_dict["state"].items():
        own[k] = {n: s[n] for n in STATE_KEYS + (V.MASTER_KEY,) if n in s}
        rest[k] = {n: v for n, v in s.items() if n not in own[k]}
        if k in params_of:
            V.check_saved_state(params_of[k], k, own[k])
            if k in named and local_tensor(params_of[k]).dtype != torch.float64:
                # (fp64 params keep fp64 moments whatever the group names)
                check_codes_match(k, own[k].get("exp_avg"), named[k])
    return merged_groups, params_of, own, rest


def check_codes_match(k, m: Any, named) -> None:
    """A saved group that names its state_dtype holds moments of that format: ratio8 codes
    (int8) iff "ratio8". Float moments where the group says ratio8 are codes cast to a float
    template (torch.distributed.checkpoint loads into the dtypes of the state dict it is
    given): their values are codes, not moments, so nothing is loaded (int8 where the group
    names a float dtype likewise)."""
    if not isinstance(m, Tensor) or (m.dtype == torch.int8) == (named == R.RATIO8):
        return
    raise ValueError(
        f"state_dict['state'][{k!r}]['exp_avg'] is {m.dtype} but its group's "
        f"state_dtype is {R.dtype_name(named)!r}: a checkpoint loaded into a state dict of "
        f"another state dtype (torch.distributed.checkpoint casts to the dtypes of the state "
        f"dict it loads into) cannot be read. Load it into an optimizer made with the saved "
        f"state_dtype, or with tiedadam.integrations.fsdp.load, which loads each tensor in "
        f"its saved dtype; to change state_dtype, set it on the param group after loading.")


def merge_group(g: dict, current: dict, i: int) -> dict:
    """A saved group with the keys it lacks taken from the current one, checked."""
    where = f"state_dict['param_groups'][{i}]: "
    if g.get("decoupled_weight_decay") is False and g.get("weight_decay", 0) != 0:
        # torch.optim.Adam (decoupled_weight_decay=False, torch >= 2.7) adds weight_decay * p
        # to the grad (L2), so its moments hold that term: continuing as AdamW would train
        # differently from the checkpoint's optimizer. (torch's AdamW saves True; an Adam
        # checkpoint of an older torch has no key and cannot be told from AdamW's.)
        raise ValueError(f"{where}a torch.optim.Adam checkpoint with L2 weight decay "
                         f"(decoupled_weight_decay=False, weight_decay={g['weight_decay']}): "
                         f"TiedAdamW decays weights decoupled (AdamW), so it would continue "
                         f"with another update than the checkpoint's optimizer; continue with "
                         f"torch.optim.Adam, or load a checkpoint saved without weight decay "
                         f"(or by AdamW)")
    # A saved group may lack keys: torch.optim.AdamW has no state_dtype or seed, and torch's
    # FSDP1 optimizer-state conversion drops all keys of a group that is empty on this rank.
    # Keep the current values then (torch's AdamW would fail with KeyError: 'lr' at its next
    # step). beta and betas are one setting: a saved betas=(0.9, 0.9) replaces the current
    # beta.
    keep = {k: v for k, v in current.items() if k not in g and k != "params"}
    if "beta" in g or "betas" in g:
        keep.pop("beta", None)
        keep.pop("betas", None)
    merged = {**keep, **g}
    merged["beta"] = R.resolve_beta(merged.get("beta", R.UNSET), merged.get("betas"), where)
    R.check_group(merged, where)
    if len(merged["params"]) != len(current["params"]):
        raise ValueError(f"{where}holds {len(merged['params'])} parameters, this "
                         f"optimizer's group {len(current['params'])}")
    return merged


def restore(state, own: dict, params_of: dict, groups: list) -> None:
    """TiedAdamW's state tensors into ``state`` (the optimizer's, torch's loader has filled the
    rest), cast to what each param's group says (Note [what the kernel may trust], 6, in
    verify.py)."""
    group_of = {k: g for g in groups for k in g["params"]}
    for k, tensors in own.items():
        if k not in params_of:
            continue
        p = params_of[k]
        st = state[p]
        group = group_of[k]
        if "exp_avg" in tensors and "exp_avg_sq" in tensors:  # converted as a pair (ratio8)
            st["exp_avg"], st["exp_avg_sq"] = V.convert_moments(
                p, tensors["exp_avg"], tensors["exp_avg_sq"],
                R.state_dtypes_for(local_tensor(p).dtype, group), group["beta"],
                tensors.get("step"))
        for n, v in tensors.items():
            if n in ("exp_avg", "exp_avg_sq") and n in st:
                continue
            if n == V.MASTER_KEY and not R.wants_master(local_tensor(p).dtype, group):
                continue  # saved with master weights, loaded into a group without: the
                # param holds the rounded master
            st[n] = cast_loaded(p, n, v, group)
        if not st:
            del state[p]
        else:  # a checkpoint without master weights: start from the params
            V.init_master(p, st, group)


def cast_loaded(p: Tensor, name: str, v: Any, group: dict) -> Tensor:
    """A saved state tensor as this optimizer keeps it for ``p``."""
    local = local_tensor(p)
    if name == "step":
        v = v if isinstance(v, Tensor) else torch.tensor(float(v))
        return v.detach().to(device=local.device, dtype=torch.float32).clone().reshape(())
    m_dtype, v_dtype = R.state_dtypes_for(local.dtype, group)
    dtype = {V.MASTER_KEY: torch.float32, "exp_avg": m_dtype}.get(name, v_dtype)
    return V.cast_state(p, v, dtype)


def dequantize_state_dict(state_dict: dict) -> dict:
    """A copy of a TiedAdamW ``state_dict()`` with fp32 moments: ratio8 exp_avg codes decoded
    against their exp_avg_sq (Note [ratio8] in kernels/ratio8.py), bf16 moments upcast, and every
    group's ``state_dtype`` "float32". ``torch.optim.AdamW(betas=(b, b))`` and an fp32 TiedAdamW
    load the result; master weights and the step counts are kept as they are (fp64 moments of
    fp64 params stay fp64). The input is not changed."""
    state = {}
    for k, s in state_dict["state"].items():
        s = dict(s)
        m, v = s.get("exp_avg"), s.get("exp_avg_sq")
        if isinstance(m, Tensor) and isinstance(v, Tensor) and m.dtype != torch.float64:
            s["exp_avg"] = ratio8.decode(m, v) if m.dtype == torch.int8 else m.float()
            s["exp_avg_sq"] = v.float()
        state[k] = s
    groups = [{**g, "state_dtype": "float32"} if "state_dtype" in g else dict(g)
              for g in state_dict["param_groups"]]
    return {**state_dict, "state": state, "param_groups": groups}
