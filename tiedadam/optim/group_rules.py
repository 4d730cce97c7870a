"""The rules of a param group: hyperparameters, beta/betas as one setting, TiedAdamW's options
and the config keys of other AdamWs. Every error names the argument and the fix, and is raised
before any state or parameter changes. ``GroupRules`` checks a list of groups at every step,
remembering what it validated (so unchanged groups cost a few identity comparisons) and which
groups had an option edited since (their plans are dropped, their state converted:
Note [what the kernel may trust], 6, in verify.py)."""

from __future__ import annotations

import math
import numbers
from operator import is_
from typing import Any

import torch
from torch import Tensor

from ..kernels import ratio8

BACKENDS = ("auto", "triton", "torch")
UNSET = object()  # "beta not given" (None is not: it would read as a value)


def _scalar(name: str, value: Any, where: str) -> float | None:
    """The float value of a hyperparameter, or None for a device tensor (not read: no sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}{name} must be a float or a 1-element tensor, "
                             f"got a tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return None
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy floats too
        raise TypeError(f"{where}{name} must be a float, got {type(value).__name__}: {value!r}")
    return float(value)


def check_lr(lr: Any, where: str = "") -> None:
    v = _scalar("lr", lr, where)
    if v is not None and not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {where}lr={v}: the learning rate must be finite and >= 0")


def check_beta(beta: Any, where: str = "") -> float:
    v = _scalar("beta", beta, where)
    if v is None:
        raise ValueError(f"{where}beta must be a Python float or a CPU tensor (it sets the "
                         f"bias correction), got a {beta.device.type} tensor")
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {where}beta={v}: beta must be in [0, 1) "
                         f"(0.95 is the usual tied value)")
    return v


def check_eps(eps: Any, where: str = "") -> None:
    v = _scalar("eps", eps, where)
    if v is None or not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {where}eps={eps}: eps must be a finite float >= 0")


def check_weight_decay(weight_decay: Any, where: str = "") -> None:
    v = _scalar("weight_decay", weight_decay, where)
    if v is None or not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {where}weight_decay={weight_decay}: weight_decay must be a "
                         f"finite float >= 0")


def beta_pair(betas: Any, where: str = "") -> tuple:
    """``betas`` as a pair (b1, b2), unchecked; refused when it is not a pair."""
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}betas must be a pair (beta, beta), got {betas!r}") from None
    return b1, b2


def tied_beta_from_betas(betas: Any, where: str = "") -> float:
    """``betas=(b, b)`` -> b. Untied betas are refused with the reason and the fix."""
    b1, b2 = beta_pair(betas, where)
    b1 = check_beta(b1, where)
    b2 = check_beta(b2, where)
    if b1 != b2:
        raise ValueError(
            f"TiedAdamW ties beta1 = beta2 = beta, but {where}betas=({b1}, {b2}) are untied. "
            f"Tied betas make m and v the same running average, which bounds every update "
            f"element to [-lr, lr] and needs one bias correction. Pass beta={b2} "
            f"(or betas=({b2}, {b2})), or use torch.optim.AdamW for untied betas.")
    return b1


def resolve_beta(beta: Any, betas: Any, where: str) -> float:
    """The tied beta from ``beta`` and/or ``betas`` (either may be given; both must agree)."""
    if betas is None:
        return check_beta(0.95 if beta is UNSET else beta, where)
    tied = tied_beta_from_betas(betas, where)
    if beta is not UNSET and check_beta(beta, where) != tied:
        raise ValueError(f"{where}beta={beta} and betas={tuple(betas)} disagree: "
                         f"pass only one of them")
    return tied


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend={backend!r}: choose one of {', '.join(BACKENDS)} "
                         f"('auto' picks Triton on CUDA, torch's fused AdamW on CPU)")
    return backend


# Note [bf16 state bound]
# The EMA step changes a state x by (1 - beta) * (y - x), a relative change of about (1 - beta)
# when the new value y differs from x by x's own size (as g*g does from v, step after step).
# bf16 keeps 8 significant bits: its unit roundoff is u = 2**-8, so a change below
# u*|x| (half an ulp at worst) is rounded away by round-to-nearest, and the EMA freezes; with
# stochastic rounding it survives only in expectation, under rounding noise of about one ulp
# per step, larger than the change itself. So bf16 state needs 1 - beta >= 2**-8, i.e.
# beta <= 1 - 2**-8 = 0.99609375. Tied betas live far inside (0.95 is the usual value); the
# untied default beta2 = 0.999 would be outside, which is why bf16 Adam states stall there.
BF16_STATE_MAX_BETA = 1.0 - 2.0 ** -8


def check_beta_for_state(beta: float, state_dtype, where: str = "") -> None:
    if state_dtype == torch.bfloat16 and beta > BF16_STATE_MAX_BETA:
        raise ValueError(
            f"{where}beta={beta} is too close to 1 for state_dtype=torch.bfloat16: each EMA step "
            f"changes the state by a relative {1 - beta:.2g}, below bf16's unit roundoff 2**-8, "
            f"so the state would stop tracking its average. Use beta <= {BF16_STATE_MAX_BETA} "
            f"(0.95 is the usual tied value) or state_dtype=torch.float32.")
    if state_dtype == ratio8.NAME and beta > ratio8.max_beta():
        raise ValueError(
            f"{where}beta={beta} is too close to 1 for state_dtype='ratio8': each EMA step "
            f"moves exp_avg / sqrt(exp_avg_sq) by about {1 - beta:.2g}, below the 8-bit code's "
            f"step ({1 - ratio8.max_beta():.3g}), so the moment would drown in rounding noise "
            f"(Note [ratio8] in tiedadam/kernels/ratio8.py). Use beta <= "
            f"{ratio8.max_beta():.4f} or state_dtype='bfloat16'.")


# The state formats a group may name (JSON configs name them), and what they mean: a torch
# dtype for both moments, or ratio8 (exp_avg int8 r = m / sqrt(v), exp_avg_sq bf16 v; Note
# [ratio8] in tiedadam/kernels/ratio8.py).
STATE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}
RATIO8 = ratio8.NAME


def check_state_dtype(state_dtype: Any, where: str = ""):
    """torch.float32 / torch.bfloat16, their names ("float32", "bfloat16": JSON configs), or
    "ratio8"."""
    if state_dtype is None:
        return torch.float32
    if isinstance(state_dtype, str):
        key = state_dtype.removeprefix("torch.")
        if key in STATE_DTYPES:
            return STATE_DTYPES[key]
        if key == RATIO8:
            return RATIO8
    elif state_dtype in STATE_DTYPES.values():
        return state_dtype
    raise ValueError(f"Unsupported {where}state_dtype={state_dtype!r}: use torch.float32 "
                     f"(default), torch.bfloat16 or 'ratio8' (or the strings 'float32', "
                     f"'bfloat16')")


def dtype_name(dtype) -> str:
    return dtype if dtype == RATIO8 else str(dtype).removeprefix("torch.")


def state_dtypes_for(param_dtype: torch.dtype, group: dict) -> tuple:
    """(exp_avg dtype, exp_avg_sq dtype) of a param in ``group``: fp64 params keep fp64 state
    (as torch does); ratio8 is (int8, bf16); the others the group's ``state_dtype``, twice."""
    if param_dtype == torch.float64:
        return torch.float64, torch.float64
    if group["state_dtype"] == RATIO8:
        return torch.int8, torch.bfloat16
    d = STATE_DTYPES[group["state_dtype"]]
    return d, d


