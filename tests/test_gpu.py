"""GPU-only checks (``pytest -m gpu``; skipped without CUDA): compiled kernels, rounding modes
the interpreter cannot show, CUDA-graph capture, no host syncs, int64 offsets on real memory."""

from __future__ import annotations

import pytest
import torch

from tiedadam import TiedAdamW
from tiedadam.kernels import tied_adamw as K
from reference import assert_close, ref_step

pytestmark = pytest.mark.gpu
DEV = "cuda"


def params(dtype=torch.float32, sizes=(1, 3, 1000, K.CHUNK + 3, 1 << 20)):
    ps = [torch.randn(n, device=DEV, dtype=dtype) for n in sizes]
    base = torch.randn(1 + 1001, device=DEV, dtype=dtype)
    ps.append(base[1:])  # misaligned view
    return [torch.nn.Parameter(p) for p in ps]


def test_fp32_matches_torch_adamw_on_gpu():
    ours = params()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = TiedAdamW(ours, lr=1e-2, beta=0.9, weight_decay=0.1, backend="triton")
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_master_weight_param_is_round_to_nearest_even():
    ps = params(torch.bfloat16)
    opt = TiedAdamW(ps, lr=1e-3, master_weights=True, backend="triton")
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in ps:
        assert torch.equal(p.detach(), opt.state[p]["master_param"].to(torch.bfloat16))


def test_bf16_state_nearest_is_round_to_nearest_even():
    ps = params(torch.float32, (4096,))
    m0 = torch.zeros(4096, device=DEV)
    opt = TiedAdamW(ps, lr=1e-3, beta=0.9, state_dtype=torch.bfloat16, stochastic_rounding=False)
    ps[0].grad = torch.randn_like(ps[0])
    opt.step()
    expect = (m0 + 0.1 * (ps[0].grad - m0)).to(torch.bfloat16)
    assert torch.equal(opt.state[ps[0]]["exp_avg"], expect)


def test_stochastic_rounding_unbiased_on_gpu():
    n, beta, g = 1 << 20, 0.9, 4.0 / 3.0
    p = torch.nn.Parameter(torch.zeros(n, device=DEV))
    opt = TiedAdamW([p], beta=beta, state_dtype=torch.bfloat16, seed=3)
    p.grad = torch.full((n,), g, device=DEV)
    opt.step()
    exact = float(torch.tensor(1 - beta) * torch.tensor(g))
    m = opt.state[p]["exp_avg"].double()
    ulp = 2.0 ** (torch.floor(torch.log2(torch.tensor(exact))).item() - 7)
    assert abs(float(m.mean()) - exact) < 6 * 0.5 * ulp / n ** 0.5


