"""TiedAdamW: AdamW with beta1 = beta2 = beta, as a torch.optim.Optimizer."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..kernels.multi_tensor import TableCache, upload
from ..kernels.runtime import triton_runs_on, triton_unavailable_reason
from . import hyperparams as H
from .bucket import Bucket
from .shards import local_tensor
from .torch_backend import torch_tied_adamw

# State keys this optimizer owns; named as torch.optim.AdamW names them so checkpoints move
# between the two in both directions.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
MASTER_KEY = "master_param"
_UNSET = object()


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
            for exp_avg/exp_avg_sq; bf16 needs beta <= 1 - 2**-8 (Note [bf16 state bound]).
        stochastic_rounding: round bf16 states stochastically (unbiased). Default True; False
            rounds to nearest (for ablations).
        param_stochastic_rounding: round bf16 params written without master weights
            stochastically. Default False (round to nearest).
        seed: key of the rounding RNG. Default: ``torch.initial_seed()``, so
            ``torch.manual_seed`` makes runs reproducible (no global RNG state is consumed).
        capturable: keep everything the step reads on the device (lr as a device tensor may
            change between CUDA-graph replays). Group key, as in torch.
        telemetry: compute per-parameter update statistics in the same kernel pass, read with
            ``telemetry()`` (no host sync until asked). Off by default (compiled out).
        snr_threshold: |m_hat|/sqrt(v_hat) above which an element counts as high
            signal-to-noise in the telemetry, in [0, 1). Default 0.5.
        names: parameter names for the telemetry, in parameter order (or pass
            ``model.named_parameters()`` as params, or use ``from_named_parameters``).

    State per parameter (torch's names): ``step`` (fp32 scalar on the parameter's device),
    ``exp_avg``, ``exp_avg_sq`` (fp32 by default, also for bf16/fp16 parameters; math is always
    fp32), and ``master_param`` with master weights.
    """

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, beta: Any = _UNSET,
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, betas: Any = None,
                 backend: str = "auto", master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = True,
                 param_stochastic_rounding: bool = False, seed: int | None = None,
                 capturable: bool = False, telemetry: bool = False, snr_threshold: float = 0.5,
                 names: list[str] | None = None):
        self.backend = H.check_backend(backend)
        if backend == "triton":
            reason = triton_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"backend='triton' cannot run here: {reason}")
        H.check_lr(lr)
        H.check_eps(eps)
        H.check_weight_decay(weight_decay)
        beta = self._resolve_beta(beta, betas, "")
        self.state_dtype = H.check_state_dtype(state_dtype)
        H.check_beta_for_state(beta, self.state_dtype)
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.param_stochastic_rounding = bool(param_stochastic_rounding)
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2 ** 63)
        self._generators: dict = {}
        self._hyper_dev: dict = {}
        self.telemetry_enabled = bool(telemetry)
        if not 0.0 <= float(snr_threshold) < 1.0:
            raise ValueError(f"Invalid snr_threshold={snr_threshold}: |m_hat|/sqrt(v_hat) lies in "
                             f"[0, 1] with tied betas, so the threshold must be in [0, 1)")
        self.snr_threshold = float(snr_threshold)
        self._tele_plans: OrderedDict = OrderedDict()  # recently stepped plans (telemetry)
        defaults = dict(lr=lr, beta=beta, betas=(beta, beta), eps=eps,
                        weight_decay=weight_decay, capturable=bool(capturable))
        self._state_version = 0
        self._plans: OrderedDict = OrderedDict()
        self._tables = TableCache()
        self._beta_seen: dict[int, float] = {}
        super().__init__(params, defaults)
        if names is not None:
            flat = [p for g in self.param_groups for p in g["params"]]
            if len(names) != len(flat):
                raise ValueError(f"names has {len(names)} entries for {len(flat)} parameters")
            self._names = {id(p): n for p, n in zip(flat, names)}
        # torch.amp.GradScaler then hands us grad_scale/found_inf instead of unscaling the
        # grads in a separate pass; the kernel unscales and skips non-finite steps itself.
        self._step_supports_amp_scaling = True

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
            beta = self._resolve_beta(group.get("beta", _UNSET), group.get("betas"), where)
        else:
            beta = self.defaults["beta"]
        H.check_beta_for_state(beta, self.state_dtype, where)
        group["beta"], group["betas"] = beta, (beta, beta)
        for k in ("lr", "eps", "weight_decay"):
            if k in group:
                getattr(H, f"check_{k}")(group[k], where)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
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
                if not local_tensor(p).is_contiguous():
                    raise ValueError(f"{where}params[{i}] is not contiguous (strides "
                                     f"{p.stride()}): TiedAdamW updates params as flat memory; "
                                     f"make the parameter contiguous")
        group["params"] = params
        super().add_param_group(group)
        self._invalidate()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Groups from torch.optim.AdamW carry only betas: derive (and check) beta.
        for i, group in enumerate(self.param_groups):
            beta = self._resolve_beta(group.get("beta", _UNSET), group.get("betas"),
                                      f"param_groups[{i}]: ")
            group["beta"], group["betas"] = beta, (beta, beta)
        self.__dict__.setdefault("_state_version", 0)
        self.__dict__.setdefault("_plans", OrderedDict())
        self.__dict__.setdefault("_tables", TableCache())
        self.__dict__.setdefault("_beta_seen", {})
        self.__dict__.setdefault("_generators", {})
        self.__dict__.setdefault("_tele_plans", OrderedDict())
        self.__dict__.setdefault("telemetry_enabled", False)
        self.__dict__.setdefault("_hyper_dev", {})
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("state_dtype", torch.float32)
        for group in self.param_groups:
            group.setdefault("capturable", False)
        self._invalidate()

    def _invalidate(self) -> None:
        """Forget cached plans and tables (param set or state tensors changed)."""
        if hasattr(self, "_plans"):
            self._state_version += 1
            self._plans.clear()
            self._tables.clear()

    def _sync_beta(self, group: dict, where: str) -> None:
        """Keep ``beta`` and ``betas`` in step when a scheduler or the user edits one of them.

        The value seen at the last step (kept outside the group, so state_dict stays clean)
        tells which of the two was edited.
        """
        beta, betas = group["beta"], tuple(group["betas"])
        if betas[0] != betas[1]:
            H.tied_beta_from_betas(betas, where)  # raises the untied-betas error
        if betas[0] == beta:
            return
        seen = self._beta_seen.get(id(group))
        if beta == seen:  # betas was edited
            beta = H.check_beta(betas[0], where)
        elif betas[0] == seen:  # beta was edited
            beta = H.check_beta(beta, where)
        else:
            raise ValueError(f"{where}beta={beta} and betas={betas} disagree: set one of them "
                             f"(TiedAdamW keeps betas == (beta, beta))")
        H.check_beta_for_state(beta, self.state_dtype, where)
        group["beta"], group["betas"] = beta, (beta, beta)

    # ------------------------------------------------------------------ state
    def _init_state(self, p: Tensor) -> None:
        state = self.state[p]
        local = local_tensor(p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype,
                                            memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype,
                                               memory_format=torch.preserve_format)
        self._init_master(p)

    def _init_master(self, p: Tensor) -> None:
        if self.master_weights and p.dtype != torch.float32 and MASTER_KEY not in self.state[p]:
            self.state[p][MASTER_KEY] = p.detach().to(torch.float32, copy=True)

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

        Unlike torch's loader, which casts every float state to the param dtype, exp_avg and
        exp_avg_sq keep this optimizer's state dtype (fp32 by default, also for bf16 params).
        """
        # A saved group may lack hyperparameters: torch's FSDP1 optimizer-state conversion drops
        # all keys of a group that is empty on this rank. Keep the current group's values then
        # (torch's own AdamW fails with KeyError: 'lr' at its next step).
        saved_groups = []
        for i, g in enumerate(state_dict["param_groups"]):
            current = self.param_groups[i] if i < len(self.param_groups) else {}
            saved_groups.append({**{k: v for k, v in current.items() if k != "params"}, **g})
        state_dict = {**state_dict, "param_groups": saved_groups}
        for i, g in enumerate(saved_groups):  # refuse before anything changes
            b = self._resolve_beta(g.get("beta", _UNSET), g.get("betas"), f"param_groups[{i}]: ")
            H.check_beta_for_state(b, self.state_dtype, f"param_groups[{i}]: ")
        own = {}
        stripped = {}
        for k, s in state_dict["state"].items():
            own[k] = {n: s[n] for n in STATE_KEYS + (MASTER_KEY,) if n in s}
            stripped[k] = {n: v for n, v in s.items() if n not in own[k]}
        super().load_state_dict({**state_dict, "state": stripped})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        for k, tensors in own.items():
            p = id_map[k]
            state = self.state[p]
            for n, v in tensors.items():
                state[n] = self._cast_loaded(p, n, v)
            if not state:
                del self.state[p]
            elif "exp_avg" in state:
                self._init_master(p)  # a checkpoint without master weights: start from params
        self._invalidate()

    def _cast_loaded(self, p: Tensor, name: str, v: Any) -> Tensor:
        local = local_tensor(p)
        if name == "step":
            v = v if isinstance(v, Tensor) else torch.tensor(float(v))
            return v.detach().to(device=local.device, dtype=torch.float32).clone().reshape(())
        dtype = torch.float32 if name == MASTER_KEY else self.state_dtype
        if hasattr(v, "to_local") or not hasattr(p, "to_local"):
            return v.detach().to(device=p.device, dtype=dtype, copy=True)
        # Plain tensor state for a DTensor param: shard it like the param.
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(v.detach().to(dtype=dtype), p.device_mesh, p.placements)

    # ------------------------------------------------------------------ step
    def _backend_for(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
        if self.backend == "triton" and not triton_runs_on(device):
            raise RuntimeError(f"backend='triton' cannot update tensors on {device}: "
                               f"{triton_unavailable_reason() or 'Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)'}. "
                               f"Use backend='auto' or 'torch' for these parameters.")
        return self.backend

    @staticmethod
    def _check_grad(gi: int, p: Tensor, g: Tensor) -> None:
        """Raise the error that explains why ``g`` cannot be used as the grad of ``p``."""
        name = f"a parameter of param_groups[{gi}] (shape {tuple(p.shape)})"
        if g.is_sparse:
            raise RuntimeError(f"TiedAdamW does not support sparse gradients: {name} has a "
                               f"sparse grad; use dense gradients (e.g. "
                               f"nn.Embedding(sparse=False)) or torch.optim.SparseAdam")
        if g.shape != p.shape or g.dtype != p.dtype:
            raise RuntimeError(f"grad of {name} has shape {tuple(g.shape)} and dtype {g.dtype}; "
                               f"it must match the param ({tuple(p.shape)}, {p.dtype})")
        if g.device != p.device:
            raise RuntimeError(f"grad of {name} is on {g.device}, the param on {p.device}")

    def _plan(self, with_grad: list[tuple[int, Tensor]]):
        """Create missing state and group tensors into launch buckets."""
        for _, p in with_grad:
            if len(self.state[p]) == 0:
                self._init_state(p)
        buckets: dict[tuple, Any] = {}
        for gi, p in with_grad:
            local = local_tensor(p)
            st = self.state[p]
            m = local_tensor(st["exp_avg"])
            master = st.get(MASTER_KEY)
            key = (local.device, local.dtype, m.dtype, master is not None,
                   self._backend_for(local.device))
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(local.device, local.dtype, m.dtype, master is not None)
            b.dtensor = b.dtensor or local is not p
            b.params.append(local)
            b.masters.append(local_tensor(master) if master is not None else None)
            b.sources.append(p)
            b.exp_avgs.append(m)
            b.exp_avg_sqs.append(local_tensor(st["exp_avg_sq"]))
            b.steps.append(st["step"])
            b.groups.append(gi)
            b.names.append(self._param_name(gi, p))
        if self.telemetry_enabled:
            for b in buckets.values():
                b.telemetry = torch.zeros(len(b.params), 5, device=b.device)
        return [(k[4], b) for k, b in buckets.items()]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        with_grad = []
        for gi, group in enumerate(groups):
            where = f"param_groups[{gi}]: "
            self._sync_beta(group, where)
            H.check_lr(group["lr"], where)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                # Checked every step, before anything changes: grads are fresh tensors.
                if g.is_sparse or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    self._check_grad(gi, p, g)
                with_grad.append((gi, p))
        if not with_grad:
            return loss
        key = (tuple(id(p) for _, p in with_grad), self._state_version)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(with_grad)
            if len(self._plans) > 64:  # as many as the table cache: ZeRO-3 sub-groups
                self._plans.popitem(last=False)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for i, (backend, b) in enumerate(plan):
            if backend == "triton":
                from .triton_backend import triton_step
                b.refresh_locals(local_tensor)
                triton_step(b, (key, i), groups, self._tables, self._hyper_dev,
                            seed=self.seed, state_sr=self.stochastic_rounding,
                            param_sr=self.param_stochastic_rounding,
                            grad_scale=grad_scale, found_inf=found_inf,
                            snr_threshold=self.snr_threshold)
            else:
                self._torch_step(b, groups, grad_scale, found_inf)
            if found_inf is not None:  # AMP: a skipped step does not count, on either backend
                inf = found_inf.to(b.device, torch.float32, non_blocking=True)
                torch._foreach_sub_(b.steps, [inf] * len(b.steps))
        self._beta_seen = {id(g): g["beta"] for g in groups}
        if self.telemetry_enabled:
            # DeepSpeed steps one group (or ZeRO-3 sub-group) per call: keep every recent plan
            # so telemetry() reports each parameter's latest step, not only the last call's.
            self._tele_plans[key] = plan
            self._tele_plans.move_to_end(key)
            if len(self._tele_plans) > 64:
                self._tele_plans.popitem(last=False)
        return loss

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

    def _generator(self, device: torch.device) -> torch.Generator:
        """The torch backend's rounding RNG: sequential, seeded once from ``seed`` per device
        (the Triton path's Philox stream is a pure function of seed, step and element)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def _torch_step(self, b, groups, grad_scale, found_inf) -> None:
        b.refresh_locals(local_tensor)
        grads = [local_tensor(s.grad) for s in b.sources]
        torch._foreach_add_(b.steps, 1.0)
        sr = ((self.stochastic_rounding and b.state_dtype == torch.bfloat16)
              or (self.param_stochastic_rounding and b.param_dtype == torch.bfloat16
                  and not b.has_master))
        gen = self._generator(b.device) if sr else None
        for gi in sorted(set(b.groups)):
            idx = [i for i, g in enumerate(b.groups) if g == gi]
            group = groups[gi]
            torch_tied_adamw([b.params[i] for i in idx], [grads[i] for i in idx],
                             [b.exp_avgs[i] for i in idx], [b.exp_avg_sqs[i] for i in idx],
                             [b.masters[i] for i in idx], [b.steps[i] for i in idx],
                             lr=group["lr"], beta=group["beta"], eps=group["eps"],
                             weight_decay=group["weight_decay"], grad_scale=grad_scale,
                             found_inf=found_inf, generator=gen,
                             state_sr=self.stochastic_rounding,
                             param_sr=self.param_stochastic_rounding)
            if b.telemetry is not None:
                from .telemetry import torch_rows
                rows = torch.zeros(len(idx), 5, device=b.device)
                torch_rows(rows, [grads[i] for i in idx], [b.exp_avgs[i] for i in idx],
                           [b.exp_avg_sqs[i] for i in idx], [b.steps[i] for i in idx],
                           beta=group["beta"], eps=group["eps"],
                           snr_threshold=self.snr_threshold, grad_scale=grad_scale)
                b.telemetry[idx] = rows

