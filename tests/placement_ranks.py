"""Rank bodies for DTensor grads whose placements differ from their param's (2 gloo ranks;
importable: the ranks are forked from a server that imported this module)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tiedadam import TiedAdamW

# (param placement, grad placement, full shape). (1, 3) sharded on 2 ranks: rank 0's local
# shard is the whole row, as a replicated grad's is, so only the placements tell them apart
# there (rank 1's shard is empty).
CASES = [("shard", "replicate", (6, 4)), ("replicate", "shard", (6, 4)),
         ("shard", "replicate", (1, 3))]


def _placement(name):
    from torch.distributed.tensor import Replicate, Shard
    return [Shard(0)] if name == "shard" else [Replicate()]


def _distribute(full, mesh, placements):
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, mesh, placements)


def mismatched_grads(rank, world, backend, fast_guard):
    """Each case: two steps with matching grads (the plan cached, its fast check armed), a
    step with a grad of other placements (refused on every rank, nothing changed), then the
    grad redistributed as the error says (steps as torch's AdamW on the same DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from tiedadam.optim import guard
    guard.USE_FAST_GUARD = fast_guard
    mesh = init_device_mesh("cpu", (world,))
    out = []
    for p_name, g_name, shape in CASES:
        torch.manual_seed(0)  # the same full tensors on every rank
        p_pl, g_pl = _placement(p_name), _placement(g_name)
        full = torch.randn(shape)
        ours = torch.nn.Parameter(_distribute(full, mesh, p_pl))
        theirs = torch.nn.Parameter(_distribute(full.clone(), mesh, p_pl))
        opt = TiedAdamW([ours], lr=0.1, beta=0.9, backend=backend)
        ref = torch.optim.AdamW([theirs], lr=0.1, betas=(0.9, 0.9), foreach=False)
        for _ in range(2):
            g = torch.randn(shape)
            ours.grad = _distribute(g, mesh, p_pl)
            theirs.grad = _distribute(g.clone(), mesh, p_pl)
            opt.step()
            ref.step()
        g = torch.randn(shape)
        ours.grad = _distribute(g, mesh, g_pl)
        before = ours.to_local().clone(), {k: v.to_local().clone() if hasattr(v, "to_local")
                                           else v.clone() for k, v in opt.state[ours].items()}
        error = None
        try:
            opt.step()
        except RuntimeError as e:
            error = str(e)
        unchanged = torch.equal(ours.to_local(), before[0]) and all(
            torch.equal(v.to_local() if hasattr(v, "to_local") else v, before[1][k])
            for k, v in opt.state[ours].items())
        ours.grad = ours.grad.redistribute(ours.device_mesh, ours.placements)  # the fix
        theirs.grad = _distribute(g.clone(), mesh, p_pl)
        opt.step()
        ref.step()
        dist.barrier()
        out.append(dict(case=(p_name, g_name, shape), error=error, unchanged=unchanged,
                        ours=ours.full_tensor(), theirs=theirs.full_tensor(),
                        step=float(opt.state[ours]["step"])))
    return out


def random_cases(rank, world, seed, n_cases, backend):
    """The DTensor part of the randomized cross-check (tests/test_crosscheck.py cannot start a
    process group): each case draws shapes (uneven and empty shards included), the params'
    placements and, each step, the grads' (mostly the params', sometimes the other). Matching
    grads step as torch.optim.AdamW on the same DTensors; others are refused on every rank with
    nothing changed, and the case goes on. Every rank draws the same case (same seed)."""
    import random
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes_pool = [(1, 3), (5,), (6, 4), (3, 2, 2), (1,), (9,)]
    results = []
    for case in range(n_cases):
        shapes = rng.sample(shapes_pool, rng.randint(1, 3))
        names = [rng.choice(["shard", "replicate"]) for _ in shapes]
        fulls = [torch.randn(s, generator=gen) for s in shapes]
        ours = [torch.nn.Parameter(_distribute(f, mesh, _placement(n)))
                for f, n in zip(fulls, names)]
        theirs = [torch.nn.Parameter(_distribute(f.clone(), mesh, _placement(n)))
                  for f, n in zip(fulls, names)]
        lr, beta = rng.choice([1e-2, 0.1]), rng.choice([0.5, 0.9, 0.95])
        opt = TiedAdamW(ours, lr=lr, beta=beta, backend=backend)
        ref = torch.optim.AdamW(theirs, lr=lr, betas=(beta, beta), foreach=False)
        refused = stepped = 0
        for _ in range(rng.randint(2, 4)):
            gnames = [n if rng.random() < 0.7 else rng.choice(["shard", "replicate"])
                      for n in names]
            gs = [torch.randn(s, generator=gen) for s in shapes]
            for p, q, g, gn, n in zip(ours, theirs, gs, gnames, names):
                p.grad = _distribute(g, mesh, _placement(gn))
                q.grad = _distribute(g.clone(), mesh, _placement(n))
            if gnames == names:
                opt.step()
                ref.step()
                stepped += 1
                continue
            before = [p.to_local().clone() for p in ours]
            try:
                opt.step()
                error = None
            except RuntimeError as e:
                error = str(e)
            refused += 1
            unchanged = all(torch.equal(p.to_local(), b) for p, b in zip(ours, before))
            if error is None or "placements" not in error or not unchanged:
                raise AssertionError(f"case {case}: grads {gnames} for params {names} "
                                     f"({shapes}): error={error!r}, unchanged={unchanged}")
        diffs = [float((p.full_tensor() - q.full_tensor()).abs().max()) if p.numel() else 0.0
                 for p, q in zip(ours, theirs)]
        results.append(dict(case=case, stepped=stepped, refused=refused, max_diff=max(diffs)))
    return results
