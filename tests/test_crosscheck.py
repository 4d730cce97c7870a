"""Randomized cross-check against torch.optim.AdamW(betas=(b, b), foreach=False).

Each case draws a model (0-dim, empty, odd, multi-chunk tensors; fp32, fp64 and bf16; dense,
transposed, channels_last and non-dense params; grads in other layouts), 1-3 param groups, and a
script of steps with edits between them (lr, beta/betas, eps, weight_decay), a state_dict
save -> load into a fresh optimizer, AMP steps with a scale and injected infs, and invalid
edits. After every action the case either matches the reference within the dtype's tolerance
or was refused with an exception and nothing changed. Seeded per run; a failure prints the
case's seed, and ``TIEDADAM_CROSSCHECK_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import io
import math
import os
import random

import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw as K

N_CASES = int(os.environ.get("TIEDADAM_CROSSCHECK_CASES", "240"))
TRITON_EVERY = 4  # every 4th case runs the Triton kernel (interpreter); the others torch's path

# Tolerances by param dtype against the reference (which runs in the param dtype for fp32 and
# fp64, and in fp32 from the same bf16 starting point for bf16 params).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14),
       torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-6)}


def _shapes(rng: random.Random):
    pool = [(), (0,), (1,), (3,), (7, 5), (33,), (2, 3, 4, 5), (6, 10), (129,)]
    shapes = rng.sample(pool, rng.randint(1, 4))
    if rng.random() < 0.05:
        shapes.append((K.CHUNK + 5,))  # more than one chunk
    return shapes


def _make_param(shape, dtype, layout, gen):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "transposed" and t.dim() == 2:
        t = t.t().contiguous().t()
    elif layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "strided" and t.dim() == 2 and t.numel() > 1:
        big = torch.zeros(shape[0], shape[1] * 2, dtype=dtype)
        big[:, ::2] = t
        t = big[:, ::2]  # a non-dense view
    return t


def _twin(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


class Case:
    def __init__(self, seed: int):
        self.seed = seed
        rng = self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.backend = "triton" if seed % TRITON_EVERY == 0 else "auto"
        self.dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
        ref_dtype = torch.float32 if self.dtype == torch.bfloat16 else self.dtype
        shapes = _shapes(rng)
        layouts = [rng.choice(["plain", "plain", "transposed", "channels_last", "strided"])
                   for _ in shapes]
        self.ours = [torch.nn.Parameter(_make_param(s, self.dtype, lay, self.gen))
                     for s, lay in zip(shapes, layouts)]
        self.theirs = [torch.nn.Parameter(_twin(p.detach()).to(ref_dtype)) for p in self.ours]
        n_groups = rng.randint(1, min(3, len(shapes)))
        cut = sorted(rng.sample(range(1, len(shapes)), n_groups - 1)) if n_groups > 1 else []
        bounds = [0] + cut + [len(shapes)]
        self.hyper = [dict(lr=rng.choice([1e-3, 1e-2, 0.1]), beta=rng.choice([0.0, 0.5, 0.9, 0.95]),
                           eps=rng.choice([0.0, 1e-8, 1e-3]),
                           weight_decay=rng.choice([0.0, 0.01, 0.1]))
                      for _ in range(n_groups)]
        self.slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        self.opt = self._new_opt()
        self.ref = torch.optim.AdamW(
            [{"params": self.theirs[s], "lr": h["lr"], "betas": (h["beta"], h["beta"]),
              "eps": h["eps"], "weight_decay": h["weight_decay"]}
             for s, h in zip(self.slices, self.hyper)], foreach=False)

    def _new_opt(self):
        groups = []
        for s, h in zip(self.slices, self.hyper):
            g = {"params": self.ours[s], "lr": h["lr"], "eps": h["eps"],
                 "weight_decay": h["weight_decay"]}
            g["betas" if self.rng.random() < 0.5 else "beta"] = (
                (h["beta"], h["beta"]) if self.rng.random() < 0.5 else h["beta"])
            if "betas" in g and not isinstance(g["betas"], tuple):
                g["betas"] = (g["betas"], g["betas"])
            if "beta" in g and isinstance(g["beta"], tuple):
                g["beta"] = g["beta"][0]
            groups.append(g)
        return TiedAdamW(groups, backend=self.backend)

    # -- actions -----------------------------------------------------------------------------
    def grads(self, scale=1.0, inf=False):
        """Fresh grads in random layouts; ``scale`` multiplies ours (AMP)."""
        for p, q in zip(self.ours, self.theirs):
            if self.rng.random() < 0.15:
                p.grad = q.grad = None  # this param sits the step out
                continue
            g = torch.randn(p.shape, generator=self.gen, dtype=torch.float64).to(p.dtype)
            kind = self.rng.random()
            if kind < 0.1 and p.dim() == 2:
                g = g.t().contiguous().t()
            elif kind < 0.15 and p.numel() > 0:
                g = g.reshape(-1)[:1].reshape(()).expand(p.shape) if p.dim() else g
            q.grad = g.to(q.dtype).clone()
            p.grad = g if scale == 1.0 else (g * scale).to(p.dtype)
            if inf and p.numel() > 0:
                p.grad = p.grad.clone()
                p.grad[(0,) * p.dim()] = float("inf")

    def step(self):
        if self.dtype == torch.bfloat16:  # compare one step from the same bf16 starting point
            for p, q in zip(self.ours, self.theirs):
                q.data.copy_(p.detach().float())
        self.opt.step()
        self.ref.step()

    def amp_step(self, overflow: bool):
        scale = 2.0 ** self.rng.randint(0, 12)
        self.grads(scale, inf=overflow)
        snap = self.snapshot()
        self.opt.grad_scale = torch.tensor(scale)
        self.opt.found_inf = torch.tensor(1.0 if overflow else 0.0)
        try:
            if overflow:
                self.opt.step()
            else:
                self.step()
        finally:
            del self.opt.grad_scale, self.opt.found_inf
        if overflow:  # as torch's fused AdamW: state may be created, nothing stepped
            self.assert_unchanged(snap, new_state_ok=True)

    def edit(self):
        gi = self.rng.randrange(len(self.hyper))
        key = self.rng.choice(["lr", "beta", "betas", "eps", "weight_decay"])
        value = {"lr": self.rng.choice([1e-3, 3e-2]), "beta": self.rng.choice([0.8, 0.9]),
                 "eps": self.rng.choice([1e-8, 1e-6]),
                 "weight_decay": self.rng.choice([0.0, 0.05])}["beta" if key == "betas" else key]
        if key == "betas":
            self.opt.param_groups[gi]["betas"] = (value, value)
        else:
            self.opt.param_groups[gi][key] = value
        ref_key = "betas" if key.startswith("beta") else key
        self.ref.param_groups[gi][ref_key] = (value, value) if ref_key == "betas" else value

    def bad_edit(self):
        gi = self.rng.randrange(len(self.hyper))
        group = self.opt.param_groups[gi]
        key, value = self.rng.choice([("eps", float("nan")), ("weight_decay", -1.0),
                                      ("lr", -0.1), ("betas", (0.9, 0.999)), ("beta", 1.5),
                                      ("maximize", True), ("amsgrad", True)])
        old = {k: group[k] for k in ("eps", "weight_decay", "lr", "beta", "betas", "maximize")}
        group[key] = value
        self.grads()
        snap = self.snapshot()
        with pytest.raises((ValueError, TypeError)):
            self.opt.step()
        self.assert_unchanged(snap)
        group.update(old)
        group.pop("amsgrad", None)

    def reload(self):
        buf = io.BytesIO()
        torch.save(self.opt.state_dict(), buf)
        buf.seek(0)
        self.opt = TiedAdamW(self.ours, backend=self.backend)  # one group: the load restores them
        if len(self.slices) > 1:
            self.opt = TiedAdamW([{"params": self.ours[s]} for s in self.slices],
                                 backend=self.backend)
        self.opt.load_state_dict(torch.load(buf))

    # -- checks ------------------------------------------------------------------------------
    def snapshot(self):
        return ([p.detach().clone() for p in self.ours],
                {id(p): {k: v.clone() for k, v in st.items()} for p, st in self.opt.state.items()})

    def assert_unchanged(self, snap, new_state_ok=False):
        ps, states = snap
        for p, p0 in zip(self.ours, ps):
            assert torch.equal(p, p0), "a refused or skipped step changed a param"
        for p, st in self.opt.state.items():
            if id(p) not in states:
                assert new_state_ok, "a refused step created state"
                assert float(st["step"]) == 0 and not st["exp_avg"].any()
                continue
            for k, v in st.items():
                assert torch.equal(v, states[id(p)][k]), f"state {k} changed"

    def assert_matches(self):
        tol = TOL[self.dtype]
        for i, (p, q) in enumerate(zip(self.ours, self.theirs)):
            torch.testing.assert_close(p.detach().double(), q.detach().to(p.dtype).double(),
                                       **tol, msg=lambda m: f"param {i}: {m}")
            st, rst = self.opt.state.get(p), self.ref.state.get(q)
            if st and rst:
                for k in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(st[k].double(), rst[k].double(), **tol,
                                               msg=lambda m: f"param {i} {k}: {m}")
                assert float(st["step"]) == float(rst["step"])


def run_case(seed: int) -> None:
    c = Case(seed)
    for _ in range(c.rng.randint(2, 5)):
        r = c.rng.random()
        if r < 0.45:
            c.grads()
            c.step()
        elif r < 0.6:
            c.edit()
        elif r < 0.7:
            c.amp_step(overflow=c.rng.random() < 0.5)
        elif r < 0.8 and c.dtype != torch.bfloat16:
            c.reload()
        else:
            c.bad_edit()
        c.assert_matches()
    c.grads()
    c.step()
    c.assert_matches()


def test_randomized_cases_match_torch_or_are_refused():
    fixed = os.environ.get("TIEDADAM_CROSSCHECK_SEED")
    base = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    seeds = [base] if fixed else [base + i for i in range(N_CASES)]
    for seed in seeds:
        try:
            run_case(seed)
        except Exception as e:  # name the case so it can be replayed
            raise AssertionError(f"case seed {seed} failed (replay with "
                                 f"TIEDADAM_CROSSCHECK_SEED={seed}): {type(e).__name__}: {e}") \
                from e
    assert len(seeds) == (1 if fixed else N_CASES) and not math.isnan(base)
