"""The per-step check that lets a cached plan be reused (Note [what the kernel may trust], 4, in
verify.py), written so that the loop over the parameters runs in C.

Note [guard]
------------
A plan made at one step holds the tensors it verified then. Before it is reused, every one of
these must still hold, for every parameter of the step:

* ``optimizer.state[p]`` is the dict the plan saw, with as many keys, and each state role
  (step, exp_avg, exp_avg_sq, master_param) is the tensor object the plan holds;
* the param (its local shard) and every state role have the address, shape, strides, dtype and
  device they had: ``set_``, ``resize_``, ``.data =`` or an in-place view op (``t_``) keep a
  tensor's identity but change these;
* the storage of each of those still holds the bytes it held (Note [storage extents]);
* the grad has the param's shape, dtype and device, and the walk strides (a grad in another
  layout is copied into them for the step, as when the plan was built); it is a plain tensor
  (a subclass goes through the full check, which copies it), without the negative or
  conjugate bit, and lies inside its storage; a DTensor grad has the param's mesh and
  placements.

Any difference sends the step down the full check (verify.py), which explains what is wrong or
builds a new plan. Ids are compared only for objects the plan holds, so no id can have been
reused by another object meanwhile.

Each check is ``list(map(getter, tensors)) == expected``: ``map`` calls the C getter for every
parameter and ``==`` compares the lists, so there is no Python bytecode per parameter; the cost
is the attribute reads themselves (one C call per tensor and fact; perf/bench_host.py measures
the whole), a few times less than the per-parameter Python loop this replaced.

Note [guard fast path]
----------------------
Once the checks above have passed, the guard arms a faster check of the same facts for the
steps that follow (nothing changes in what is checked):

* ``optimizer.state`` and each param's state dict keep their CPython dict version (PEP 509;
  ``_compat.dict_version``, dynamo's): any assignment of another object to a key, any
  key added or removed, changes it. An unchanged version means the same state dicts with the
  same tensor objects in them, without hashing the params (``Tensor.__hash__`` is Python).
* ``_compat.TensorGuards`` (dynamo's C++ tensor check) compares, in one call,
  the Python type, dispatch keys (device type, layout: a sparse grad fails), dtype, device
  index, requires_grad, sizes and strides of the params and state tensors, and then of the
  grads against those of the step that armed it (the walk strides).
* The addresses are still read one by one (``data_ptr``): ``.data =`` and ``set_`` move
  memory without changing anything that check sees.
* Sharded plans (FSDP2, TP): each DTensor param and state keeps the local shard object it had
  (``_compat.LOCAL``, read in C and compared by id), so the checks above, made on those local
  shards, still apply; the grads' local shards are read the same way.
* Extents: the held storages' sizes are compared (Note [storage extents]); each grad's storage
  offset is the one armed and its storage holds the walk's reach from there.
* DTensor grads: each grad's sharding spec (``_compat.SPEC``) is the spec object of the step that armed the check
  (verified then to have the param's mesh and placements). DTensor keeps spec objects in a
  cache shared by the tensors of one sharding (FSDP2 hands every grad the param's own), so
  this is an identity comparison; the plan holds the objects, so no id is reused.

Any miss falls back to the full per-parameter comparison above, which re-arms the fast check
when everything holds. Where torch lacks these functions, or they misbehave, the guard uses the
comparison above only (``USE_FAST_GUARD``; ``_compat.fast_guard_works`` is the self-test run
before the fast check is first armed). The fast check is built from what was just
verified, so it can only be stricter (a requires_grad flip on a param costs one slow step).

Note [storage extents]
----------------------
The kernel reads and writes ``verify.reach_bytes(t)`` bytes of each tensor's storage (verify.py, Note
[what the kernel may trust], 4). A tensor's shape, strides and offset are checked against its
storage whenever torch sets them (views, ``set_``, ``as_strided``), but a storage resized under
it (``untyped_storage().resize_``, what FSDP does to unsharded params) is not. So the plan
holds the storage object of every param and state tensor it walks and records its ``nbytes()``.
Holding the object keeps its memory allocated: a resize frees it and changes ``nbytes()``
(compared every step), and only then can the address be handed to another allocation; a
tensor moved to another storage (``set_``, ``.data =``) changes its address, also compared.
Fresh grads are not held: each grad's storage size is read every step and compared with the
reach the walk needs.
"""

