"""The step plan: what one ``step()`` launches, built once per layout of params and state and
reused while its guard holds.

A plan is made from the verified entries of a step (verify.py): the launch buckets, one per
(device, param dtype, state dtype, master weights, rounding mode, backend), each holding its
tensors in a fixed order; and the guard (guard.py) that checks, at later steps, that everything
the buckets trust still holds. ``StepPlans`` owns the plans of one optimizer (an LRU keyed by
the step's params and groups), their build, and the rounding stream keys their buckets carry.

Each step also has inputs that are not part of a plan, because they are fresh every step:
``step_inputs.StepInputs`` (made by the build, or by the guard when a plan is reused).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..kernels.layout import TELEMETRY_WIDTH
from . import verify as V
from .bucket import MAX_CACHED, Bucket
from .guard import Guard
from .rng import StreamKeys
from .step_inputs import StepInputs


class StepPlan:
    """The buckets of one step layout and what later steps check before reusing them."""
    _serial = 0

    def __init__(self, buckets: list, entries: list, state):
        self.buckets = buckets  # [(backend name, Bucket)]
        # what later steps reuse: no grads or working copies (they must not outlive the step)
        self.entries = [e._replace(grad=None, user_grad=None,
                                   local=None if e.write_back_to is not None else e.local)
                        for e in entries]
        sharded = any(e.local is not e.param and e.write_back_to is None for e in entries)
        self.guard = Guard(entries, state, sharded)
        StepPlan._serial += 1
        self.serial = StepPlan._serial  # table-cache key: a rebuilt plan never meets old tables


class StepPlans:
    """The plans of one optimizer, their build and cache, and the stream keys of its tensors."""

    def __init__(self):
        self.cache: OrderedDict = OrderedDict()
        self.keys = StreamKeys()
        self.full_checks = 0  # reuses that took the guard's full comparison (diagnostics)

    def reset(self) -> None:
        """After a load: plans go and stream keys are renumbered (as a fresh run numbers)."""
        self.cache.clear()
        self.keys.reset()

    def drop(self) -> None:
        """The plans go (a param set, state tensors or options changed); keys stay."""
        self.cache.clear()

    def reuse(self, key, state, params: list, grads: list):
        """(plan, inputs) if the plan made for ``key`` still holds (Note [guard]), else None."""
        plan = self.cache.get(key)
        if plan is None:
            return None
        inputs = plan.guard.reuse(state, params, grads)
        self.full_checks += plan.guard.took_full
        if inputs is None:
            return None
        self.cache.move_to_end(key)
        return plan, inputs

    def build(self, key, groups: list, state, rules, backends, telemetry: bool,
              name_of) -> tuple:
        """Verify the step in full (verify.py), commit the state it creates or converts, and
        make and cache its plan. Raises before anything changes."""
        entries = verify_step(groups, state, rules, pending(groups), backends)
        plan = StepPlan(self.buckets(entries, groups, backends, telemetry, name_of), entries,
                        state)
        self.cache[key] = plan
        self.cache.move_to_end(key)
        if len(self.cache) > MAX_CACHED:
            self.cache.popitem(last=False)
        inputs = StepInputs([e.grad for e in entries],
                            {j: e.local for j, e in enumerate(entries)
                             if e.write_back_to is not None},
                            {j: e.user_grad for j, e in enumerate(entries)
                             if e.user_grad is not None})
        return plan, inputs

    def buckets(self, entries: list, groups: list, backends, telemetry: bool,
                name_of) -> list:
        """Group verified entries into launch buckets."""
        out: dict[tuple, Bucket] = {}
        for j, e in enumerate(entries):
            group = groups[e.group]
            local = e.local
            state_sr = bool(group["stochastic_rounding"]) and e.exp_avg.dtype in (torch.bfloat16,
                                                                                 torch.int8)
            param_sr = (bool(group["param_stochastic_rounding"]) and e.master is None
                        and local.dtype == torch.bfloat16)
            backend = backends.name_for(local.device)
            key = (local.device, local.dtype, e.exp_avg.dtype, e.master is not None, backend,
                   state_sr, param_sr, group["seed"] if state_sr or param_sr else 0)
            b = out.get(key)
            if b is None:
                b = out[key] = Bucket(local.device, local.dtype, e.exp_avg.dtype,
                                      e.master is not None, state_sr, param_sr)
            b.index.append(j)
            b.has_copies = b.has_copies or e.write_back_to is not None
            b.params.append(local)
            b.masters.append(e.master)
            b.parameters.append(e.param)
            b.exp_avgs.append(e.exp_avg)
            b.exp_avg_sqs.append(e.exp_avg_sq)
            b.steps.append(e.step)
            b.groups.append(e.group)
            b.keys.append(self.keys.key(group, groups, e.position, e.param)
                          if state_sr or param_sr else 0)
            b.names.append(name_of(e.group, e.param))
        for k, b in out.items():
            b.whole = len(out) == 1
            if telemetry:
                b.telemetry = torch.zeros(len(b.params), TELEMETRY_WIDTH, device=b.device)
            if k[4] == "triton":
                b.tickets = torch.zeros(len(b.params), dtype=torch.int32, device=b.device)
        return [(k[4], b) for k, b in out.items()]


def pending(groups: list) -> list:
    """(group, position, param, grad) of every parameter with a grad, after checking each
    grad's kind, shape, dtype and device (errors name the parameter)."""
    out = []
    for gi, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                V.check_grad(gi, i, p, g)
            out.append((gi, i, p, g))
    return out


def verify_step(groups: list, state, rules, pending: list, backends,
                every_group: bool = False) -> list:
    """Every pending parameter verified in full (Note [what the kernel may trust] in
    verify.py): its Entry. Raises before anything changes: state to create (params without
    state) or to convert (option edits, a checkpoint without master weights) is staged,
    verified with the rest and committed once every parameter checked out. After an option
    edit every param of the group with state is converted (as a load would), those without a
    grad too; ZeRO-3 sub-groups, not in the group at this call, convert at their own step.
    ``every_group``: every group's state converted to its group's options, edited or not
    (before a ``state_dict()``: a param moved into a group of other options by
    ``add_param_group`` is saved as the next step will hold it)."""
    staged = {}  # id(param) -> (param, the state dict the step uses in place of its own)
    for gi, group in enumerate(groups):
        if every_group or rules.is_edited(group):
            for i, p in enumerate(group["params"]):
                st = state.get(p)
                if st:
                    V.check_readable(gi, i, p, st)
                    new = V.apply_options(p, st, group)
                    if new is not st:
                        staged[id(p)] = (p, new)
    entries = []
    for gi, i, p, g in pending:
        group = groups[gi]
        st = staged[id(p)][1] if id(p) in staged else state.get(p)
        V.check_readable(gi, i, p, st)
        if not st:
            new = {}
            V.init(p, new, group)
        else:
            new = V.apply_options(p, st, group)
        if new is not st:
            staged[id(p)] = (p, new)
        entries.append(V.entry(gi, i, p, g, new, group))
        backends.name_for(entries[-1].local.device)  # refuses where Triton cannot run
    # Everything checked out: commit (a state dict that exists keeps its identity).
    for p, new in staged.values():
        current = state.get(p)
        if current is None:
            state[p] = new
        elif current is not new:
            current.clear()
            current.update(new)
    rules.edited.clear()
    return entries