# The (exp_avg, exp_avg_sq) dtypes TiedAdamW's groups make: what a conversion may start from.
STATE_PAIRS = {(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.int8, torch.bfloat16)}


LOW_PRECISION = (torch.bfloat16, torch.float16)


def wants_master(param_dtype: torch.dtype, group: dict) -> bool:
    return bool(group["master_weights"]) and param_dtype in LOW_PRECISION


# Per-group options besides the hyperparameters, with their defaults (kept in defaults and in
# every group, as torch keeps foreach/fused/capturable, so deepcopy, pickling and state_dict()
# carry them). STATE_OPTIONS are the ones a group's state and plans are made under
# (Note [what the kernel may trust], 6, in verify.py: an edit converts the state as a load
# would).
FLAGS = ("capturable", "maximize", "master_weights", "stochastic_rounding",
         "param_stochastic_rounding")
STATE_OPTIONS = ("state_dtype", "master_weights", "stochastic_rounding",
                 "param_stochastic_rounding", "seed")
OPTION_DEFAULTS = dict(capturable=False, maximize=False, master_weights=False,
                       state_dtype="float32", stochastic_rounding=True,
                       param_stochastic_rounding=False, seed=0)
# Every key check_group reads but lr (a scheduler writes lr at every step: it is checked at
# every step on its own), from the lists above: GroupRules re-checks a group when one of these
# is another object than it validated.
CHECKED_KEYS = ("beta", "betas", "eps", "weight_decay", "amsgrad") + FLAGS + ("state_dtype",
                                                                             "seed")