from __future__ import annotations

from itertools import chain, repeat
from operator import add, attrgetter, is_, itemgetter, le, mul

import torch
from torch import Tensor

from .. import _compat
from .._compat import LOCAL as _LOCAL
from .._compat import SPEC as _SPEC
from .._compat import is_dtensor, local_tensor
from .step_inputs import StepInputs
from .verify import MASTER_KEY, layout_grad, walk_reach, work_copy

_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_LAYOUT = attrgetter("layout")
_PTR = Tensor.data_ptr
_STRIDE = Tensor.stride
_DEVICE = Tensor.get_device  # an int (-1 for CPU): the cheap form of .device, which builds an object
_STORAGE = Tensor.untyped_storage
_NBYTES = torch.UntypedStorage.nbytes
_OFFSET = Tensor.storage_offset
_NEG = Tensor.is_neg
_CONJ = Tensor.is_conj
_ROLES = itemgetter("step", "exp_avg", "exp_avg_sq")
_MASTER = itemgetter(MASTER_KEY)

# Note [guard fast path]; off where this torch lacks dynamo's guards (_compat), or when set
# False (the tests and perf/bench_host.py --no-fast-guard take the full comparison this way)
USE_FAST_GUARD = _compat.TensorGuards is not None and _compat.dict_version is not None
_MAX_ARMS = 8  # armed this many times in a row, missing each time: stop (Note [guard fast path])
# the self-test's verdict (_compat.fast_guard_works), None until the fast check is first armed
FAST_GUARD_VERDICT: bool | None = None


def layout(ts: list) -> tuple:
    """(addresses, shapes, strides, dtypes, devices) of ``ts``: what a plan trusts of a role."""
    return (list(map(_PTR, ts)), list(map(_SHAPE, ts)), list(map(_STRIDE, ts)),
            list(map(_DTYPE, ts)), list(map(_DEVICE, ts)))


def _same_layout(ts: list, expected: tuple) -> bool:
    ptrs, shapes, strides, dtypes, devices = expected
    return (list(map(_PTR, ts)) == ptrs and list(map(_SHAPE, ts)) == shapes
            and list(map(_STRIDE, ts)) == strides and list(map(_DTYPE, ts)) == dtypes
            and list(map(_DEVICE, ts)) == devices)


