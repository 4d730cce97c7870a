"""The multi-tensor engine: one launch for any number of tensors, cached tables, alignment
flags, int64 offsets."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw as K
from tiedadam.optim import introspect
from tiedadam.kernels.multi_tensor import MultiTensorTable, TableCache, build_chunks
from reference import assert_close, ref_step


def mlp(n_layers=30, dtype=torch.float32):
    layers = []
    for i in range(n_layers):
        layers += [torch.nn.Linear(8 + i % 3, 8 + (i + 1) % 3, dtype=dtype)]
    return torch.nn.Sequential(*layers)


def test_one_launch_per_step_for_60_tensors():
    model = mlp()
    n = len(list(model.parameters()))
    assert n >= 60
    opt = TiedAdamW(model.parameters(), lr=1e-3, backend="triton")
    builds = introspect.table_builds(opt)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        before = K.launches
        opt.step()
        assert K.launches - before == 1
    assert introspect.table_builds(opt) - builds == 1, "tables are built once, then reused"


def test_one_launch_per_dtype_bucket():
    a, b = mlp(3), mlp(3, torch.bfloat16)
    opt = TiedAdamW(list(a.parameters()) + list(b.parameters()), backend="triton")
    for p in list(a.parameters()) + list(b.parameters()):
        p.grad = torch.randn_like(p)
    before = K.launches
    opt.step()
    assert K.launches - before == 2


def test_fresh_grads_repoint_without_rebuild_and_stay_correct():
    # ZeRO-1/2 hands out fresh grad tensors every step: the table must follow them.
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (40, 70, 5)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = TiedAdamW(ps, lr=1e-2, beta=0.9, backend="triton")
    ropt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.9), foreach=False)
    keep = []  # keep old grads alive so new ones land at new addresses
    addrs = set()
    for _ in range(4):
        for p, r in zip(ps, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g.clone()
            keep.append(p.grad)
            addrs.add(p.grad.data_ptr())
        opt.step()
        ropt.step()
    assert len(addrs) == 12
    assert introspect.table_builds(opt) == 1
    for p, r in zip(ps, ref):
        assert_close(p, r)


def test_single_tensor_bucket_uses_its_own_group():
    # One tensor in a bucket goes to the kernel as direct arguments (Note [flat]); it must still
    # read its own group's hyperparameters (ZeRO-3 fills group i, not group 0, per call).
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(70))
    ra, rb = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    opt = TiedAdamW([{"params": [a]}, {"params": [b], "lr": 3e-2, "beta": 0.5,
                                       "weight_decay": 0.0}],
                    lr=1e-2, beta=0.9, weight_decay=0.1, backend="triton")
    ref = torch.optim.AdamW([{"params": [ra]}, {"params": [rb], "lr": 3e-2, "betas": (0.5, 0.5),
                                                "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    for _ in range(3):
        b.grad = torch.randn_like(b)
        rb.grad = b.grad.clone()
        before = K.launches
        opt.step()
        ref.step()
        assert K.launches - before == 1
    assert_close(b, rb)
    assert torch.equal(a, ra)


def test_param_set_change_rebuilds():
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (4, 6, 8)]
    opt = TiedAdamW(ps, backend="triton")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    ps[1].grad = None
    opt.step()
    assert introspect.table_builds(opt) == 2
    assert [float(opt.state[p]["step"]) for p in ps] == [2.0, 1.0, 2.0]


def test_alignment_flags():
    base = torch.randn(65)
    views = [base[:64], base[1:]]
    roles = [views, [torch.randn(64)] * 2, [torch.randn(64)] * 2, [torch.randn(64)] * 2,
             [torch.randn(64)] * 2]
    t = MultiTensorTable(roles, [0, 0], [0, 0], 5, 4096, torch.device("cpu"))
    assert t.aligned == [True, False]


def test_repointed_role_keeps_the_table_only_while_alignment_flags_hold():
    # TableCache._same_alignment: fresh grads may re-point a table's row unless a tensor the
    # table walks unmasked (aligned flag set) would get a misaligned address.
    base = torch.randn(65)
    ps = [torch.randn(64), base[1:]]  # the second tensor is walked masked (misaligned param)
    roles = [ps] + [[torch.randn(64) for _ in ps] for _ in range(4)]
    t = MultiTensorTable(roles, [0, 0], [0, 0], 5, 4096, torch.device("cpu"))
    assert t.aligned == [True, False]
    odd = torch.randn(65)[1:]
    for grads, keeps in (([torch.randn(64), torch.randn(64)], True),  # all aligned
                         ([torch.randn(64), odd], True),  # the masked tensor may move anywhere
                         ([odd, torch.randn(64)], False)):  # the unmasked one may not
        ptrs = [g.data_ptr() for g in grads]
        assert TableCache._same_alignment(t, ptrs) is keeps
    t.refresh_role(1, grads, [g.data_ptr() for g in grads])
    assert t.addr[1].tolist() == [g.data_ptr() for g in grads]


def test_flat_launch_promises_alignment_only_when_every_address_is_aligned(monkeypatch):
    # launch_flat's aligned flag (the kernel then walks unmasked, with alignment hints) is one
    # OR of the five addresses: any misaligned role must clear it.
    seen = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(args[15])  # the ``aligned`` argument

    monkeypatch.setattr(K, "_tied_adamw_kernel", Record())
    hyper = torch.zeros(1, 4, dtype=torch.float64)
    consts = K.launch_config(torch.float32, torch.float32, True, False, False, False, False)
    odd = torch.randn(65)[1:]
    for bad in (None, 0, 1, 2, 3, 4):
        ts = [odd if r == bad else torch.randn(64) for r in range(5)]
        assert (ts[bad].data_ptr() % K.ALIGN_BYTES != 0) if bad is not None else True
        K.launch_flat(consts, hyper, hyper, hyper, hyper, hyper, 0.5, torch.zeros(1, dtype=torch.int32),
                      *ts, torch.zeros(()), 0, 0)
    assert seen == [1, 0, 0, 0, 0, 0]


def test_chunks_are_int64_beyond_2_31():
    numels = torch.tensor([3, 0, 2 ** 31 + 5, 70], dtype=torch.int64)
    ch = build_chunks(numels, 2 ** 20)
    assert ch.dtype == torch.int64
    idx, starts = ch
    assert idx.tolist().count(2) == 2 ** 11 + 1
    assert starts[idx == 2][-1].item() == 2 ** 31
    assert idx.tolist()[:1] == [0] and idx.tolist()[-1] == 3
    # the empty tensor gets one empty chunk: its program bumps the step count (Note [step counts])
    assert idx.tolist().count(1) == 1 and starts[idx == 1].tolist() == [0]


def test_kernel_offsets_beyond_2_31_elements():
    """Update elements [2**31, 2**31 + n) of a tensor without allocating 8 GiB: the table holds a
    base address 2**31 elements *before* real memory, so only int64 offset arithmetic can land
    on the right bytes (int32 offsets would wrap to a negative offset)."""
    n = K.CHUNK + 100  # one full aligned chunk and a masked tail past 2**31
    far = 2 ** 31
    p, g = torch.randn(n), torch.randn(n)
    m, v = torch.randn(n) * 0.1, torch.rand(n)
    step = torch.tensor(2.0)  # the count before the step: the kernel steps with t = 3
    expect = ref_step(p, g, m, v, 3, lr=1e-2, beta=0.9, eps=1e-8, weight_decay=0.1)
    shift = far * 4
    ptrs = [x.data_ptr() - shift for x in (p, g, m, v, p)] + [step.data_ptr()]
    table = SimpleNamespace(
        addr=torch.tensor(ptrs, dtype=torch.int64).reshape(6, 1),
        meta=torch.tensor([[far + n], [0], [1], [0]], dtype=torch.int64),
        chunk=torch.tensor([[0, 0], [far, far + K.CHUNK]], dtype=torch.int64),
        n_tensors=1, n_chunks=2)
    hyper = torch.tensor([[1e-2, 0.9, 1e-8, 0.1]], dtype=torch.float64)
    tickets = torch.zeros(1, dtype=torch.int32)
    K.launch_tied_adamw(table, hyper, param_dtype=torch.float32, state_dtype=torch.float32,
                        has_master=False, tickets=tickets)
    # Only the last 2 of the tensor's 32,769 chunks ran: 2 tickets drawn, the count not yet
    # stored (Note [step counts]: the last of all its programs stores it).
    assert tickets.tolist() == [2] and step.item() == 2.0
    assert_close(p, expect[0])
    assert_close(m, expect[1])
    assert_close(v, expect[2])


def test_kernel_counts_each_tensors_step_once():
    """Note [step counts]: the kernel bumps state["step"] once per tensor per step, however many
    programs the tensor has (here 3 chunks), also for an empty tensor (as torch counts it), and
    leaves its ticket buffer zeroed for the next launch; no foreach op on the host."""
    from tiedadam import TiedAdamW
    sizes = [0, 10, 2 * K.CHUNK + 3]
    ours = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = TiedAdamW(ours, lr=1e-2, beta=0.9, backend="triton")
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.9))
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert opt.state[a]["step"].item() == ref.state[b]["step"].item() == 3.0
        torch.testing.assert_close(a, b)  # stepped with t = 1, 2, 3
    (_, bucket), = introspect.buckets(opt)
    assert bucket.tickets.tolist() == [0, 0, 0]
