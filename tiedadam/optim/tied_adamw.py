"""TiedAdamW: AdamW with beta1 = beta2 = beta, as a torch.optim.Optimizer.

This module keeps the torch.optim surface: construction, param groups, state, state_dict and
load_state_dict, and ``step()`` as a short pipeline (docs/design.md §2):

    groups checked (group_rules.py) -> step plan looked up or built (step_plan.py: guard.py,
    verify.py, buckets) -> each bucket's backend steps it (triton_backend.py, torch_backend.py)
    -> the step's inputs finished (working copies written back, unscaled grads) -> telemetry
    recorded (telemetry.py)
"""

from __future__ import annotations

from itertools import chain, compress, repeat
from operator import attrgetter, is_not, itemgetter
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _compat
from .._compat import local_tensor
from ..kernels.runtime import triton_unavailable_reason
from . import checkpoint, clipping
from . import group_rules as R
from .backends import Backends
from .step_plan import StepPlans, verify_step
from .telemetry import CLIP_ENTRY, TelemetryLog

_PARAMS = itemgetter("params")
_GRAD = attrgetter("grad")


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
        max_grad_norm: clip the grads by their global 2-norm inside the step, as
            ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` before the update:
            g ← g · min(1, max_grad_norm / (‖g‖ + 1e-6)), ‖g‖ over every grad the step updates
            (all groups, after AMP's unscaling). The norm is taken on the device and the
            update kernel applies the coefficient: ``p.grad`` is left as given (unscaled under
            AMP, never clipped). ``last_grad_norm`` holds the norm (a device tensor); a
            non-finite norm skips the step like AMP's found_inf (nothing changes, the step
            is not counted). Default None (no clipping). Settable between steps.
        norm_process_group: with FSDP1 (flat params), the process group the params are
            sharded over (``model.process_group``): the norm's partial sums are all-reduced
            over it. DTensor params (FSDP2) need nothing: their mesh is used.
        adam_w_mode, torch_adam, bias_correction: keys of DeepSpeed configs written for its
            Adam/AdamW; ``adam_w_mode`` and ``bias_correction`` must be True (decoupled weight
            decay, bias-corrected moments), ``torch_adam`` is ignored.
        amsgrad, fused, foreach, differentiable: keys of torch.optim.AdamW configs;
            ``amsgrad`` and ``differentiable`` must be False, ``fused``/``foreach`` are
            ignored (TiedAdamW's step is its own fused kernel).

    Every option except the telemetry ones and ``backend`` is also a param-group key (as torch
    keeps ``foreach``/``fused``), so state dicts, deepcopy and pickling carry them. Each step
    verifies every parameter's grad and state before anything changes (Note [what the kernel may
    trust] in verify.py): inputs either work as in torch.optim.AdamW or raise.

    State per parameter (torch's names): ``step`` (fp32 scalar on the parameter's device),
    ``exp_avg``, ``exp_avg_sq`` (fp32 by default, also for bf16/fp16 parameters; math is fp32,
    fp64 for fp64 parameters), and ``master_param`` with master weights.
    """

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, beta: Any = R.UNSET,
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, betas: Any = None,
                 backend: str = "auto", master_weights: bool = False,
                 state_dtype: torch.dtype | str | None = None, stochastic_rounding: bool = True,
                 param_stochastic_rounding: bool = False, seed: int | None = None,
                 capturable: bool = False, maximize: bool = False, telemetry: bool = False,
                 snr_threshold: float = 0.5, names: list[str] | None = None,
                 adam_w_mode: bool = True, torch_adam: bool | None = None,
                 amsgrad: bool = False, bias_correction: bool = True, fused: bool | None = None,
                 foreach: bool | None = None, differentiable: bool = False,
                 max_grad_norm: float | None = None, norm_process_group: Any = None):
        self.backend = R.check_backend(backend)
        self.max_grad_norm = max_grad_norm  # checked by the property
        clipping.check_group(norm_process_group)
        self._norm_group = norm_process_group
        self.last_grad_norm: Tensor | None = None
        if backend == "triton":
            reason = triton_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"backend='triton' cannot run here: {reason}")
        R.check_config_keys(adam_w_mode, torch_adam, amsgrad, bias_correction, fused, foreach,
                            differentiable)
        if seed is None:
            seed = torch.initial_seed()
        defaults = dict(lr=lr, beta=R.resolve_beta(beta, betas, ""), eps=eps,
                        weight_decay=weight_decay, capturable=bool(capturable),
                        maximize=maximize, master_weights=master_weights,
                        state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                        param_stochastic_rounding=param_stochastic_rounding, seed=seed)
        R.check_group(defaults, "")  # normalises in place (betas, state_dtype, seed)
        self._set_options(telemetry, snr_threshold)
        self._clip = self._clip_checked = None
        self._rules = R.GroupRules()
        self._backends = Backends(self.backend)
        self._reset_caches()
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
        self._plans = StepPlans()
        self._telemetry = TelemetryLog()
        self._rules.reset()
        self._backends.reset()  # a Triton backend keeps its CUDA-graph buffers

    def _invalidate(self) -> None:
        """Forget cached plans and tables (param set, state tensors or options changed)."""
        if hasattr(self, "_plans"):
            self._state_version += 1
            self._plans.drop()
            self._backends.reset()

    # Options that are not per-group hyperparameters travel with the object (deepcopy, pickle);
    # the per-group ones (state_dtype, seed, master_weights, ...) live in defaults and groups,
    # as torch keeps foreach/fused/capturable, so state_dict() round trips carry them too.
    _INSTANCE_OPTIONS = ("backend", "telemetry_enabled", "snr_threshold", "_names",
                         "_max_grad_norm")  # (a process group does not pickle: not copied)

    @property
    def max_grad_norm(self) -> float | None:
        """The clipping bound (None: no clipping); may be changed between steps."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        value = clipping.check_max_grad_norm(value)
        if value is not None and getattr(self, "_in_deepspeed_engine", False):
            raise ValueError(clipping.deepspeed_refusal(value))
        self._max_grad_norm = value

    def _settle(self) -> None:
        """What is saved is what the next step would use: beta/betas edits resolved, option
        edits applied to the state (Note [what the kernel may trust], 6, in verify.py)."""
        for gi, group in enumerate(self.param_groups):
            self._rules.sync_beta(group, f"param_groups[{gi}]: ")
        if self._rules.check_options(self.param_groups):
            self._invalidate()
        self._commit_option_edits(every_group=True)

    def _commit_option_edits(self, every_group: bool = False) -> None:
        verify_step(self.param_groups, self.state, self._rules, [], self._backends,
                    every_group)

    def state_dict(self) -> dict:
        self._settle()
        return super().state_dict()

    def __getstate__(self) -> dict:
        self._settle()
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._INSTANCE_OPTIONS if k in self.__dict__})
        return state

    @property
    def state_dtype(self):
        """The default group's state dtype: torch.float32, torch.bfloat16 or "ratio8" (groups
        may override it; stored by name)."""
        return R.check_state_dtype(self.defaults["state_dtype"])

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
            group["beta"] = R.resolve_beta(group.pop("beta", R.UNSET),
                                           group.pop("betas", None), where)
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        R.check_group(group, where)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        R.check_params(params, where)
        group["params"] = params
        super().add_param_group(R.TiedGroup(group))
        self._rules.added(self.param_groups[-1])
        self._invalidate()

    def __setstate__(self, state: dict) -> None:
        # Also called by Optimizer.load_state_dict with the loaded groups, and by deepcopy and
        # unpickling with what __getstate__ gave.
        super().__setstate__(state)
        self.param_groups[:] = [g if isinstance(g, R.TiedGroup) else R.TiedGroup(g)
                                for g in self.param_groups]
        d = self.__dict__
        d.setdefault("backend", "auto")
        d.setdefault("telemetry_enabled", False)
        d.setdefault("snr_threshold", 0.5)
        d.setdefault("_max_grad_norm", None)
        d.setdefault("_norm_group", None)
        d.setdefault("last_grad_norm", None)
        d.setdefault("_clip", None)
        self._clip_checked = None
        if "_rules" not in d:  # a copy or an unpickled optimizer (a load keeps its own)
            self._rules = R.GroupRules()
            self._backends = Backends(self.backend)
        for k, v in R.OPTION_DEFAULTS.items():  # pickles from before these were group options
            self.defaults.setdefault(k, v)
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]: "
            for k, v in self.defaults.items():
                if k not in ("beta", "betas"):
                    group.setdefault(k, v)
            # Groups from torch.optim.AdamW carry only betas: derive (and check) beta.
            group["beta"] = R.resolve_beta(group.get("beta", R.UNSET), group.get("betas"),
                                           where)
            R.check_group(group, where)
        self._reset_caches()
        for g in self.param_groups:  # the options the loaded (or copied) state was made under
            self._rules.added(g)

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
        params; fp64 for fp64 params); master weights are made or dropped as the group says
        (checkpoint.py).
        """
        groups, params_of, own, rest = checkpoint.split(state_dict, self.param_groups)
        super().load_state_dict({**state_dict, "param_groups": groups, "state": rest})
        checkpoint.restore(self.state, own, params_of, groups)
        self._invalidate()

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Everything is checked before anything changes (verify.py): a refused step leaves
        params, grads and state as they were."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # no_grad, set as torch.no_grad sets it: the context manager (or decorator) costs
        # ~2 us per step, the flat path's whole budget is 30 us (perf/bench_host.py)
        prev = torch.is_grad_enabled()
        _compat.set_grad_enabled(False)
        try:
            self._step()
        finally:
            _compat.set_grad_enabled(prev)
        return loss

    def _step(self) -> None:
        groups = self.param_groups
        if self._rules.check(groups):  # an option edit: the plans were made for the old value
            self._invalidate()
        lists = list(map(_PARAMS, groups))
        params = list(chain.from_iterable(lists))
        grads = list(map(_GRAD, params))
        if all(map(is_not, grads, repeat(None))):
            sel = None
        else:  # params without a grad are skipped, as torch does
            sel = tuple(compress(range(len(params)), map(is_not, grads, repeat(None))))
            if not sel:
                if self._rules.edited:  # no grads, but an option edit for the state
                    self._commit_option_edits()
                if self._max_grad_norm is not None:  # the norm of no grads: 0, as torch's
                    # (with norm_process_group this rank joins the others' reduction)
                    norm = clipping.no_grad_norm(params, self._norm_group)
                    self.last_grad_norm = norm
                    self._clip = clipping.coefficients(norm, self._max_grad_norm)
                return
            params = [params[j] for j in sel]
            grads = [grads[j] for j in sel]
        # The plan for this set of params (and groups), if its guard still holds (Note [guard]
        # in guard.py); else verified and built anew.
        key = (tuple(map(id, params)), tuple(map(len, lists)), sel, self._state_version)
        if self._max_grad_norm is not None and self._norm_group is None and (
                key != self._clip_checked):  # before anything changes
            clipping.check_not_fsdp1(params)
            self._clip_checked = key
        found = self._plans.reuse(key, self.state, params, grads)
        if found is None:
            found = self._plans.build(key, groups, self.state, self._rules, self._backends,
                                      self.telemetry_enabled, self._param_name)
        plan, inputs = found
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        clip = None
        if self._max_grad_norm is not None:  # Note [global norm] in clipping.py
            norm = clipping.global_norm([e.param for e in plan.entries], inputs.grads,
                                        grad_scale, self._norm_group)
            clip = clipping.coefficients(norm, self._max_grad_norm)
            self.last_grad_norm, self._clip = norm, clip
        for i, (backend, b) in enumerate(plan.buckets):
            b.bind(inputs)
            self._backends[backend].step(b, (key, plan.serial, i), groups, grad_scale,
                                         found_inf, self.snr_threshold,
                                         None if clip is None else clip.to(b.device))
            b.release()  # the grads belong to the user (zero_grad frees them)
        inputs.finish(plan.entries, grad_scale)
        if self.telemetry_enabled:
            self._telemetry.record((key, plan.serial), plan.buckets)

    def telemetry(self, reduce: bool = False) -> dict[str, dict[str, Tensor]]:
        """Per-parameter statistics of each parameter's latest step, as device tensors (no host
        sync):
        ``{name: {grad_sq_sum, update_sq_sum, update_abs_max, nonfinite_grads, high_snr_count,
        numel, grad_norm, update_rms, high_snr_fraction}}`` where the update is
        u = m_hat / (sqrt(v_hat) + eps) before lr (|u| <= 1 with tied betas).

        ``reduce=True`` combines the per-rank values of sharded params (FSDP, ZeRO) over the
        default process group with one all-gather (a collective: call it on every rank).
        ``tiedadam.optim.telemetry.to_floats`` flattens the result for loggers.

        With ``max_grad_norm`` the grad fields describe the clipped grad, and one more entry,
        ``"(clip)"``, holds ``grad_norm`` (the global norm before clipping, already reduced
        over the ranks), ``clip_coef`` and ``skipped`` (1.0 when the norm was not finite)."""
        if not self.telemetry_enabled:
            raise RuntimeError("telemetry is off: construct TiedAdamW(..., telemetry=True)")
        out = self._telemetry.read(self.param_groups, reduce)
        if self._max_grad_norm is not None and self._clip is not None:
            out[CLIP_ENTRY] = {"grad_norm": self.last_grad_norm, "clip_coef": self._clip[0],
                               "skipped": self._clip[1]}
        return out