def test_step_makes_no_host_sync():
    ps = params()
    opt = TiedAdamW(ps, lr=1e-3, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_amp_skip_changes_nothing_and_never_syncs():
    ps = params(torch.float16, (1000, 5000))
    opt = TiedAdamW(ps, lr=1e-3, backend="triton")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    snap = [p.detach().clone() for p in ps], [dict((k, v.clone()) for k, v in opt.state[p].items())
                                              for p in ps]
    ps[1].grad[7] = float("inf")
    opt.grad_scale = torch.tensor(1024.0, device=DEV)
    opt.found_inf = torch.tensor(1.0, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del opt.grad_scale, opt.found_inf
    for p, p0, s0 in zip(ps, *snap):
        assert torch.equal(p, p0)
        assert all(torch.equal(opt.state[p][k], s0[k]) for k in s0)


def _warm_up_and_capture(opt):
    """One step on a side stream (tables, compilation), as torch's graph docs ask, then a step
    captured into a CUDA graph (not run)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def test_cuda_graph_capture_replays_with_changing_lr():
    ps = params(torch.float32, (1000, 70000))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    lr = torch.tensor(1e-2, device=DEV)
    opt = TiedAdamW(ps, lr=lr, beta=0.9, capturable=True, backend="triton")
    ropt = TiedAdamW(ref, lr=1e-2, beta=0.9, backend="triton")
    grads = [torch.randn_like(p) for p in ps]
    for p, r, g in zip(ps, ref, grads):
        p.grad, r.grad = g, g.clone()
    graph = _warm_up_and_capture(opt)
    ropt.step()
    for i, new_lr in enumerate([5e-3, 2e-3, 1e-3]):
        lr.fill_(new_lr)
        graph.replay()
        ropt.param_groups[0]["lr"] = new_lr
        ropt.step()
    torch.cuda.synchronize()
    for p, r in zip(ps, ref):
        assert_close(p, r)
    assert float(opt.state[ps[0]]["step"]) == 4.0


def test_graph_replays_correctly_after_the_plan_is_rebuilt():
    """Note [graph buffers]: the step-count tickets, address tables and hyperparameter table a
    captured graph uses stay allocated when a later step rebuilds the plan (here: a param group
    added), however the freed memory is reused."""
    ps = params(torch.float32, (1000, 70000))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = TiedAdamW(ps, lr=torch.tensor(1e-2, device=DEV), beta=0.9, capturable=True,
                    backend="triton")
    ropt = TiedAdamW(ref, lr=1e-2, beta=0.9, backend="triton")
    for p, r in zip(ps, ref):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.clone()
    graph = _warm_up_and_capture(opt)
    ropt.step()
    extra = torch.nn.Parameter(torch.randn(10, device=DEV))
    opt.add_param_group({"params": [extra], "lr": torch.tensor(1e-2, device=DEV)})
    extra.grad = torch.randn_like(extra)
    opt.step()  # a new plan, new tables and tickets for all three
    ropt.step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    junk = [torch.full((1 << 16,), -7, dtype=torch.int32, device=DEV) for _ in range(64)]
    graph.replay()
    ropt.step()
    torch.cuda.synchronize()
    del junk
    for p, r in zip(ps, ref):
        assert_close(p, r)
        assert float(opt.state[p]["step"]) == 3.0


def test_offsets_beyond_2_31_on_real_memory():
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2 ** 30:
        pytest.skip("needs ~26 GiB of free GPU memory")
    p = torch.nn.Parameter(torch.randn(n, device=DEV, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = TiedAdamW([p], lr=1e-2, beta=0.9, weight_decay=0.1, master_weights=True)
    tail = slice(n - 70000, n)
    p0, g0 = p.detach()[tail].clone(), p.grad[tail].clone()
    opt.step()
    rp, rm, rv = ref_step(p0.float(), g0, torch.zeros_like(p0, dtype=torch.float32),
                          torch.zeros_like(p0, dtype=torch.float32), 1, lr=1e-2, beta=0.9,
                          eps=1e-8, weight_decay=0.1)
    st = opt.state[p]
    assert_close(st["master_param"][tail], rp)
    assert_close(st["exp_avg"][tail], rm)
    assert_close(st["exp_avg_sq"][tail], rv)


@pytest.mark.parametrize("layout", ["fp64", "channels_last", "strided view", "expanded grad"])
def test_reliability_paths_match_torch_on_gpu(layout):
    """The paths the reliability rule added (docs/design.md §3), compiled: fp64 math, params
    walked in their own storage order or through a working copy, grads copied into layout."""
    dtype = torch.float64 if layout == "fp64" else torch.float32
    if layout == "channels_last":
        base = torch.randn(4, 8, 16, 16, device=DEV).contiguous(memory_format=torch.channels_last)
    elif layout == "strided view":
        base = torch.randn(64, 300, device=DEV)[:, ::3]
    else:
        base = torch.randn(K.CHUNK + 77, device=DEV, dtype=dtype)
    ours = [torch.nn.Parameter(base), torch.nn.Parameter(torch.randn(1000, device=DEV, dtype=dtype))]
    theirs = [torch.nn.Parameter(torch.empty_strided(p.shape, p.stride(), device=DEV,
                                                     dtype=p.dtype).copy_(p.detach()))
              for p in ours]
    opt = TiedAdamW(ours, lr=1e-2, beta=0.9, weight_decay=0.1, backend="triton")
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=False)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, device=DEV, dtype=dtype)
            if layout == "expanded grad":
                g = torch.randn((), device=DEV, dtype=dtype).expand(a.shape)
            a.grad, b.grad = g, g.clone()
        opt.step()
        ref.step()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else {}
    for a, b in zip(ours, theirs):
        assert a.stride() == b.stride()
        if tol:
            torch.testing.assert_close(a, b, **tol)
        else:
            assert_close(a, b)


def test_amp_leaves_grads_unscaled_on_gpu():
    ps = params(torch.float16, sizes=(5000, K.CHUNK + 9))
    opt = TiedAdamW(ps, lr=1e-3, beta=0.9, backend="triton")
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g * 1024
    opt.grad_scale = torch.tensor(1024.0, device=DEV)
    opt.found_inf = torch.tensor(0.0, device=DEV)
    opt.step()
    for p, g in zip(ps, grads):
        assert torch.equal(p.grad, g)


def test_sync_counter_counts_a_sync_and_not_the_modes_first_notice():
    """perf/common.py count_syncs, in a fresh process (where switching sync debug mode on
    first prints a notice of its own): .item() is one sync, a plain op none."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys, torch; sys.path.insert(0, 'perf'); from common import count_syncs; "
              "x = torch.randn(10, device='cuda'); "
              "print(count_syncs(lambda: x.sum()), count_syncs(lambda: x.sum().item()), "
              "count_syncs(lambda: x.sum()))")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "1", "0"], out.stdout + out.stderr[-2000:]



