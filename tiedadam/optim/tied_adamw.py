"""TiedAdamW: AdamW with beta1 = beta2 = beta, as a torch.optim.Optimizer."""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..kernels.multi_tensor import TableCache, upload
from ..kernels.runtime import triton_runs_on, triton_unavailable_reason
from . import hyperparams as H
from . import plan as P
from .bucket import Bucket
from .guard import Guard
from .plan import MASTER_KEY
from .shards import local_tensor
from .rng import shard_offset, stream_key
from .torch_backend import torch_step

class _Plan:
    """The buckets of one step layout, and what was verified when they were made."""
    _serial = 0

    def __init__(self, buckets: list, entries: list, state):
        self.buckets = buckets
        # what later steps reuse; no grads or working copies (they must not outlive the step)
        self.entries = [e._replace(grad=None, grad_out=None,
                                   param=None if e.writeback is not None else e.param)
                        for e in entries]
        sharded = any(e.param is not e.source and e.writeback is None for e in entries)
        self.guard = Guard(entries, state, sharded)
        _Plan._serial += 1
        self.serial = _Plan._serial  # table-cache key: a rebuilt plan never meets old tables


# State keys this optimizer owns; named as torch.optim.AdamW names them so checkpoints move
# between the two in both directions.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
_UNSET = object()
_PARAMS = itemgetter("params")
_GRAD = attrgetter("grad")
# Every group key check_group reads except lr (checked at every step on its own: schedulers
# replace it at every step); see _check_groups.
_CHECKED_KEYS = ("beta", "betas", "eps", "weight_decay", "amsgrad", "capturable", "maximize",
                 "master_weights", "state_dtype", "stochastic_rounding",
                 "param_stochastic_rounding", "seed")