def _flag(group: dict, key: str, where: str) -> None:
    v = group[key]
    if v is True or v is False:  # the steady state: nothing to normalise, nothing written
        return
    if not isinstance(v, (bool, int)) or isinstance(v, int) and v not in (0, 1):
        raise TypeError(f"{where}{key} must be True or False, got {v!r}")
    group[key] = bool(v)


def check_group(group: dict, where: str = "") -> None:
    """Validate (and normalise in place) one param group's hyperparameters and options.

    Run at construction, on add_param_group and load_state_dict, and at every step (so edits
    between steps are checked before anything changes). ``group["beta"]`` must already be
    resolved from beta/betas."""
    check_lr(group["lr"], where)
    beta = check_beta(group["beta"], where)
    check_eps(group["eps"], where)
    check_weight_decay(group["weight_decay"], where)
    if group.get("amsgrad"):
        raise ValueError(f"{where}amsgrad=True: TiedAdamW has no AMSGrad (it would keep a "
                         f"max of v that tied betas do not use, and ignoring it would train "
                         f"differently from the checkpoint's optimizer); load it into "
                         f"torch.optim.AdamW instead")
    for key in FLAGS:
        _flag(group, key, where)
    if group["maximize"]:
        raise ValueError(f"{where}maximize=True is not supported: TiedAdamW minimises; "
                         f"minimise the negated objective instead")
    # Stored by name: state dicts hold only strings, numbers and tensors (DCP's state-dict
    # utilities refuse a torch.dtype value in a param group).
    # Normalised values are written only when they differ: this runs at every step.
    state_dtype = check_state_dtype(group["state_dtype"], where)
    name = dtype_name(state_dtype)
    if group["state_dtype"] != name:
        group["state_dtype"] = name
    check_beta_for_state(beta, state_dtype, where)
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{where}seed must be an int, got {type(seed).__name__}: {seed!r}")
    if type(seed) is not int or not 0 <= seed < 2 ** 63:
        group["seed"] = int(seed) % (2 ** 63)
    b = group.get("beta")
    if type(b) is not float or b != beta or group.get("betas") != (beta, beta):
        group["beta"], group["betas"] = beta, (beta, beta)


class TiedGroup(dict):
    """A param group in which ``beta`` and ``betas`` stay one setting: writing either one
    (``group["betas"] = (0.9, 0.9)`` from a scheduler written for AdamW, or
    ``group["beta"] = 0.9``) sets both, so the last write wins. Untied pairs are stored as they
    come and refused at the next step (``check_group``). ``dict.update``/``setdefault`` bypass
    this; ``TiedAdamW._sync_beta`` resolves those at the next step."""

    def __setitem__(self, key, value):
        if key == "beta" and not isinstance(value, Tensor) or key == "betas":
            pair = value if key == "betas" else (value, value)
            try:
                b1, b2 = pair
            except (TypeError, ValueError):
                b1, b2 = None, 0  # not a pair: stored, refused at the next step
            if b1 == b2:
                super().__setitem__("beta", b1)
                super().__setitem__("betas", (b1, b2))
                return
        super().__setitem__(key, value)

    def __reduce__(self):  # pickles (and deep-copies) as itself, without re-running __setitem__
        return (TiedGroup, (dict(self),))


