"""Rank bodies for tests/test_rng.py (importable: spawn pickles them by reference)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from tiedadam import TiedAdamW


def sharded_and_replicated(rank, world, backend, n):
    return (one_step_bf16_state(rank, world, backend, n, True),
            one_step_bf16_state(rank, world, backend, n, False))


def one_step_bf16_state(rank, world, backend, n, sharded):
    """One stochastic-rounding step of a tensor whose every rank-local element has the same
    value and grad on every rank; returns (exp_avg bits, exact fp32 exp_avg) of the local part.
    ``sharded``: a Shard(0) DTensor of 2n elements (FSDP2), else a plain replicated tensor."""
    gen = torch.Generator().manual_seed(1234)  # the same draw on every rank
    local_g = torch.randn(n, generator=gen)
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.zeros(world * n)
        p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        p.grad = distribute_tensor(local_g.repeat(world), mesh, [Shard(0)])
    else:
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = local_g.clone()
    beta = 0.95
    opt = TiedAdamW([p], lr=1e-3, beta=beta, weight_decay=0.0, state_dtype="bfloat16",
                    stochastic_rounding=True, seed=7, backend=backend)
    opt.step()
    m = opt.state[p]["exp_avg"]
    m = m.to_local() if sharded else m
    exact = torch.tensor(1 - beta, dtype=torch.float64).float() * local_g  # lerp from m = 0
    return m.view(torch.int16).clone(), exact
