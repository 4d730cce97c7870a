"""Randomized cross-check against torch.optim.AdamW(betas=(b, b), foreach=False).

Each case draws a model (0-dim, empty, odd, multi-chunk tensors; fp32, fp64 and bf16; dense,
transposed, channels_last and non-dense params; grads in other layouts, with the negative bit,
or tensor subclasses without storage), 1-3 param groups, whether it steps as ZeRO-3 does with
sub-groups (each param alone through its group dict), and a script of steps with edits between
them (lr, beta/betas, eps, weight_decay, some as 1-element tensors), steps clipped by
max_grad_norm (against clip_grad_norm_ on the reference), option edits (seed,
rounding flags, master_weights, state_dtype incl. ratio8; some by replacing the group dict with
an edited copy, some followed by a step refused for an invalid value), a state_dict save -> load
into a fresh optimizer, AMP steps with a scale and injected infs, finite grads whose squares
overflow fp32, invalid edits, and storages freed or shrunk under a param, a state tensor or a
grad. After every action the case either matches the
reference within the dtype's tolerance or was refused with an exception and nothing changed.

The reference is torch.optim.AdamW; after an option edit, also a *resumed twin*: the optimizer
saved and loaded into a fresh one right after the edit, stepped with the same grads, which must
match bit for bit (an edit is honoured as a resumed run honours it). Once the edit makes the
math differ from torch's (bf16 moments, master weights), only the twin is compared.
Seeded per run; a failure prints the case's seed, and ``TIEDADAM_CROSSCHECK_SEED=<seed>``
replays it. DTensor placements need a process group: tests/test_fast_path_contract.py and
tests/placement_ranks.py draw those cases on two ranks.
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
from twins import Wrapped

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
        # ZeRO-3 with sub-groups: every step is one call per param, alone in its group, every
        # param with a grad (as flat partitions always have one)
        self.subgroups = rng.random() < 0.15
        self.twin = None  # (params, optimizer) resumed right after an option edit
        self.edit_pending = False  # an option edit that no step has taken yet (the twin,
        # loaded, converted its state at the load; ours converts at its next step)
        self.torch_valid = True  # False once an option edit makes the math differ from torch's
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
    def grads(self, scale=1.0, inf=False, huge=False):
        """Fresh grads in random layouts; ``scale`` multiplies ours (AMP); ``huge``: some
        elements ~1e20, finite, whose square overflows fp32 (v = inf, a zero update in
        torch's AdamW)."""
        for p, q in zip(self.ours, self.theirs):
            if self.rng.random() < 0.15 and not self.subgroups:
                p.grad = q.grad = None  # this param sits the step out
                continue
            g = torch.randn(p.shape, generator=self.gen, dtype=torch.float64)
            if huge and p.numel() > 0 and self.rng.random() < 0.5:
                g.view(-1)[::3] *= 1e20
            g = g.to(p.dtype)  # the reference gets these values too (bf16: as held)
            kind = self.rng.random()
            if kind < 0.1 and p.dim() == 2:
                g = g.t().contiguous().t()
            elif kind < 0.15 and p.numel() > 0:
                g = g.reshape(-1)[:1].reshape(()).expand(p.shape) if p.dim() else g
            q.grad = g.to(q.dtype).clone()  # (a bf16 case: the bf16 values, in fp32)
            ours = g if scale == 1.0 else (g * scale).to(p.dtype)
            if inf and p.numel() > 0:
                ours = ours.clone()
                ours[(0,) * p.dim()] = float("inf")
            if 0.15 <= kind < 0.2:
                ours = torch._neg_view(-ours)  # the memory holds -g
            elif 0.2 <= kind < 0.23:
                ours = Wrapped(ours)  # no storage of its own
            p.grad = ours
        if self.twin is not None:  # the same values, plain
            for p, t in zip(self.ours, self.twin[0]):
                t.grad = None if p.grad is None else torch.empty(
                    p.shape, dtype=p.dtype).copy_(p.grad)

    def _step_ours(self, opt, params):
        if not self.subgroups:
            opt.step()
            return
        lists = [g["params"] for g in opt.param_groups]
        try:
            for gi, group in enumerate(opt.param_groups):
                for p in lists[gi]:
                    for g in opt.param_groups:
                        g["params"] = []
                    group["params"] = [p]
                    opt.step()
        finally:
            for g, ps in zip(opt.param_groups, lists):
                g["params"] = ps

    def step(self):
        if self.dtype == torch.bfloat16:  # compare one step from the same bf16 starting point
            for p, q in zip(self.ours, self.theirs):
                q.data.copy_(p.detach().float())
        self._step_ours(self.opt, self.ours)
        self.ref.step()
        if self.twin is not None:
            self._step_ours(self.twin[1], self.twin[0])
        self.edit_pending = False

    def clip_step(self):
        """A step with max_grad_norm set (bound drawn around the grads' norm, so about half
        the steps clip) against clip_grad_norm_ on the reference's grads. ZeRO-3-style
        sub-group calls take the norm of each call's grads (DeepSpeed refuses max_grad_norm):
        those cases step unclipped."""
        self.grads()
        if self.subgroups:
            self.step()
            return
        n = sum(p.numel() for p in self.ours if p.grad is not None)
        bound = math.sqrt(max(n, 1)) * self.rng.uniform(0.3, 1.7)
        opts = [self.opt] + ([self.twin[1]] if self.twin is not None else [])
        # clip_grad_norm_'s coefficient from the grads as our params hold them (bf16 grads:
        # each tensor's norm in bf16, as torch takes it), applied to the reference's grads
        held = [q.grad.to(self.dtype) for q in self.theirs if q.grad is not None]
        if held:
            coef = (bound / (torch.nn.utils.get_total_norm(held) + 1e-6)).clamp(max=1.0)
            for q in self.theirs:
                if q.grad is not None:
                    q.grad.mul_(coef.to(q.dtype))
        for o in opts:
            o.max_grad_norm = bound
        try:
            self.step()
        finally:
            for o in opts:
                o.max_grad_norm = None

    def amp_step(self, overflow: bool):
        edit_was_pending = self.edit_pending
        scale = 2.0 ** self.rng.randint(0, 12)
        self.grads(scale, inf=overflow)
        snap = self.snapshot()
        opts = [self.opt] + ([self.twin[1]] if self.twin is not None else [])
        for o in opts:
            o.grad_scale = torch.tensor(scale)
            o.found_inf = torch.tensor(1.0 if overflow else 0.0)
        try:
            if overflow:
                self._step_ours(self.opt, self.ours)
                if self.twin is not None:
                    self._step_ours(self.twin[1], self.twin[0])
                self.edit_pending = False
            else:
                self.step()
        finally:
            for o in opts:
                del o.grad_scale, o.found_inf
        if overflow:  # as torch's fused AdamW: state may be created, nothing stepped
            # (an option edit is applied to the state by any step that is not refused, this
            # one too: then the twin comparison checks the state)
            self.assert_unchanged(snap, new_state_ok=True, params_only=edit_was_pending)

    def edit(self):
        gi = self.rng.randrange(len(self.hyper))
        key = self.rng.choice(["lr", "beta", "betas", "eps", "weight_decay"])
        value = {"lr": self.rng.choice([1e-3, 3e-2]), "beta": self.rng.choice([0.8, 0.9]),
                 "eps": self.rng.choice([1e-8, 1e-6]),
                 "weight_decay": self.rng.choice([0.0, 0.05])}["beta" if key == "betas" else key]
        ours = [self.opt] + ([self.twin[1]] if self.twin is not None else [])
        for o in ours:
            if key == "betas":
                o.param_groups[gi]["betas"] = (value, value)
            elif key in ("lr", "eps", "weight_decay") and self.rng.random() < 0.3:
                o.param_groups[gi][key] = torch.tensor(value, dtype=torch.float64)  # 1 element
            else:
                o.param_groups[gi][key] = value
        ref_key = "betas" if key.startswith("beta") else key
        self.ref.param_groups[gi][ref_key] = (value, value) if ref_key == "betas" else value

    def huge_step(self):
        """Finite grads whose squares overflow fp32: as torch's AdamW, never a NaN (but with
        beta = 0, where the next step's v = 0 * inf is NaN in torch's AdamW as here)."""
        if any(h["beta"] == 0.0 for h in self.hyper):
            self.grads()
            return self.step()
        self.grads(huge=True)
        self.step()
        for p in self.ours:
            assert torch.isfinite(p).all(), "finite grads made a non-finite param"

    def edit_then_refused(self):
        """An option edit, then a step refused for an invalid value (in any group), the value
        fixed: the edit survives the refusal (the twin, resumed right after the edit, is
        compared bit for bit at the next step)."""
        self.option_edit()
        self.bad_edit()

    def option_edit(self):
        """An option edited between steps: honoured as a run resumed from a checkpoint that
        holds the new value (the twin is that run). Sometimes by replacing the group dict with
        an edited copy (``param_groups[i] = {**g, key: value}``), which must count as the
        same edit."""
        gi = self.rng.randrange(len(self.hyper))
        keys = ["seed", "stochastic_rounding", "param_stochastic_rounding", "state_dtype"]
        if self.dtype == torch.bfloat16:
            keys.append("master_weights")
        key = self.rng.choice(keys)
        group = self.opt.param_groups[gi]
        value = {"seed": self.rng.randrange(2 ** 31), "state_dtype": self.rng.choice(
            ["float32", "bfloat16", "ratio8"])}.get(key, not group.get(key))
        opts = [self.opt] + ([self.twin[1]] if self.twin is not None else [])
        for o in opts:
            # (not with ZeRO-3-style sub-group calls: they swap the params list a replaced
            # dict shares with the group it copies, which is how a later beta-only or
            # betas-only edit of the copy is told apart; there such an edit is refused with
            # "set one of them")
            if o is self.opt and not self.subgroups and self.rng.random() < 0.3:
                o.param_groups[gi] = {**o.param_groups[gi], key: value}
            else:
                o.param_groups[gi][key] = value
        self.edit_pending = True
        if self.dtype != torch.float64 and (key == "master_weights" or (
                key == "state_dtype" and value != "float32")):
            self.torch_valid = False  # bf16/ratio8 moments or master weights: not torch's math
        if self.twin is None:
            params = [torch.nn.Parameter(_twin(p.detach())) for p in self.ours]
            self.twin = (params, self._load_into(params, self.opt.state_dict()))

    def _load_into(self, params, state_dict):
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        buf.seek(0)
        opt = TiedAdamW([{"params": params[s]} for s in self.slices], backend=self.backend)
        opt.load_state_dict(torch.load(buf))
        return opt

    def resize_refusal(self):
        """A storage freed or shrunk under a param, a state tensor or a grad: refused with
        nothing changed; the storage grown back (as FSDP does), training goes on."""
        self.grads()
        stepped = [p for p in self.ours if p.grad is not None and p.numel() > 0]
        victims = stepped + [v for p in stepped for v in self.opt.state.get(p, {}).values()]
        victims += [p.grad for p in stepped if type(p.grad) is torch.Tensor
                    and not p.grad.is_neg() and 0 not in p.grad.stride()]
        if not victims:
            return
        t = self.rng.choice(victims)
        keep = t.detach().clone()
        snap = self.snapshot()
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        storage.resize_(0 if self.rng.random() < 0.5 else nbytes // 2)
        with pytest.raises(RuntimeError, match="storage"):
            self.opt.step()  # one call: ZeRO-3's per-sub-group calls are separate steps
        storage.resize_(nbytes)
        t.detach().copy_(keep)
        self.assert_unchanged(snap)

    def bad_edit(self):
        gi = self.rng.randrange(len(self.hyper))
        group = self.opt.param_groups[gi]
        key, value = self.rng.choice([("eps", float("nan")), ("weight_decay", -1.0),
                                      ("lr", -0.1), ("betas", (0.9, 0.999)), ("beta", 1.5),
                                      ("maximize", True), ("amsgrad", True),
                                      ("state_dtype", "float16"), ("seed", "x"),
                                      ("eps", torch.tensor([1e-8, 1e-8]))])
        old = {k: group[k] for k in ("eps", "weight_decay", "lr", "beta", "betas", "maximize",
                                     "state_dtype", "seed")}
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

    def assert_unchanged(self, snap, new_state_ok=False, params_only=False):
        ps, states = snap
        for p, p0 in zip(self.ours, ps):
            assert torch.equal(p, p0), "a refused or skipped step changed a param"
        if params_only:
            return
        for p, st in self.opt.state.items():
            if id(p) not in states:
                assert new_state_ok, "a refused step created state"
                assert float(st["step"]) == 0 and not st["exp_avg"].any()
                continue
            for k, v in st.items():
                assert torch.equal(v, states[id(p)][k]), f"state {k} changed"

    def assert_matches(self):
        if self.twin is not None and not self.edit_pending:  # bit for bit: as a resumed run
            for i, (p, t) in enumerate(zip(self.ours, self.twin[0])):
                assert torch.equal(p, t), f"param {i} differs from the resumed twin"
                st, tst = self.opt.state.get(p, {}), self.twin[1].state.get(t, {})
                assert st.keys() == tst.keys(), f"param {i}: state keys differ from the twin's"
                for k in st:
                    assert st[k].dtype == tst[k].dtype and torch.equal(st[k], tst[k]), \
                        f"param {i} {k} differs from the resumed twin"
        if not self.torch_valid:
            return
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
    for _ in range(c.rng.randint(2, 6)):
        r = c.rng.random()
        if r < 0.3:
            c.grads()
            c.step()
        elif r < 0.4:
            c.clip_step()
        elif r < 0.5:
            c.edit()
        elif r < 0.6:
            c.option_edit()
        elif r < 0.68:
            c.amp_step(overflow=c.rng.random() < 0.5)
        elif r < 0.76 and c.dtype != torch.bfloat16:
            c.reload()
        elif r < 0.82:
            c.resize_refusal()
        elif r < 0.86:
            c.huge_step()
        elif r < 0.9:
            c.edit_then_refused()
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



# Clipping across param dtypes, AMP and master weights -------------------------------------------
N_CLIP_CASES = int(os.environ.get("TIEDADAM_CROSSCHECK_CLIP_CASES", "24"))


def run_clip_case(seed: int) -> None:
    """fp32, bf16 and fp16 params mixed in one optimizer, master weights or not, GradScaler
    scales (powers of two) or none, grads from ~1e-7 to ~1e3, max_grad_norm drawn around the
    norm. Without AMP the norm is clip_grad_norm_'s bit for bit (grads as held: bf16/fp16
    per-tensor norms rounded to their dtype); under AMP within fp32 rounding of the fp64 norm
    of the unscaled grads (Note [global norm]). Against float64 tied AdamW fed the unscaled
    grads times that coefficient, each param rounded to its dtype after every step as the
    kernel writes it (master weights: the fp32 master unrounded): params within two ulps of
    their dtype, masters and moments within fp32 rounding."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    backend = rng.choice(["triton", "torch"])
    master = rng.random() < 0.5
    dtypes = [rng.choice([torch.float32, torch.bfloat16, torch.float16])
              for _ in range(rng.randint(2, 4))]
    sizes = [rng.choice([1, 7, 64, 300]) for _ in dtypes]
    ours = [torch.nn.Parameter(torch.randn(n, generator=gen).to(d)) for n, d in zip(sizes, dtypes)]
    lr, beta, wd, eps = 1e-2, 0.9, 0.1, 1e-8
    opt = TiedAdamW(ours, lr=lr, beta=beta, weight_decay=wd, eps=eps, backend=backend,
                    master_weights=master, max_grad_norm=1.0)
    keeps_fp32 = [master or d == torch.float32 for d in dtypes]  # unrounded fp32 math
    ref_p = [p.detach().double() for p in ours]
    ref_m = [torch.zeros_like(p) for p in ref_p]
    ref_v = [torch.zeros_like(p) for p in ref_p]
    steps = rng.randint(1, 3)
    for t in range(1, steps + 1):
        mag = 10.0 ** rng.uniform(-7, 3)
        scale = 2.0 ** rng.randint(0, 20) if rng.random() < 0.5 else None
        if scale is not None and any(d == torch.float16 for d in dtypes):
            scale = min(scale, 2.0 ** 10 / max(mag, 1e-30))  # keep fp16 grads finite
            scale = 2.0 ** math.floor(math.log2(max(scale, 1.0)))
        for p in ours:
            g = (torch.randn(p.shape, generator=gen) * mag).to(p.dtype)
            p.grad = g if scale is None else (g.float() * scale).to(p.dtype)
        # the unscaled values the update reads (the scaled grad may have rounded)
        ref_g = [p.grad.double() / (scale or 1.0) for p in ours]
        unscaled = [g.to(p.dtype) for p, g in zip(ours, ref_g)]
        norm = (torch.nn.utils.get_total_norm(unscaled) if scale is None else
                torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in ref_g])))
        opt.max_grad_norm = max(float(norm) * rng.uniform(0.3, 1.7), 1e-30)
        # torch's coefficient, in the norm's dtype (fp16 grads: fp16 arithmetic, as
        # clip_grad_norm_ computes it); under AMP in fp32, from the fp32 norm
        held = norm if scale is None else norm.float()
        coef = (opt.max_grad_norm / (held + 1e-6)).clamp(max=1.0).double()
        if scale is not None:
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        if scale is not None:
            del opt.grad_scale, opt.found_inf
            torch.testing.assert_close(opt.last_grad_norm.double(), norm.double(), rtol=1e-6,
                                       atol=0)
        else:
            assert torch.equal(opt.last_grad_norm, norm), "the norm is not clip_grad_norm_'s"
        c = 1 - beta ** t
        for i, (p, g) in enumerate(zip(ours, ref_g)):
            assert torch.equal(p.grad, unscaled[i])  # as given, or unscaled: never clipped
            g = g * coef
            ref_m[i] = beta * ref_m[i] + (1 - beta) * g
            ref_v[i] = beta * ref_v[i] + (1 - beta) * g * g
            ref_p[i] = ref_p[i] * (1 - lr * wd) - lr * (ref_m[i] / c) / (
                (ref_v[i] / c).sqrt() + eps)
            if not keeps_fp32[i]:
                ref_p[i] = ref_p[i].to(p.dtype).double()  # rounded as the kernel writes it
    for i, p in enumerate(ours):
        st = opt.state[p]
        for k, r in (("exp_avg", ref_m[i]), ("exp_avg_sq", ref_v[i])):
            torch.testing.assert_close(st[k].double(), r, rtol=1e-4,  # (m cancels: atol)
                                       atol=1e-5 * float(r.abs().max()) + 1e-30,
                                       msg=lambda m: f"{k} {i}: {m}")
        if master and p.dtype != torch.float32:
            torch.testing.assert_close(st["master_param"].double(), ref_p[i], rtol=1e-5,
                                       atol=1e-6, msg=lambda m: f"master {i}: {m}")
        torch.testing.assert_close(p.detach().double(), ref_p[i].to(p.dtype).double(),
                                   rtol=2 * torch.finfo(p.dtype).eps, atol=1e-6,
                                   msg=lambda m: f"param {i} ({p.dtype}): {m}")


def test_randomized_clipping_across_dtypes_amp_and_master_weights():
    fixed = os.environ.get("TIEDADAM_CROSSCHECK_SEED")
    base = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    seeds = [base] if fixed else [base + i for i in range(N_CLIP_CASES)]
    for seed in seeds:
        try:
            run_clip_case(seed)
        except Exception as e:
            raise AssertionError(f"clip case seed {seed} failed (replay with "
                                 f"TIEDADAM_CROSSCHECK_SEED={seed}): {type(e).__name__}: {e}") \
                from e