def check_params(params: list, where: str) -> None:
    """A group's params: real floating point, each listed once ((name, param) pairs from
    ``named_parameters()`` are taken as their param)."""
    seen = set()
    for i, p in enumerate(params):
        p = p[1] if isinstance(p, tuple) else p
        if isinstance(p, Tensor):
            if p.is_complex():
                raise ValueError(f"{where}params[{i}] is complex ({p.dtype}): TiedAdamW "
                                 f"supports real floating-point params; view it with "
                                 f"torch.view_as_real first")
            if not p.is_floating_point():
                raise ValueError(f"{where}params[{i}] has dtype {p.dtype}: only floating-"
                                 f"point params can be optimized")
            if id(p) in seen:
                # torch warns and steps it twice; one launch would update it twice at once
                raise ValueError(f"{where}params[{i}] appears twice in the group: list "
                                 f"each parameter once (torch.optim warns that this will "
                                 f"become an error)")
            seen.add(id(p))


class GroupRules:
    """The checks of a list of param groups at every step, and what they remember: the values
    last validated per group (a group whose values are the very objects validated before is
    not checked again; a tensor value, mutable in place, always is), the beta each group had
    (which tells a ``beta`` edit from a ``betas`` edit), and the options each group's state was
    made under (an edit marks the group, ``edited``, until its state is converted)."""

    def __init__(self):
        self.memo: dict[int, tuple | None] = {}  # id(group) -> (group, values validated)
        # id(group) -> (beta last validated, the params list it was added with): a group dict
        # replaced by a copy ({**g, ...}) shares g's params list, which tells a beta edit from
        # a betas edit in the copy too
        self.beta_seen: dict[int, tuple] = {}
        self.options_seen: dict[int, tuple] = {}  # id(group) -> (group, options)
        self.edited: dict[int, dict] = {}  # id(group) -> group, until its state is converted

    def reset(self) -> None:
        """Forget what was validated (a load, a copy): the next step checks every group."""
        self.memo.clear()
        self.options_seen.clear()
        self.edited.clear()

    def added(self, group: dict) -> None:
        """A group that was just validated (constructed, added, loaded)."""
        self.beta_seen[id(group)] = (group["beta"], group.get("params"))
        self.options_seen[id(group)] = (group, tuple(map(group.get, STATE_OPTIONS)))

    def check(self, groups: list) -> bool:
        """Validate every group (errors name the group); True when an option was edited since
        the last check, or an edit is still pending (a step refused after the edit was seen
        must not lose it): then cached plans must go. lr is checked at every step."""
        memo, edited = self.memo, False
        for gi, group in enumerate(groups):
            lr = group["lr"]
            if type(lr) is not float or not 0.0 <= lr < math.inf:  # NaN fails both
                check_lr(lr, f"param_groups[{gi}]: ")
            seen = memo.get(id(group))
            if seen is not None and seen[0] is group and all(
                    map(is_, map(group.get, CHECKED_KEYS), seen[1])):
                continue
            where = f"param_groups[{gi}]: "
            self.sync_beta(group, where)
            # the pair is consistent now: what a later beta-only or betas-only edit is told
            # apart from, even if this step is refused below for another value
            self.saw_beta(group)
            check_group(group, where)
            edited |= self.note_options(group)
            vals = tuple(map(group.get, CHECKED_KEYS))
            memo[id(group)] = None if any(isinstance(v, Tensor) for v in vals) else (group, vals)
        return edited or bool(self.edited)

    def check_options(self, groups: list) -> bool:
        """Only the options (before a state_dict(): a pending edit is applied to the state
        first); True when one was edited."""
        edited = False
        for gi, group in enumerate(groups):
            seen = self.options_seen.get(id(group))
            if seen is None or seen[0] is not group or seen[1] != tuple(
                    map(group.get, STATE_OPTIONS)):
                check_group(group, f"param_groups[{gi}]: ")
                edited |= self.note_options(group)
        return edited

    def note_options(self, group: dict) -> bool:
        """Record the group's options; True (and the group marked edited) when they differ
        from those recorded before, or when the group is a dict never added (a group replaced
        in ``param_groups`` by an edited copy: its params' state was made under another dict's
        options, so it is converted as after an edit)."""
        opts = tuple(map(group.get, STATE_OPTIONS))
        seen = self.options_seen.get(id(group))
        self.options_seen[id(group)] = (group, opts)
        if seen is None or seen[0] is not group or seen[1] != opts:
            self.edited[id(group)] = group
            return True
        return False

    def saw_beta(self, group: dict) -> None:
        # the params list stays the one the group was added with (ZeRO-3 swaps in a list of
        # sub-group partitions for each call and puts the group's own back afterwards)
        _, params = self.beta_seen.get(id(group), (None, group.get("params")))
        self.beta_seen[id(group)] = (group["beta"], params)

    def is_edited(self, group: dict) -> bool:
        return self.edited.get(id(group)) is group

    def sync_beta(self, group: dict, where: str) -> None:
        """Keep ``beta`` and ``betas`` in step when a scheduler or the user edits one of them
        (through ``dict.update``/``setdefault``, which bypass TiedGroup). The value last
        validated tells which of the two was edited."""
        beta, betas = group["beta"], group["betas"]
        b1, b2 = beta_pair(betas, where)
        if b1 != b2:
            tied_beta_from_betas(betas, where)  # raises the untied-betas error
        if b1 == beta:
            return
        seen, _ = self.beta_seen.get(id(group), (None, None))
        if seen is None:  # a dict never validated: the copy of one that shares its params
            seen = next((b for b, ps in self.beta_seen.values()
                         if ps is not None and ps is group.get("params")), None)
        if beta == seen:  # betas was edited
            beta = check_beta(b1, where)
        elif b1 == seen:  # beta was edited
            beta = check_beta(beta, where)
        else:
            raise ValueError(f"{where}beta={beta} and betas={tuple(betas)} disagree: set one of "
                             f"them (TiedAdamW keeps betas == (beta, beta))")
        group["beta"], group["betas"] = beta, (beta, beta)


