"""Rank bodies for the FSDP tests (importable: spawn pickles them by reference)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from tiedadam import TiedAdamW
from tiedadam.integrations import fsdp as tfsdp
from tiedadam.optim import introspect

BETA = 0.9


class Net(nn.Module):
    """Uneven shapes on purpose: 5 and 7 rows split 3/2 and 4/3 over two ranks, and a 1-row
    weight leaves rank 1 with an empty local shard."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.b = nn.Linear(7, 5)
        self.c = nn.Linear(5, 1)

    def forward(self, x, y):
        x = x.to(self.a.weight.dtype)
        h = torch.tanh(self.b(self.norm(torch.relu(self.a(x)))))
        return ((self.c(h).float().squeeze(-1) - y) ** 2).mean()


def groups(model):
    # by name: under FSDP1 with use_orig_params=True every param is a 1-D shard view
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n)]
    return [{"params": decay, "weight_decay": 0.1},
            {"params": rest, "weight_decay": 0.0, "lr": 5e-3}]


def make_opt(kind, params, how=""):
    if kind == "tied":  # "...-ratio8": ratio8 moments (int8 codes and bf16 v, sharded as p)
        extra = {"state_dtype": "ratio8"} if how.endswith("-ratio8") else {}
        return TiedAdamW(params, lr=1e-2, beta=BETA, weight_decay=0.1, backend="triton",
                         **extra)
    return torch.optim.AdamW(params, lr=1e-2, betas=(BETA, BETA), weight_decay=0.1,
                             foreach=False)


def batches(rank, n, seed=1):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, generator=g)) for _ in range(n)]


