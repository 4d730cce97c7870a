"""Our params beside identical twins for the torch reference, and the snapshots that tell a
refused step changed nothing (docs/design.md §3)."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map


def pair(*shapes, dtype=torch.float32, make=None):
    """Our params and an identical copy for the torch reference."""
    ours = [torch.nn.Parameter(make(s) if make else torch.randn(s, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
                                 .copy_(p.detach())) for p in ours]
    return ours, theirs


def torch_ref(params, lr=0.1, beta=0.9, **kw):
    return torch.optim.AdamW(params, lr=lr, betas=(beta, beta), foreach=False, **kw)


def step_both(opt, ref, ours, theirs, steps=1, before=None):
    """The same fresh grads to both optimizers, then a step of each (``before(i)`` runs after
    the grads of step i are set, before the steps)."""
    for i in range(steps):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        if before is not None:
            before(i)
        opt.step()
        ref.step()


def trained(ps, steps=2, **kw):
    """``TiedAdamW(ps, lr=0.1, beta=0.9, **kw)`` after ``steps`` steps (the plan cached and,
    after the second, its fast check armed), with fresh grads set for the next one."""
    from tiedadam import TiedAdamW
    opt = TiedAdamW(ps, lr=0.1, beta=0.9, **kw)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps, opt


def assert_same_run(opt_a, ps_a, opt_b, ps_b):
    """Params and every state tensor (dtype and bits) of two runs equal."""
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def snapshot(opt, params):
    """Bitwise copies of ``params`` and of their state (step counts included)."""
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state])


def assert_unchanged(opt, params, snap):
    ps, states = snap
    for p, p0 in zip(params, ps):
        assert p.dtype == p0.dtype and torch.equal(p, p0), "a refused step changed a parameter"
    now = [{k: v for k, v in opt.state[p].items()} for p in params if p in opt.state]
    assert len(now) == len(states), "a refused step created or removed state"
    for s, s0 in zip(now, states):
        assert s.keys() == s0.keys(), "a refused step added or removed a state key"
        for k in s0:
            assert s[k].dtype == s0[k].dtype and torch.equal(s[k], s0[k]), \
                f"a refused step changed the state ({k})"


class Wrapped(torch.Tensor):
    """A wrapper tensor subclass (no storage of its own: ``data_ptr()`` is 0) that unwraps in
    every op, as torch's own AdamW steps it."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                   dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.inner if isinstance(x, Wrapped) else x
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