class TiedAdamW(Optimizer):
    r"""AdamW with tied betas (beta1 = beta2 = beta), on Triton multi-tensor kernels.

    For each parameter θ with gradient g, at step t (starting at 1), with c = 1 − β^t:

    .. math::
        m &\leftarrow \beta m + (1-\beta) g, \qquad v \leftarrow \beta v + (1-\beta) g^2 \\
        \theta &\leftarrow \theta (1 - \eta\lambda)
                 - \eta \, \frac{m / c}{\sqrt{v / c} + \epsilon}

    This is exactly ``torch.optim.AdamW(betas=(beta, beta))``. Because m/c and v/c are the same
    weighted average of g and g², (m/c)² ≤ v/c, so every element of the update lies in
    [−η, η] (before weight decay), and there is a single bias-correction factor c.

    Args:
        params: parameters or param groups (dicts may override lr, beta/betas, eps,
            weight_decay).
        lr: learning rate η (float or 1-element tensor). Default 1e-3.
        beta: the tied β for both moments, in [0, 1). Default 0.95.
        eps: ε added to the denominator. Default 1e-8.
        weight_decay: decoupled weight decay λ. Default 1e-2.
        betas: alternative to ``beta`` for drop-in use with AdamW configs; must be (β, β).
        backend: ``"auto"`` (Triton for CUDA tensors, torch's fused AdamW for CPU tensors),
            ``"triton"`` or ``"torch"``.
        master_weights: for bf16/fp16 params, keep an fp32 copy (state ``master_param``) that
            the kernel updates, writing the rounded (nearest-even) param in the same pass.
        state_dtype: ``torch.float32`` (default, also for bf16 params) or ``torch.bfloat16``
            (or their names, ``"bfloat16"``) for exp_avg/exp_avg_sq; bf16 needs
            beta <= 1 - 2**-8 (Note [bf16 state bound]). fp64 params keep fp64 state.
        stochastic_rounding: round bf16 states stochastically (unbiased). Default True; False
            rounds to nearest (for ablations).
        param_stochastic_rounding: round bf16 params written without master weights
            stochastically. Default False (round to nearest).
        seed: key of the rounding RNG. Default: ``torch.initial_seed()``, so
            ``torch.manual_seed`` makes runs reproducible (no global RNG state is consumed).
        capturable: keep everything the step reads on the device (lr as a device tensor may
            change between CUDA-graph replays). Group key, as in torch.
        maximize: must be False (accepted for AdamW-style configs; TiedAdamW minimises).
        telemetry: compute per-parameter update statistics in the same kernel pass, read with
            ``telemetry()`` (no host sync until asked). Off by default (compiled out).
        snr_threshold: |m_hat|/sqrt(v_hat) above which an element counts as high
            signal-to-noise in the telemetry, in [0, 1). Default 0.5.
        names: parameter names for the telemetry, in parameter order (or pass
            ``model.named_parameters()`` as params, or use ``from_named_parameters``).
        adam_w_mode, torch_adam, bias_correction: keys of DeepSpeed configs written for its
            Adam/AdamW; ``adam_w_mode`` and ``bias_correction`` must be True (decoupled weight
            decay, bias-corrected moments), ``torch_adam`` is ignored.
        amsgrad, fused, foreach, differentiable: keys of torch.optim.AdamW configs;
            ``amsgrad`` and ``differentiable`` must be False, ``fused``/``foreach`` are
            ignored (TiedAdamW's step is its own fused kernel).

    Every option except the telemetry ones and ``backend`` is also a param-group key (as torch
    keeps ``foreach``/``fused``), so state dicts, deepcopy and pickling carry them. Each step
    verifies every parameter's grad and state before anything changes (Note [what the kernel may
    trust] in plan.py): inputs either work as in torch.optim.AdamW or raise.

    State per parameter (torch's names): ``step`` (fp32 scalar on the parameter's device),
    ``exp_avg``, ``exp_avg_sq`` (fp32 by default, also for bf16/fp16 parameters; math is fp32,
    fp64 for fp64 parameters), and ``master_param`` with master weights.
    """

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, beta: Any = _UNSET,
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, betas: Any = None,
                 backend: str = "auto", master_weights: bool = False,
                 state_dtype: torch.dtype | str | None = None, stochastic_rounding: bool = True,
                 param_stochastic_rounding: bool = False, seed: int | None = None,
                 capturable: bool = False, maximize: bool = False, telemetry: bool = False,
                 snr_threshold: float = 0.5, names: list[str] | None = None,
                 adam_w_mode: bool = True, torch_adam: bool | None = None,
                 amsgrad: bool = False, bias_correction: bool = True, fused: bool | None = None,
                 foreach: bool | None = None, differentiable: bool = False):
        self.backend = H.check_backend(backend)
        if backend == "triton":
            reason = triton_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"backend='triton' cannot run here: {reason}")
        H.check_config_keys(adam_w_mode, torch_adam, amsgrad, bias_correction, fused, foreach,
                            differentiable)
        if seed is None:
            seed = torch.initial_seed()
        defaults = dict(lr=lr, beta=self._resolve_beta(beta, betas, ""), eps=eps,
                        weight_decay=weight_decay, capturable=bool(capturable),
                        maximize=maximize, master_weights=master_weights,
                        state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                        param_stochastic_rounding=param_stochastic_rounding, seed=seed)
        H.check_group(defaults, "")  # normalises in place (betas, state_dtype, seed)
        self._set_options(telemetry, snr_threshold)
        self._reset_caches()
        self._beta_seen: dict[int, float] = {}
        # Note [graph buffers]: device buffers a captured CUDA graph reads or writes (tickets,
        # address tables, hyperparameters, telemetry rows). A plan or table rebuilt later would
        # free them under the graph, which replays through their addresses; they live as long
        # as the optimizer (not pickled, not reset by a load: the graph outlives both).
        self._graph_buffers: list = []
        super().__init__(params, defaults)
        if names is not None:
            flat = [p for g in self.param_groups for p in g["params"]]
            if len(names) != len(flat):
                raise ValueError(f"names has {len(names)} entries for {len(flat)} parameters")
            self._names = {id(p): n for p, n in zip(flat, names)}
        # torch.amp.GradScaler then hands us grad_scale/found_inf instead of unscaling the
        # grads in a separate pass; the kernel unscales and skips non-finite steps itself.
        self._step_supports_amp_scaling = True

    def _set_options(self, telemetry: bool, snr_threshold: float) -> None:
        if not 0.0 <= float(snr_threshold) < 1.0:
            raise ValueError(f"Invalid snr_threshold={snr_threshold}: |m_hat|/sqrt(v_hat) lies in "
                             f"[0, 1] with tied betas, so the threshold must be in [0, 1)")
        self.telemetry_enabled = bool(telemetry)
        self.snr_threshold = float(snr_threshold)

    def _reset_caches(self) -> None:
        """Derived, rebuildable state: never pickled, rebuilt after a load or a deepcopy."""
        self._state_version = getattr(self, "_state_version", 0) + 1
        self._plans: OrderedDict = OrderedDict()
        self._tables = TableCache()
        self._hyper_dev: dict = {}
        self._tele_plans: OrderedDict = OrderedDict()  # recently stepped plans (telemetry)
        self._ordinals: dict[int, tuple[int, dict]] = {}  # id(group) -> (ordinal, group)
        self._slots: dict[tuple, list] = {}  # (ordinal, position) -> weakrefs, first seen first
        self._group_memo: dict[int, tuple | None] = {}  # id(group) -> what was validated
        self._options_seen: dict[int, tuple[dict, tuple]] = {}  # id(group) -> its options
        self._edited: dict[int, dict] = {}  # groups whose options changed, until a plan is built

    def _ordinal(self, group: dict) -> int:
        """The group's number in the order this optimizer first saw its groups (Note [rng
        streams] in rng.py): the index in param_groups for a plain run, the call order for
        DeepSpeed's one-group-per-call steps. Renumbered after a load, as a fresh run numbers."""
        seen = self._ordinals.get(id(group))
        if seen is None or seen[1] is not group:
            for g in (*self.param_groups, group):
                s = self._ordinals.get(id(g))
                if s is None or s[1] is not g:
                    self._ordinals[id(g)] = (len(self._ordinals), g)
            seen = self._ordinals[id(group)]
        return seen[0]

    def _slot(self, ordinal: int, position: int, tensor: Tensor) -> int:
        """How many other tensors were first seen at this (group ordinal, position) before
        ``tensor`` (Note [rng streams] in rng.py): 0 in a plain run; ZeRO-3 steps each
        sub-group partition alone through the same group dict, and numbers them here in the
        order it steps them, which is the same after a load (renumbered, as ordinals)."""
        refs = self._slots.setdefault((ordinal, position), [])
        for k, ref in enumerate(refs):
            if ref() is tensor:
                return k
        refs.append(weakref.ref(tensor))
        return len(refs) - 1

    # Options that are not per-group hyperparameters travel with the object (deepcopy, pickle);
    # the per-group ones (state_dtype, seed, master_weights, ...) live in defaults and groups,
    # as torch keeps foreach/fused/capturable, so state_dict() round trips carry them too.
    _INSTANCE_OPTIONS = ("backend", "telemetry_enabled", "snr_threshold", "_names")

    def _sync_betas(self) -> None:
        """Resolve a beta/betas edit made since the last step, so what is saved is consistent."""
        for gi, group in enumerate(self.param_groups):
            self._sync_beta(group, f"param_groups[{gi}]: ")

    def _apply_option_edits(self) -> None:
        """An option edit not yet taken by a step is applied to the state now (Note [what the
        kernel may trust], 6, in plan.py), so that what is saved is what the next step would
        use: a run resumed from it continues as the uninterrupted one."""
        for gi, group in enumerate(self.param_groups):
            seen = self._options_seen.get(id(group))
            if seen is None or seen[0] is not group or \
                    seen[1] != tuple(map(group.get, H.STATE_OPTIONS)):
                H.check_group(group, f"param_groups[{gi}]: ")
                self._note_options(group)
        if self._edited:
            self._entries([])

    def state_dict(self) -> dict:
        self._sync_betas()
        self._apply_option_edits()
        return super().state_dict()

    def __getstate__(self) -> dict:
        self._sync_betas()
        self._apply_option_edits()
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._INSTANCE_OPTIONS if k in self.__dict__})
        return state

    @property
    def state_dtype(self) -> torch.dtype:
        """The default group's state dtype (groups may override it; stored by name)."""
        return H.check_state_dtype(self.defaults["state_dtype"])

    @property
    def seed(self) -> int:
        return self.defaults["seed"]

    @property
    def master_weights(self) -> bool:
        return self.defaults["master_weights"]

    @property
    def stochastic_rounding(self) -> bool:
        return self.defaults["stochastic_rounding"]

    @property
    def param_stochastic_rounding(self) -> bool:
        return self.defaults["param_stochastic_rounding"]

    # ------------------------------------------------------------------ param groups
    @staticmethod
    def _resolve_beta(beta: Any, betas: Any, where: str) -> float:
        if betas is None:
            return H.check_beta(0.95 if beta is _UNSET else beta, where)
        tied = H.tied_beta_from_betas(betas, where)
        if beta is not _UNSET and H.check_beta(beta, where) != tied:
            raise ValueError(f"{where}beta={beta} and betas={tuple(betas)} disagree: "
                             f"pass only one of them")
        return tied

    @classmethod
    def from_named_parameters(cls, named_parameters, **kwargs) -> "TiedAdamW":
        """``TiedAdamW(model.named_parameters(), ...)``: telemetry is keyed by these names."""
        return cls(list(named_parameters), **kwargs)

    def _param_name(self, gi: int, p: Tensor) -> str:
        named = getattr(self, "_names", {}).get(id(p))
        if named is not None:
            return named
        group = self.param_groups[gi]
        idx = next(i for i, q in enumerate(group["params"]) if q is p)
        if "param_names" in group:
            return group["param_names"][idx]
        return f"{gi}.{idx}"

    def add_param_group(self, param_group: dict) -> None:
        n = len(getattr(self, "param_groups", []))
        where = f"param_groups[{n}]: "
        group = dict(param_group)
        if "beta" in group or "betas" in group:
            group["beta"] = self._resolve_beta(group.pop("beta", _UNSET),
                                               group.pop("betas", None), where)
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        H.check_group(group, where)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = set()
        for i, p in enumerate(params):
            p = p[1] if isinstance(p, tuple) else p  # (name, param) from named_parameters()
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
        group["params"] = params
        super().add_param_group(H.TiedGroup(group))
        self._beta_seen[id(self.param_groups[-1])] = self.param_groups[-1]["beta"]
        self._note_options(self.param_groups[-1])
        self._invalidate()

    def __setstate__(self, state: dict) -> None:
        # Also called by Optimizer.load_state_dict with the loaded groups, and by deepcopy and
        # unpickling with what __getstate__ gave.
        super().__setstate__(state)
        self.param_groups[:] = [g if isinstance(g, H.TiedGroup) else H.TiedGroup(g)
                                for g in self.param_groups]
        d = self.__dict__
        d.setdefault("backend", "auto")
        d.setdefault("telemetry_enabled", False)
        d.setdefault("snr_threshold", 0.5)
        d.setdefault("_graph_buffers", [])
        for k, v in H.OPTION_DEFAULTS.items():  # pickles from before these were group options
            self.defaults.setdefault(k, v)
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]: "
            for k, v in self.defaults.items():
                if k not in ("beta", "betas"):
                    group.setdefault(k, v)
            # Groups from torch.optim.AdamW carry only betas: derive (and check) beta.
            group["beta"] = self._resolve_beta(group.get("beta", _UNSET), group.get("betas"),
                                               where)
            H.check_group(group, where)
        self._reset_caches()
        self._beta_seen = {id(g): g["beta"] for g in self.param_groups}
        for g in self.param_groups:  # the options the loaded (or copied) state was made under
            self._note_options(g)

    def _invalidate(self) -> None:
        """Forget cached plans and tables (param set or state tensors changed)."""
        if hasattr(self, "_plans"):
            self._state_version += 1
            self._plans.clear()
            self._tables.clear()

    def _sync_beta(self, group: dict, where: str) -> None:
        """Keep ``beta`` and ``betas`` in step when a scheduler or the user edits one of them.

        The value last validated (kept outside the group, so state_dict stays clean; recorded
        when the group is added or loaded and at every step) tells which of the two was edited.
        """
        beta, betas = group["beta"], group["betas"]
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"{where}betas must be a pair (beta, beta), got {betas!r}") from None
        if b1 != b2:
            H.tied_beta_from_betas(betas, where)  # raises the untied-betas error
        if b1 == beta:
            return
        seen = self._beta_seen.get(id(group))
        if beta == seen:  # betas was edited
            beta = H.check_beta(b1, where)
        elif b1 == seen:  # beta was edited
            beta = H.check_beta(beta, where)
        else:
            raise ValueError(f"{where}beta={beta} and betas={tuple(betas)} disagree: set one of "
                             f"them (TiedAdamW keeps betas == (beta, beta))")
        group["beta"], group["betas"] = beta, (beta, beta)

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state held on each device (local shards for DTensors), e.g.
        ``{"cuda:0": 12_000_000}``: for memory accounting without guessing."""
        out: dict[str, int] = {}
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    t = local_tensor(v)
                    out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a TiedAdamW or torch.optim.AdamW(betas=(b, b)) state dict.

        Checked before anything changes: tied betas, every hyperparameter and option, no
        AMSGrad or maximize, and every saved state tensor the shape of its parameter. Options a
        saved group lacks (a torch.optim.AdamW checkpoint has no ``state_dtype``) keep their
        current values. Unlike torch's loader, which casts every float state to the param dtype,
        exp_avg and exp_avg_sq get the group's state dtype (fp32 by default, also for bf16
        params; fp64 for fp64 params).
        """
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}")
        saved_groups = []
        for i, (g, current) in enumerate(zip(groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]: "
            # A saved group may lack keys: torch.optim.AdamW has no state_dtype or seed, and
            # torch's FSDP1 optimizer-state conversion drops all keys of a group that is empty
            # on this rank. Keep the current values then (torch's AdamW would fail with
            # KeyError: 'lr' at its next step). beta and betas are one setting: a saved
            # betas=(0.9, 0.9) replaces the current beta.
            keep = {k: v for k, v in current.items() if k not in g and k != "params"}
            if "beta" in g or "betas" in g:
                keep.pop("beta", None)
                keep.pop("betas", None)
            merged = {**keep, **g}
            merged["beta"] = self._resolve_beta(merged.get("beta", _UNSET),
                                                merged.get("betas"), where)
            H.check_group(merged, where)
            if len(merged["params"]) != len(current["params"]):
                raise ValueError(f"{where}holds {len(merged['params'])} parameters, this "
                                 f"optimizer's group {len(current['params'])}")
            saved_groups.append(merged)
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        group_of = {k: g for g in saved_groups for k in g["params"]}
        own = {}
        stripped = {}
        for k, s in state_dict["state"].items():
            own[k] = {n: s[n] for n in STATE_KEYS + (MASTER_KEY,) if n in s}
            stripped[k] = {n: v for n, v in s.items() if n not in own[k]}
            if k in id_map:
                self._check_loaded(id_map[k], k, own[k])
        super().load_state_dict({**state_dict, "param_groups": saved_groups, "state": stripped})
        for k, tensors in own.items():
            if k not in id_map:
                continue
            p = id_map[k]
            state = self.state[p]
            group = group_of[k]
            for n, v in tensors.items():
                if n == MASTER_KEY and not P.wants_master(local_tensor(p).dtype, group):
                    continue  # saved with master weights, loaded into a group without: the
                    # param holds the rounded master (Note [what the kernel may trust], 6)
                state[n] = self._cast_loaded(p, n, v, group)
            if not state:
                del self.state[p]
            else:  # a checkpoint without master weights: start from the params
                P.init_master(p, state, group)
        self._invalidate()

    @staticmethod
    def _check_loaded(p: Tensor, k, saved: dict) -> None:
        """Refuse saved state that cannot belong to ``p`` (before anything is loaded)."""
        for n in ("exp_avg", "exp_avg_sq", MASTER_KEY):
            v = saved.get(n)
            if v is None:
                continue
            if not isinstance(v, Tensor) or not v.is_floating_point():
                raise ValueError(f"state_dict['state'][{k!r}][{n!r}] is not a floating-point "
                                 f"tensor ({type(v).__name__})")
            if v.shape != p.shape:
                raise ValueError(
                    f"state_dict['state'][{k!r}][{n!r}] has shape {tuple(v.shape)}, but the "
                    f"parameter it maps to has shape {tuple(p.shape)}: the state dict was saved "
                    f"for another model (or another parameter order)")
        t = saved.get("step")
        if t is not None and not (isinstance(t, (int, float)) or
                                  (isinstance(t, Tensor) and t.numel() == 1)):
            raise ValueError(f"state_dict['state'][{k!r}]['step'] must be a number or a "
                             f"one-element tensor")

    def _cast_loaded(self, p: Tensor, name: str, v: Any, group: dict) -> Tensor:
        local = local_tensor(p)
        if name == "step":
            v = v if isinstance(v, Tensor) else torch.tensor(float(v))
            return v.detach().to(device=local.device, dtype=torch.float32).clone().reshape(())
        dtype = torch.float32 if name == MASTER_KEY else P.state_dtype_for(local.dtype, group)
        return P.cast_state(p, v, dtype)

    # ------------------------------------------------------------------ step
    def _backend_for(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
        if self.backend == "triton" and not triton_runs_on(device):
            raise RuntimeError(f"backend='triton' cannot update tensors on {device}: "
                               f"{triton_unavailable_reason() or 'Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)'}. "
                               f"Use backend='auto' or 'torch' for these parameters.")
        return self.backend

    def _check_groups(self) -> None:
        """Validate every group's hyperparameters and options before anything changes (errors
        name the group). A group whose option values are the very objects validated at an
        earlier step is not checked again: ``vals`` holds them, so an id cannot be reused by a
        new value, and a value that is a tensor (mutable in place) is re-checked every time.
        lr is checked at every step (a scheduler writes a new float at every step)."""
        memo = self._group_memo
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            if type(lr) is not float or not 0.0 <= lr < math.inf:  # NaN fails both
                H.check_lr(lr, f"param_groups[{gi}]: ")
            seen = memo.get(id(group))
            if seen is not None and seen[0] is group and all(
                    map(is_, map(group.get, _CHECKED_KEYS), seen[1])):
                continue
            where = f"param_groups[{gi}]: "
            self._sync_beta(group, where)
            H.check_group(group, where)
            self._beta_seen[id(group)] = group["beta"]
            self._note_options(group)
            vals = tuple(map(group.get, _CHECKED_KEYS))
            memo[id(group)] = None if any(isinstance(v, Tensor) for v in vals) else (group, vals)

    def _note_options(self, group: dict) -> None:
        """After an edit of a group's options, drop the plans: they hold the buckets and
        rounding keys made for the old values (the state follows at each param's next step,
        Note [what the kernel may trust], 6, in plan.py)."""
        opts = tuple(map(group.get, H.STATE_OPTIONS))
        seen = self._options_seen.get(id(group))
        if seen is not None and seen[0] is group and seen[1] != opts:
            self._invalidate()
            self._edited[id(group)] = group
        self._options_seen[id(group)] = (group, opts)

    def _pending(self) -> list:
        """(group, position, param, grad) of every parameter with a grad, after checking each
        grad's kind, shape, dtype and device (errors name the parameter)."""
        pending = []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    P.check_grad(gi, i, p, g)
                pending.append((gi, i, p, g))
        return pending

    def _entries(self, pending: list) -> list:
        """Every pending parameter verified in full (Note [what the kernel may trust] in
        plan.py). Raises before anything changes: state to create (params without state) or
        to convert (option edits, a checkpoint without master weights: ``P.apply_options``) is
        staged, verified with the rest and committed once every parameter checked out. After
        an option edit, every param of the group with state is converted (as a load would),
        those without a grad too; ZeRO-3 sub-groups, which are not in the group at this call,
        convert at their own next step."""
        groups = self.param_groups
        state = self.state
        staged = {}  # id(param) -> (param, the state dict the step uses in place of its own)
        for gi, group in enumerate(groups):
            if self._edited.get(id(group)) is group:
                for i, p in enumerate(group["params"]):
                    st = state.get(p)
                    if st:
                        P.check_readable(gi, i, p, st)
                        new = P.apply_options(p, st, group)
                        if new is not st:
                            staged[id(p)] = (p, new)
        entries = []
        for gi, i, p, g in pending:
            group = groups[gi]
            st = staged[id(p)][1] if id(p) in staged else state.get(p)
            P.check_readable(gi, i, p, st)
            if not st:
                new = {}
                P.init(p, new, group)
            else:
                new = P.apply_options(p, st, group)
            if new is not st:
                staged[id(p)] = (p, new)
            entries.append(P.entry(gi, i, p, g, new, group))
            self._backend_for(entries[-1].param.device)  # refuses where Triton cannot run
        # Everything checked out: commit (a state dict that exists keeps its identity).
        for p, new in staged.values():
            current = state.get(p)
            if current is None:
                state[p] = new
            elif current is not new:
                current.clear()
                current.update(new)
        self._edited.clear()
        return entries

    def _plan(self, entries: list) -> list:
        """Group verified entries into launch buckets (cached under their plan key)."""
        buckets: dict[tuple, Bucket] = {}
        groups = self.param_groups
        for j, e in enumerate(entries):
            group = groups[e.group]
            local = e.param
            state_sr = bool(group["stochastic_rounding"]) and e.exp_avg.dtype == torch.bfloat16
            param_sr = (bool(group["param_stochastic_rounding"]) and e.master is None
                        and local.dtype == torch.bfloat16)
            backend = self._backend_for(local.device)
            key = (local.device, local.dtype, e.exp_avg.dtype, e.master is not None, backend,
                   state_sr, param_sr, group["seed"] if state_sr or param_sr else 0)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(local.device, local.dtype, e.exp_avg.dtype,
                                          e.master is not None, state_sr, param_sr)
            b.index.append(j)
            b.has_copies = b.has_copies or e.writeback is not None
            b.params.append(local)
            b.masters.append(e.master)
            b.sources.append(e.source)
            b.exp_avgs.append(e.exp_avg)
            b.exp_avg_sqs.append(e.exp_avg_sq)
            b.steps.append(e.step)
            b.groups.append(e.group)
            if state_sr or param_sr:
                ordinal = self._ordinal(group)
                b.keys.append(stream_key(group["seed"], ordinal, e.position,
                                         shard_offset(e.source),
                                         self._slot(ordinal, e.position, e.source)))
            else:
                b.keys.append(0)
            b.names.append(self._param_name(e.group, e.source))
        for k, b in buckets.items():
            b.whole = len(buckets) == 1
            if self.telemetry_enabled:
                b.telemetry = torch.zeros(len(b.params), 5, device=b.device)
            if k[4] == "triton":
                from .triton_backend import triton_step  # not at import: Triton may be absent
                self._triton_step = triton_step
                b.tickets = torch.zeros(len(b.params), dtype=torch.int32, device=b.device)
        return [(k[4], b) for k, b in buckets.items()]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Everything is checked before anything changes (plan.py): a refused step leaves
        params, grads and state as they were."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.no_grad(), set as torch.no_grad sets it: the context manager (or decorator)
        # costs ~2 us per step, the flat path's whole budget is 30 us (perf/bench_host.py)
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step()
        finally:
            torch._C._set_grad_enabled(prev)
        return loss

    def _step(self) -> None:
        self._check_groups()
        lists = list(map(_PARAMS, self.param_groups))
        params = list(chain.from_iterable(lists))
        grads = list(map(_GRAD, params))
        if all(map(is_not, grads, repeat(None))):
            sel = None
        else:  # params without a grad are skipped, as torch does
            sel = tuple(compress(range(len(params)), map(is_not, grads, repeat(None))))
            if not sel:
                if self._edited:  # no grads, but an option edit to apply to the state
                    self._entries([])
                return
            params = [params[j] for j in sel]
            grads = [grads[j] for j in sel]
        # The plan for this set of params (and groups); the guard then checks that everything
        # the plan trusts still holds (Note [guard] in guard.py).
        key = (tuple(map(id, params)), tuple(map(len, lists)), sel, self._state_version)
        plan = self._plans.get(key)
        reused = None if plan is None else plan.guard.reuse(self.state, params, grads)
        if reused is None:
            entries = self._entries(self._pending())
            plan = self._plans[key] = _Plan(self._plan(entries), entries, self.state)
            self._plans.move_to_end(key)
            if len(self._plans) > 64:  # as many as the table cache: ZeRO-3 sub-groups
                self._plans.popitem(last=False)
            grads = [e.grad for e in entries]
            special = {j: (e.param if e.writeback is not None else None, e.grad_out)
                       for j, e in enumerate(entries)
                       if e.writeback is not None or e.grad_out is not None}
        else:
            self._plans.move_to_end(key)
            grads, special = reused
        key = (key, plan.serial)
        groups = self.param_groups
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for i, (backend, b) in enumerate(plan.buckets):
            b.bind(grads, special)
            if backend == "triton":
                used = self._triton_step(b, (key, i), groups, self._tables, self._hyper_dev,
                                         grad_scale=grad_scale, found_inf=found_inf,
                                         snr_threshold=self.snr_threshold)
                if used is not None:  # captured in a CUDA graph: Note [graph buffers]
                    self._graph_buffers.append(used)
            else:
                torch_step(b, groups, grad_scale=grad_scale,
                           found_inf=found_inf, snr_threshold=self.snr_threshold)
            b.release()  # the grads belong to the user (zero_grad frees them)
        for j, (work, grad_out) in special.items():
            e = plan.entries[j]
            if work is not None:  # a non-dense param stepped through a working copy
                e.writeback.copy_(work)
            if grad_out is not None and grad_scale is not None:
                # the unscaled grad (Note [amp] in the kernel), where the user's grad can hold
                # it; a grad that cannot (expanded, negative bit, no storage) is replaced by
                # the unscaled copy
                if P.writes_back_in_place(grad_out):
                    grad_out.copy_(grads[j])
                elif e.source.grad is grad_out:
                    e.source.grad = grads[j]
        if self.telemetry_enabled:
            # DeepSpeed steps one group (or ZeRO-3 sub-group) per call: keep every recent plan
            # so telemetry() reports each parameter's latest step, not only the last call's.
            self._tele_plans[key] = plan.buckets
            self._tele_plans.move_to_end(key)
            if len(self._tele_plans) > 64:
                self._tele_plans.popitem(last=False)

    def telemetry(self, reduce: bool = False) -> dict[str, dict[str, Tensor]]:
        """Per-parameter statistics of each parameter's latest step, as device tensors (no host
        sync):
        ``{name: {grad_sq_sum, update_sq_sum, update_abs_max, nonfinite_grads, high_snr_count,
        numel, grad_norm, update_rms, high_snr_fraction}}`` where the update is
        u = m_hat / (sqrt(v_hat) + eps) before lr (|u| <= 1 with tied betas).

        ``reduce=True`` combines the per-rank values of sharded params (FSDP, ZeRO) over the
        default process group with one all-gather (a collective: call it on every rank).
        ``tiedadam.optim.telemetry.to_floats`` flattens the result for loggers."""
        if not self.telemetry_enabled:
            raise RuntimeError("telemetry is off: construct TiedAdamW(..., telemetry=True)")
        from .telemetry import readout, replication
        latest = {}  # id(param) -> (name, row tensor, numel, replication); newest plan wins
        for plan in self._tele_plans.values():
            for _, b in plan:
                for i, src in enumerate(b.sources):
                    latest[id(src)] = (b.names[i], b.telemetry[i], b.params[i].numel(),
                                       replication(src))
        if not latest:
            return {}
        order = [id(p) for g in self.param_groups for p in g["params"] if id(p) in latest]
        order += [k for k in latest if k not in set(order)]  # swapped-out (DeepSpeed) groups
        names, seen = [], {}
        for k in order:  # DeepSpeed swaps one-group lists in: fallback names can repeat
            n = latest[k][0]
            seen[n] = seen.get(n, 0) + 1
            names.append(n if seen[n] == 1 else f"{n}#{seen[n] - 1}")
        numels = [latest[k][2] for k in order]
        reps = [latest[k][3] for k in order]
        rows = [latest[k][1] for k in order]
        device = rows[0].device
        return readout(names, torch.stack([r.to(device) for r in rows]),
                       upload(torch.tensor(numels, dtype=torch.float32), device),
                       reduce=reduce, replicas=upload(torch.tensor(reps, dtype=torch.float32),
                                                      device))