# ratio8 (Note [ratio8 kernel]): the compiled kernel's fast sqrt/rsqrt/division ----------------
def test_ratio8_kernel_matches_the_compiled_cpu_step_within_one_code():
    """Round to nearest, same grads: v is the same bits on both (its arithmetic is exact IEEE
    on both), the codes differ by at most one (the GPU's approximate rsqrt at a rounding
    boundary), the params by at most that code's share of an update."""
    from tiedadam.optim import torch_backend
    gpu = params(sizes=(1000, K.CHUNK + 3))
    cpu = [torch.nn.Parameter(p.detach().cpu().clone()) for p in gpu]
    kw = dict(lr=1e-2, beta=0.95, state_dtype="ratio8", stochastic_rounding=False)
    og = TiedAdamW(gpu, backend="triton", **kw)
    oc = TiedAdamW(cpu, backend="torch", **kw)
    old = torch_backend.USE_COMPILED_CPU_STEP
    torch_backend.USE_COMPILED_CPU_STEP = True
    try:
        for _ in range(5):
            for a, b in zip(gpu, cpu):
                g = torch.randn_like(b)
                a.grad, b.grad = g.to(DEV), g
            og.step()
            oc.step()
            for a, b in zip(gpu, cpu):
                # v depends on the grads only: exact on both
                assert torch.equal(og.state[a]["exp_avg_sq"].cpu(), oc.state[b]["exp_avg_sq"])
                dq = (og.state[a]["exp_avg"].cpu().int() - oc.state[b]["exp_avg"].int()).abs()
                assert int(dq.max()) <= 1
                # each code apart moves its element's update by lr * (1/127) / sqrt(c) at most
                torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=0,
                                           atol=5 * 1e-2 * 2 / 127 / (1 - 0.95) ** 0.5)
    finally:
        torch_backend.USE_COMPILED_CPU_STEP = old


def test_ratio8_cuda_graph_replay_equals_eager_steps():
    ps = params(sizes=(1000, 70000))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    lr = torch.tensor(1e-2, device=DEV)
    opt = TiedAdamW(ps, lr=lr, beta=0.95, capturable=True, state_dtype="ratio8", seed=3,
                    backend="triton")
    ropt = TiedAdamW(ref, lr=1e-2, beta=0.95, state_dtype="ratio8", seed=3, backend="triton")
    grads = [torch.randn_like(p) for p in ps]
    for p, r, g in zip(ps, ref, grads):
        p.grad, r.grad = g, g.clone()
    graph = _warm_up_and_capture(opt)
    ropt.step()
    for new_lr in [5e-3, 2e-3, 1e-3]:
        lr.fill_(new_lr)
        graph.replay()
        ropt.param_groups[0]["lr"] = new_lr
        ropt.step()
    torch.cuda.synchronize()
    for p, r in zip(ps, ref):  # the same kernel, rounding noise keyed by seed and step
        assert torch.equal(p, r)
        assert torch.equal(opt.state[p]["exp_avg"], ropt.state[r]["exp_avg"])


# max_grad_norm (Note [clipping] in the kernel, Note [global norm] in optim/clipping.py) -------
@pytest.mark.parametrize("amp", [False, True])
def test_clipping_makes_no_host_sync_and_equals_clipping_first(amp):
    """The norm, the coefficient and the update stay on the device; the result is the same
    bits as clip_grad_norm_ (same foreach norm, same fp32 product) followed by TiedAdamW."""
    ps = params(sizes=(1000, K.CHUNK + 3, 1 << 20))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = TiedAdamW(ps, lr=1e-2, beta=0.9, backend="triton", max_grad_norm=0.5)
    ropt = TiedAdamW(ref, lr=1e-2, beta=0.9, backend="triton")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ps]
        for p, r, g in zip(ps, ref, grads):
            p.grad, r.grad = (g * 1024 if amp else g.clone()), g.clone()
        if amp:
            opt.grad_scale = torch.tensor(1024.0, device=DEV)
            opt.found_inf = torch.tensor(0.0, device=DEV)
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ropt.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
        for p, r in zip(ps, ref):
            if amp:  # unscaled by the kernel's reciprocal, not clip_grad_norm_'s division
                assert_close(p, r)
            else:
                assert torch.equal(p, r)


def test_clipping_inside_a_cuda_graph_follows_new_grads():
    ps = params(torch.float32, (1000, 70000))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = TiedAdamW(ps, lr=torch.tensor(1e-2, device=DEV), beta=0.9, capturable=True,
                    backend="triton", max_grad_norm=0.5)
    ropt = TiedAdamW(ref, lr=1e-2, beta=0.9, backend="triton", max_grad_norm=0.5)
    for p, r in zip(ps, ref):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.clone()
    graph = _warm_up_and_capture(opt)
    ropt.step()
    for scale in (0.1, 10.0, 3.0):  # unclipped, clipped, clipped
        for p, r in zip(ps, ref):
            g = torch.randn_like(p) * scale
            p.grad.copy_(g)
            r.grad = g.clone()
        graph.replay()
        ropt.step()
        torch.cuda.synchronize()
        torch.testing.assert_close(opt.last_grad_norm, ropt.last_grad_norm, rtol=1e-6, atol=0)
    for p, r in zip(ps, ref):
        assert_close(p, r)