class Guard:
    """What a plan verified when it was built, and the check that it still holds (Note
    [guard]). ``entries`` are the plan's verified entries, in step order."""

    def __init__(self, entries: list, state, sharded: bool):
        self.sharded = sharded
        sources = [e.param for e in entries]
        sts = list(map(state.get, sources))
        self.st_ids = list(map(id, sts))
        self.st_lens = list(map(len, sts))
        self.masters = [j for j, e in enumerate(entries) if e.master is not None]
        held = self._held(sts)
        self.held_ids = list(map(id, held))
        locals_ = list(map(local_tensor, held)) if sharded else held
        self.local_ids = list(map(id, locals_))
        params = list(map(local_tensor, sources)) if sharded else sources
        # One list for every tensor the kernel touches besides the grads: params, then states.
        tensors = params + locals_
        self.layout = layout(tensors)
        # Note [storage extents]: held, so their memory stays theirs while the sizes match
        self.storages = list(map(_STORAGE, tensors))
        self.nbytes = list(map(_NBYTES, self.storages))
        n = len(params)
        _, shapes, _, dtypes, devices = self.layout
        self.shapes, self.dtypes, self.devices = shapes[:n], dtypes[:n], devices[:n]  # grads'
        self.walk = [e.exp_avg.stride() for e in entries]  # every role's walk strides
        # what a grad walked in place needs of its storage, from its offset on (bytes)
        self.itemsizes = [p.element_size() for p in params]
        self.reach = list(map(walk_reach, map(_SHAPE, params), self.walk, self.itemsizes))
        self.copied = [j for j, e in enumerate(entries) if e.write_back_to is not None]
        # DTensor params: the mesh and placements each grad must have (None: a plain param)
        self.meshes = [getattr(s, "device_mesh", None) for s in sources] if sharded else None
        self.placements = ([getattr(s, "placements", None) for s in sources] if sharded
                           else None)
        self.fast = None  # what _arm records for _fast_holds
        self.arms = 0
        self.took_full = False  # the last reuse() went through the full comparison

    def _held(self, sts: list) -> list:
        """The state tensors of ``sts``, flattened: (step, exp_avg, exp_avg_sq) per parameter,
        then the master weights of those that have them. KeyError if one is missing."""
        held = list(chain.from_iterable(map(_ROLES, sts)))
        if self.masters:
            held += map(_MASTER, [sts[j] for j in self.masters])
        return held

    def reuse(self, state, sources: list, grads: list):
        """This step's inputs (``step_plan.StepInputs``: grads in the walk layout, working
        copies, the user's grads that were copied) if everything the plan trusts still holds;
        else None."""
        fast = None if self.fast is None else self._fast_holds(state, grads)
        self.took_full = fast is None
        if fast is not None:
            grads, user_grads = fast, {}
            self.arms = 0
        else:
            checked = self._check(state, sources, grads)
            if checked is None:
                return None
            grads, user_grads = checked
        copies = {j: work_copy(local_tensor(sources[j]), self.walk[j]) for j in self.copied}
        return StepInputs(grads, copies, user_grads)

    def _fast_holds(self, state, grads: list) -> list | None:
        """Note [guard fast path]: the same facts as ``_check``, in a few C calls. The grads as
        the kernel takes them (local shards), or None: then ``_check`` decides."""
        (st, version, sts, versions, dt_objs, dt_local_ids, tensors, tensor_check,
         grad_specs, spec_ids, grad_offsets, grad_check) = self.fast
        if not (state is st and _compat.dict_version(state) == version
                and list(map(_compat.dict_version, sts)) == versions):
            return None
        if dt_objs and list(map(id, map(_LOCAL, dt_objs))) != dt_local_ids:
            return None  # a DTensor's local shard was replaced
        if not (tensor_check.check(*tensors) and list(map(_PTR, tensors)) == self.layout[0]
                and list(map(_NBYTES, self.storages)) == self.nbytes):
            return None
        if grad_specs is not None:
            try:
                if list(map(id, map(_SPEC, grads))) != spec_ids:
                    return None  # another sharding (or a spec the cache made anew)
                grads = list(map(_LOCAL, grads))
            except AttributeError:  # a grad that is not a DTensor
                return None
        if not (grad_check.check(*grads) and list(map(_OFFSET, grads)) == grad_offsets
                and all(map(le, self.need, map(_NBYTES, map(_STORAGE, grads))))):
            return None
        return grads

    def _arm(self, state, sources: list, sts: list, held: list, user_grads: list,
             grads: list) -> None:
        """After ``_check`` passed with grads in the walk layout (``grads``: local shards of
        ``user_grads``): the fast check of what it verified (Note [guard fast path]).
        ``held``: the state tensor objects (DTensors where sharded)."""
        global FAST_GUARD_VERDICT
        self.fast = None
        if not USE_FAST_GUARD or self.arms >= _MAX_ARMS:
            return
        if FAST_GUARD_VERDICT is None:
            try:
                FAST_GUARD_VERDICT = _compat.fast_guard_works()
            except Exception:
                FAST_GUARD_VERDICT = False
        if not FAST_GUARD_VERDICT:
            return
        self.arms += 1
        objs = list(sources) + held  # the same objects while the plan key and versions hold
        dt_objs = [o for o in objs if isinstance(o, Tensor) and is_dtensor(o)]
        tensors = list(map(local_tensor, objs)) if dt_objs else objs  # layout order
        grad_specs = spec_ids = None
        if self.sharded:
            n_dt = sum(map(is_dtensor, user_grads))
            if 0 < n_dt < len(user_grads):
                return  # DTensor and plain grads in one plan: the full comparison only
            if n_dt:
                grad_specs = list(map(_SPEC, user_grads))  # held: their ids stay theirs
                spec_ids = list(map(id, grad_specs))
        offsets = list(map(_OFFSET, grads))
        self.need = [o * k + r for o, k, r in zip(offsets, self.itemsizes, self.reach)]
        tensor_check, grad_check = _compat.tensor_guards(tensors), _compat.tensor_guards(grads)
        if tensor_check is not None and grad_check is not None:
            self.fast = (state, _compat.dict_version(state), sts, list(map(_compat.dict_version, sts)),
                         dt_objs, list(map(id, map(_LOCAL, dt_objs))), tensors, tensor_check,
                         grad_specs, spec_ids, offsets, grad_check)

    def _check(self, state, sources: list, grads: list) -> tuple | None:
        """Note [guard]: (grads in the walk layout, {j: the user's grad} for grads copied into
        it), or None."""
        sts = list(map(state.get, sources))
        if list(map(id, sts)) != self.st_ids or list(map(len, sts)) != self.st_lens:
            return None
        try:
            held = self._held(sts)
        except KeyError:
            return None
        if list(map(id, held)) != self.held_ids:
            return None
        held_objs = held
        sharded = self.sharded
        if sharded:
            held = list(map(local_tensor, held))
            if list(map(id, held)) != self.local_ids:
                return None
        locals_ = list(map(local_tensor, sources)) if sharded else sources
        if not (_same_layout(locals_ + held, self.layout)
                and list(map(_NBYTES, self.storages)) == self.nbytes):
            return None
        given = grads
        if sharded:
            # each grad a DTensor with its param's mesh and placements, or plain for a plain
            # param (Note [what the kernel may trust], 1, in verify.py)
            if (list(map(getattr, grads, repeat("device_mesh"), repeat(None))) != self.meshes
                    or list(map(getattr, grads, repeat("placements"), repeat(None)))
                    != self.placements):
                return None
            grads = list(map(local_tensor, grads))
        if not all(map(is_, map(type, grads), repeat(Tensor))):
            return None  # a subclass (one without storage, a DTensor grad of a plain param):
            # the full check decides
        if (list(map(_SHAPE, grads)) != self.shapes or list(map(_DTYPE, grads)) != self.dtypes
                or list(map(_DEVICE, grads)) != self.devices
                or not all(map(is_, map(_LAYOUT, grads), repeat(torch.strided)))
                or any(map(_NEG, grads)) or any(map(_CONJ, grads))):
            return None  # the full check names the parameter and what is wrong (sparse grads)
        strides = list(map(_STRIDE, grads))
        user_grads = {}
        if strides != self.walk:  # a transposed or expanded grad: copied into the walk layout
            grads = list(grads)
            for j, (s, w) in enumerate(zip(strides, self.walk)):
                if s != w and locals_[j].numel() > 1:
                    grads[j], out = layout_grad(grads[j], locals_[j], w)
                    if grads[j] is None:
                        return None  # outside its storage: the full check names it
                    user_grads[j] = out
        need = map(add, map(mul, map(_OFFSET, grads), self.itemsizes), self.reach)
        try:
            if not all(map(le, need, map(_NBYTES, map(_STORAGE, grads)))):
                return None  # a grad outside its storage: the full check names it
        except (RuntimeError, NotImplementedError):
            return None  # a local shard without storage: the full check copies it
        if not user_grads:
            self._arm(state, sources, sts, held_objs, given, grads)
        return grads, user_grads