def wrap(model, how, world):
    if how.startswith("fsdp2"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if how == "fsdp2-bf16" else None
        kw = dict(mesh=mesh, **({"mp_policy": mp} if mp else {}))
        for m in (model.a, model.b, model.c):
            fully_shard(m, **kw)
        return fully_shard(model, **kw)
    if how.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP(model, use_orig_params=how == "fsdp1-orig", device_id=torch.device("cpu"))
    return model  # "plain": unsharded (one rank)


def full_params(model):
    out = []
    if isinstance(model, nn.Module) and tfsdp.is_fsdp1(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model):
            return [p.detach().float().clone() for p in model.parameters()]
    for p in model.parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(p.detach().float().clone())
    return out


def train(model, opt, data):
    losses = []
    for x, y in data:
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def parity(rank, world, how, steps):
    """TiedAdamW vs torch.optim.AdamW(betas=(b, b)) under the same wrapping."""
    torch.manual_seed(0)
    base = Net()
    data = batches(rank, steps)
    out = {}
    for kind in ("tied", "torch"):
        model = wrap(copy.deepcopy(base), how, world)
        params = model.parameters() if how == "fsdp1" else groups(model)  # flat params: 1 group
        opt = make_opt(kind, params)
        out[kind] = dict(losses=train(model, opt, data), params=full_params(model))
        if kind == "tied":
            st = [s for s in opt.state.values()]
            out["state_types"] = sorted({type(s["exp_avg"]).__name__ for s in st})
            out["state_dtypes"] = sorted({str(s["exp_avg"].dtype) for s in st})
            out["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
            # Note [guard fast path]: armed after the first reuse, kept while nothing changes
            out["fast_guard"] = introspect.fast_guard_armed(opt)
    return out


def fresh_state_dict_leaves_model(rank, world, how):
    """get_optimizer_state_dict on a fresh optimizer steps with zero grads and lr=0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    torch.manual_seed(0)
    model = wrap(Net(), how, world)
    opt = make_opt("tied", groups(model))
    before = full_params(model)
    osd = get_optimizer_state_dict(model, opt)
    after = full_params(model)
    return dict(same=all(torch.equal(a, b) for a, b in zip(before, after)),
                keys=sorted(osd["state"])[:3], lrs=[g["lr"] for g in opt.param_groups])


def checkpoint(rank, world, how, steps, at, path):
    """Uninterrupted vs save at ``at`` on these ranks, load into a fresh model, continue."""
    torch.manual_seed(0)
    base = Net()
    data = batches(rank, steps)
    model = wrap(copy.deepcopy(base), how, world)
    opt = make_opt("tied", groups(model), how)
    whole = train(model, opt, data)
    whole_params = full_params(model)

    model = wrap(copy.deepcopy(base), how, world)
    opt = make_opt("tied", groups(model), how)
    train(model, opt, data[:at])
    tfsdp.save(path, model, opt)

    torch.manual_seed(99)  # different initial weights: the load must restore everything
    model = wrap(Net(), how, world)
    opt = make_opt("tied", groups(model), how)
    tfsdp.load(path, model, opt)
    resumed = train(model, opt, data[at:])
    return dict(whole=whole[at:], resumed=resumed, whole_params=whole_params,
                resumed_params=full_params(model),
                state_dtypes=sorted({str(s["exp_avg"].dtype) for s in opt.state.values()}),
                state_types=sorted({type(s["exp_avg"]).__name__ for s in opt.state.values()}))


def resume_on_one_rank(rank, world, path, n_ranks_saved, steps, at):
    """Load a checkpoint saved on ``n_ranks_saved`` ranks into an unsharded model on one rank
    and continue on the same global batches (every saved rank's batch, concatenated)."""
    assert world == 1
    torch.manual_seed(99)
    model = Net()
    opt = make_opt("tied", groups(model))
    tfsdp.load(path, model, opt)
    per_rank = [batches(r, steps) for r in range(n_ranks_saved)]
    data = [(torch.cat([b[i][0] for b in per_rank]), torch.cat([b[i][1] for b in per_rank]))
            for i in range(at, steps)]
    train(model, opt, data)
    return full_params(model)


def two_meshes(rank, world, steps, replace_at=None):
    """Params on two different device meshes (1-D sharded and 2-D replicated x sharded) plus a
    plain replicated tensor, stepped by one optimizer: compared with torch's AdamW.
    ``replace_at``: before that step, one param's and one moment's local shard are replaced by
    copies in other memory (the DTensors keep their identity), in both optimizers; the plain
    tensor is then a replicated DTensor instead."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    w1, w2, w3 = torch.randn(7, 4), torch.randn(3, 6), torch.randn(5)
    out = {}
    for kind in ("tied", "torch"):
        ps = [nn.Parameter(distribute_tensor(w1.clone(), mesh1, [Shard(0)])),
              nn.Parameter(distribute_tensor(w2.clone(), mesh2, [Replicate(), Shard(1)])),
              # with replace_at, a replicated DTensor: an all-DTensor plan takes the fast check
              nn.Parameter(w3.clone() if replace_at is None
                           else distribute_tensor(w3.clone(), mesh1, [Replicate()]))]
        opt = make_opt(kind, ps)
        g = torch.Generator().manual_seed(5)
        for step in range(steps):
            grads = [torch.randn(7, 4, generator=g), torch.randn(3, 6, generator=g),
                     torch.randn(5, generator=g)]
            ps[0].grad = distribute_tensor(grads[0], mesh1, [Shard(0)])
            ps[1].grad = distribute_tensor(grads[1], mesh2, [Replicate(), Shard(1)])
            ps[2].grad = (grads[2] if replace_at is None
                          else distribute_tensor(grads[2], mesh1, [Replicate()]))
            if step == replace_at:
                for t in (ps[0], opt.state[ps[1]]["exp_avg"]):
                    t._local_tensor = t._local_tensor.clone()
            opt.step()
        # clone: a replicated DTensor's full_tensor() is its local tensor, which the extra
        # step below would change
        out[kind] = [p.full_tensor().clone() if hasattr(p, "full_tensor")
                     else p.detach().clone() for p in ps]
        if kind == "tied":
            from tiedadam.kernels import tied_adamw as K
            out["launches_per_step"] = None
            before = K.launches
            for p in ps:
                p.grad = torch.zeros_like(p)
            opt.step()
            out["launches_per_step"] = K.launches - before
    dist.barrier()
    return out


def save_on_one_rank(rank, world, path, n_ranks_later, steps, at):
    """Train unsharded on one rank on the global batches, save at ``at`` (DCP)."""
    assert world == 1
    torch.manual_seed(0)
    model = Net()
    opt = make_opt("tied", groups(model))
    per_rank = [batches(r, steps) for r in range(n_ranks_later)]
    data = [(torch.cat([b[i][0] for b in per_rank]), torch.cat([b[i][1] for b in per_rank]))
            for i in range(at)]
    train(model, opt, data)
    tfsdp.save(path, model, opt)


def load_on_ranks(rank, world, how, path, steps, at):
    torch.manual_seed(99)
    model = wrap(Net(), how, world)
    opt = make_opt("tied", groups(model))
    tfsdp.load(path, model, opt)
    train(model, opt, batches(rank, steps)[at:])
    return full_params(model)


def full_roundtrip(rank, world, how, steps, at):
    """Full (gathered) state dicts: get after ``at`` steps, set into a fresh model/optimizer,
    continue; compared with the uninterrupted run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    torch.manual_seed(0)
    base = Net()
    data = batches(rank, steps)
    model = wrap(copy.deepcopy(base), how, world)
    opt = make_opt("tied", groups(model))
    train(model, opt, data)
    whole = full_params(model)
    model = wrap(copy.deepcopy(base), how, world)
    opt = make_opt("tied", groups(model))
    train(model, opt, data[:at])
    full = tfsdp.state_dicts(model, opt, full=True)
    torch.manual_seed(99)
    model = wrap(Net(), how, world)
    opt = make_opt("tied", groups(model))
    set_state_dict(model, opt, model_state_dict=full["model"], optim_state_dict=full["optim"],
                   options=StateDictOptions(full_state_dict=True))
    train(model, opt, data[at:])
    return whole, full_params(model)


def telemetry_sharded(rank, world, steps):
    """Telemetry of DTensor shards, combined with reduce=True, vs the same optimizer on the full
    tensors in this process. Shapes are uneven; the 1-row weight leaves rank 1 an empty shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    full = [torch.randn(7, 4), torch.randn(5), torch.randn(1, 3), torch.randn(3, 6)]
    placements = [(mesh, [Shard(0)])] * 3 + [(mesh2, [Replicate(), Shard(1)])]
    sharded = [nn.Parameter(distribute_tensor(t.clone(), m, pl))
               for t, (m, pl) in zip(full, placements)]
    local = [nn.Parameter(t.clone()) for t in full]
    names = ["a", "b", "c", "d"]
    o1 = TiedAdamW(sharded, lr=1e-2, beta=BETA, telemetry=True, names=names, backend="triton")
    o2 = TiedAdamW(local, lr=1e-2, beta=BETA, telemetry=True, names=names, backend="triton")
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        grads = [torch.randn(t.shape, generator=g) for t in full]
        for p, q, gr, (m, pl) in zip(sharded, local, grads, placements):
            p.grad = distribute_tensor(gr, m, pl)
            q.grad = gr.clone()
        o1.step()
        o2.step()
    t1, t2 = o1.telemetry(reduce=True), o2.telemetry()
    return {n: {k: (float(t1[n][k]), float(t2[n][k])) for k in t2[n]} for n in names}


def clipping(rank, world, how, steps, max_norm):
    """TiedAdamW(max_grad_norm) on the sharded model against clip_grad_norm_ + torch AdamW on
    the unsharded one, fed every rank's batch (FSDP averages the ranks' grads: the same grad).
    FSDP1 without norm_process_group is refused first, before anything changes."""
    torch.manual_seed(0)
    base = Net()
    every = [batches(r, steps) for r in range(world)]
    ref = copy.deepcopy(base)
    ref_params = ref.parameters() if how == "fsdp1" else groups(ref)
    ropt = make_opt("torch", ref_params)
    ref_norms = []
    for step in range(steps):
        loss = sum(ref(*every[r][step]) for r in range(world)) / world
        loss.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)))
        ropt.step()
        ropt.zero_grad()
    model = wrap(copy.deepcopy(base), how, world)
    params = list(model.parameters()) if how == "fsdp1" else groups(model)
    out = {"refused": None}
    if how.startswith("fsdp1"):
        opt = TiedAdamW(params, lr=1e-2, beta=BETA, weight_decay=0.1, backend="triton",
                        max_grad_norm=max_norm)
        model(*every[rank][0]).backward()
        before = full_params(model)
        try:
            opt.step()
        except RuntimeError as e:
            out["refused"] = str(e)
        out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, full_params(model)))
        out["no_state"] = len(opt.state) == 0
        model.zero_grad()
    group = model.process_group if how.startswith("fsdp1") else None
    opt = TiedAdamW(params, lr=1e-2, beta=BETA, weight_decay=0.1, backend="triton",
                    max_grad_norm=max_norm, norm_process_group=group)
    norms = []
    for step in range(steps):
        model(*every[rank][step]).backward()
        opt.step()
        opt.zero_grad()
        norms.append(float(opt.last_grad_norm))
    out.update(norms=norms, ref_norms=ref_norms, params=full_params(model),
               ref_params=[p.detach().clone() for p in ref.parameters()])
    return out


def clipping_frozen(rank, world, how, steps, max_norm):
    """Reliability v3, row 6: frozen layers (norm, b, c) so that, with FSDP1's one flat
    param split in halves, rank 1 holds no trainable element (FSDP1 use_orig_params=True; the
    FSDP2 case freezes the same layers). Every rank steps, those without a grad join the norm's
    reduction with 0, and the clipped run equals clip_grad_norm_ + AdamW on the unsharded
    model."""
    torch.manual_seed(0)
    base = Net()
    for m in (base.norm, base.b, base.c):
        m.requires_grad_(False)
    every = [batches(r, steps) for r in range(world)]
    ref = copy.deepcopy(base)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    ropt = make_opt("torch", trainable)
    ref_norms = []
    for step in range(steps):
        loss = sum(ref(*every[r][step]) for r in range(world)) / world
        loss.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
        ropt.step()
        ropt.zero_grad()
    amp = how.endswith("-amp")  # grads scaled by 2**12 as GradScaler leaves them
    model = wrap(copy.deepcopy(base), how.removesuffix("-amp"), world)
    group = model.process_group if how.startswith("fsdp1") else None
    opt = TiedAdamW(list(model.parameters()), lr=1e-2, beta=BETA, weight_decay=0.1,
                    backend="triton", max_grad_norm=max_norm, norm_process_group=group)
    norms, with_grads = [], []
    for step in range(steps):
        model(*every[rank][step]).backward()
        with_grads.append(sum(p.grad is not None and p.grad.numel() > 0
                              for p in model.parameters()))
        if amp:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(2.0 ** 12)
            opt.grad_scale, opt.found_inf = torch.tensor(2.0 ** 12), torch.tensor(0.0)
        opt.step()
        opt.zero_grad()
        norms.append(float(opt.last_grad_norm))
    return dict(norms=norms, ref_norms=ref_norms, params=full_params(model),
                ref_params=[p.detach().clone() for p in ref.parameters()],
                with_grads=with_grads)