def check_config_keys(adam_w_mode: Any = True, torch_adam: Any = None, amsgrad: Any = False,
                      bias_correction: Any = True, fused: Any = None, foreach: Any = None,
                      differentiable: Any = False) -> None:
    """Keys that configs written for torch's AdamW or DeepSpeed's Adam/AdamW carry. The values
    that mean what TiedAdamW does are accepted (``fused``/``foreach``/``torch_adam`` only pick
    an implementation: TiedAdamW's is its own); the others are refused with the reason."""
    for name, value in (("adam_w_mode", adam_w_mode), ("amsgrad", amsgrad),
                        ("bias_correction", bias_correction), ("differentiable", differentiable),
                        ("torch_adam", torch_adam), ("fused", fused), ("foreach", foreach)):
        if value is not None and not isinstance(value, bool):
            if name in ("torch_adam", "fused", "foreach") or value not in (0, 1):
                raise TypeError(f"{name} must be True or False, got {value!r}")
    if not adam_w_mode:
        raise ValueError("adam_w_mode=False asks for Adam with L2 regularisation (weight decay "
                         "added to the gradient); TiedAdamW implements AdamW's decoupled weight "
                         "decay only. Remove adam_w_mode or set it to true, or use DeepSpeed's "
                         "Adam for L2 regularisation")
    if amsgrad:
        raise ValueError("amsgrad=True: TiedAdamW has no AMSGrad (it would keep a max of v that "
                         "tied betas do not need: the update is bounded by 1 already); remove "
                         "amsgrad or set it to false, or use torch.optim.AdamW(amsgrad=True)")
    if not bias_correction:
        raise ValueError("bias_correction=False: TiedAdamW always divides the moments by "
                         "c = 1 - beta**t (one factor for both, with tied betas), as "
                         "torch.optim.AdamW does; remove bias_correction or set it to true")
    if differentiable:
        raise ValueError("differentiable=True: TiedAdamW's step runs in a kernel that autograd "
                         "cannot trace; use torch.optim.AdamW(differentiable=True) to "
                         "differentiate through optimizer steps")
