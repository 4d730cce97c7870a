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
