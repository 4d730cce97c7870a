"""Host cost of TiedAdamW.step(): the Python and launch-preparation work per step, with the
Triton kernel launch replaced by a no-op so the figure means the same on any machine (on a GPU,
``--real-launch`` also times it with the real launch, host side only: no synchronisation).

    python perf/bench_host.py [--out DIR] [--params 500] [--iters 200] [--rounds 10] [--real-launch]

Workloads, each with fresh grads every step (new tensor objects, as zero_grad(set_to_none=True)
leaves them; made outside the timed call) unless said otherwise:

    flat          one tensor (a ZeRO partition)
    table-fresh   --params tensors in one group (the multi-tensor table path)
    table-kept    the same, grads kept between steps (zero_grad(set_to_none=False))
    groups        --params tensors over 10 groups
    table-dtensor --params DTensor params sharded on a 1-process gloo mesh, fresh DTensor grads
                  (the FSDP2 path: the kernel steps the local shards)

and in the same run the references: the Python floor (a loop reading each param's ``.grad``),
an empty ``torch.optim.Optimizer.step`` (the wrapper every optimizer pays), and
torch.optim.AdamW(fused=True) and (foreach=True) on the same params with tiny tensors (16
elements: their compute is negligible, what is left is host cost). Reported as ratios against
the goals of perf/README.md: table-fresh <= 2x the floor; flat <= 30 us above the empty wrapper;
both >= 5x cheaper than fused AdamW.

Writes bench_host.json and bench_host.png into --out and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import OUT_HELP, SCRATCH, barh, machine, progress, versions, write_json  # noqa: E402

NUMEL = 16  # per tensor: the step's compute is not what is measured


class _NoLaunch:
    """Stands in for the jitted kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_us(cases: list, iters: int, rounds: int, sync=None) -> list[dict]:
    """Median host microseconds of each case's ``step()``, the cases timed in rotation: ``rounds``
    rounds of ``iters // rounds`` calls each, so a slow spell of the machine (this VM's load
    varies by 2x within a minute) hits every case alike and ratios within a run stay fair.
    ``prepare()`` (fresh grads) runs untimed before each call, ``sync()`` (the GPU) too."""
    per_round = max(iters // rounds, 1)
    times = [[] for _ in cases]
    for step, prepare in cases:
        for _ in range(10):
            prepare()
            step()
    for _ in range(rounds):
        for (step, prepare), ts in zip(cases, times):
            for _ in range(per_round):
                prepare()
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
    return [{"median_us": statistics.median(ts) * 1e6, "min_us": min(ts) * 1e6,
             "iters": len(ts)} for ts in times]


def make_params(n: int, device: str, numel: int = NUMEL):
    return [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(n)]


def dtensor_params(n: int, device: str):
    """``n`` DTensor params, Shard(0) over a 1-process mesh (a gloo group is started if none
    is; None where torch.distributed is unavailable): FSDP2's shape of the problem."""
    import torch.distributed as dist
    if not dist.is_available():
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    if not dist.is_initialized():
        import tempfile
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("gloo" if device == "cpu" else "nccl", store=store, rank=0,
                                world_size=1)
    mesh = init_device_mesh(device, (1,))
    return [torch.nn.Parameter(distribute_tensor(torch.randn(NUMEL, device=device), mesh,
                                                 [Shard(0)])) for _ in range(n)]


def fresh_grads(params, sets: int = 4):
    """``prepare`` that hands each param a new grad tensor object every call."""
    pool = [[torch.randn_like(p) for p in params] for _ in range(sets)]
    state = {"i": 0}

    def prepare():
        grads = pool[state["i"] % sets]
        state["i"] += 1
        for p, g in zip(params, grads):
            p.grad = g  # another object than last step's (the pool cycles)
    return prepare


def measure(args, device: str, real_launch: bool) -> list[dict]:
    from tiedadam import TiedAdamW
    from tiedadam.kernels import tied_adamw as K

    saved = K._tied_adamw_kernel
    if not real_launch:
        K._tied_adamw_kernel = _NoLaunch()
    sync = torch.cuda.synchronize if device == "cuda" else None
    cases = []  # (workload, kind, tensors, step, prepare)
    try:
        n = args.params
        # TiedAdamW, Triton backend (launch as chosen)
        flat = make_params(1, device, 1 << 20)
        opt = TiedAdamW(flat, lr=1e-3, beta=0.95, backend="triton")
        cases.append(("flat", "tiedadam", 1, opt.step, fresh_grads(flat)))
        ps = make_params(n, device)
        opt = TiedAdamW(ps, lr=1e-3, beta=0.95, backend="triton")
        cases.append(("table-fresh", "tiedadam", n, opt.step, fresh_grads(ps)))
        kept = make_params(n, device)
        for p in kept:
            p.grad = torch.randn_like(p)
        opt = TiedAdamW(kept, lr=1e-3, beta=0.95, backend="triton")
        cases.append(("table-kept", "tiedadam", n, opt.step, lambda: None))
        grouped = make_params(n, device)
        groups = [{"params": grouped[i::10], "lr": 1e-3 * (1 + i)} for i in range(10)]
        opt = TiedAdamW(groups, lr=1e-3, beta=0.95, backend="triton")
        cases.append(("groups", "tiedadam", n, opt.step, fresh_grads(grouped)))
        sharded = dtensor_params(n, device)
        if sharded is not None:
            opt = TiedAdamW(sharded, lr=1e-3, beta=0.95, backend="triton")
            cases.append(("table-dtensor", "tiedadam", n, opt.step, fresh_grads(sharded)))
        if not real_launch:
            # References on the same kind of params (tiny tensors: host cost)
            ps = make_params(n, device)
            prep = fresh_grads(ps)
            prep()
            cases.append(("table-fresh", "floor", n, lambda: [p.grad for p in ps], prep))

            class Empty(torch.optim.Optimizer):
                def step(self, closure=None):
                    return None

            cases.append(("flat", "empty-step", 1, Empty(make_params(1, device), {}).step,
                          lambda: None))
            for kind, kw in (("torch-fused", dict(fused=True)),
                             ("torch-foreach", dict(foreach=True))):
                ref = torch.optim.AdamW(ps, lr=1e-3, betas=(0.95, 0.95), **kw)
                cases.append(("table-fresh", kind, n, ref.step, prep))
                one = make_params(1, device)
                ref1 = torch.optim.AdamW(one, lr=1e-3, betas=(0.95, 0.95), **kw)
                cases.append(("flat", kind, 1, ref1.step, fresh_grads(one)))
        results = host_us([(c[3], c[4]) for c in cases], args.iters, args.rounds, sync)
    finally:
        K._tied_adamw_kernel = saved
    rows = []
    for (name, kind, tensors, _, _), res in zip(cases, results):
        res.update(workload=name, kind=kind, tensors=tensors, device=device,
                   launch="real" if real_launch else "no-op")
        rows.append(res)
        progress(f"  {name:<14} {kind:<14} {res['median_us']:>10.1f} us")
    return rows


def ratios(rows) -> dict:
    get = {(r["workload"], r["kind"], r["launch"]): r["median_us"] for r in rows}
    t = get.get(("table-fresh", "tiedadam", "no-op"))
    f = get.get(("flat", "tiedadam", "no-op"))
    out = {}
    if t is not None:
        out["table_fresh_over_floor"] = t / get[("table-fresh", "floor", "no-op")]
        out["torch_fused_over_table_fresh"] = get[("table-fresh", "torch-fused", "no-op")] / t
        out["torch_foreach_over_table_fresh"] = get[("table-fresh", "torch-foreach", "no-op")] / t
    if f is not None:
        out["flat_above_empty_step_us"] = f - get[("flat", "empty-step", "no-op")]
        out["torch_fused_over_flat"] = get[("flat", "torch-fused", "no-op")] / f
    return out


GOALS = {"table_fresh_over_floor": ("<=", 2.0), "flat_above_empty_step_us": ("<=", 30.0),
         "torch_fused_over_table_fresh": (">=", 5.0), "torch_fused_over_flat": (">=", 5.0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--params", type=int, default=500)
    ap.add_argument("--iters", type=int, default=200, help="timed calls per case")
    ap.add_argument("--rounds", type=int, default=10,
                    help="the cases are timed in rotation, iters/rounds calls per turn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--real-launch", action="store_true",
                    help="also time the steps with the real kernel launch (CUDA only)")
    ap.add_argument("--no-fast-guard", action="store_true",
                    help="every step through the guard's full comparison (Note [guard fast "
                         "path] in tiedadam/optim/guard.py): what the fast check saves")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        # The no-op launch lets the Triton path step CPU tensors; nothing runs in the
        # interpreter (the variable must be set before tiedadam's kernels are imported).
        os.environ["TRITON_INTERPRET"] = "1"
    if args.no_fast_guard:
        from tiedadam.optim import guard
        guard.USE_FAST_GUARD = False
    progress(f"host cost of step(), {args.params} params, {args.device}, kernel launch no-op")
    rows = measure(args, args.device, real_launch=False)
    if args.real_launch and args.device == "cuda":
        progress("with the real launch")
        rows += measure(args, args.device, real_launch=True)
    r = ratios(rows)
    path = write_json(args.out, "bench_host.json", dict(
        what="host microseconds per optimizer step (median), kernel launch replaced by a no-op",
        device=args.device, machine=machine(), versions=versions(), config=vars(args),
        results=rows, ratios=r, goals={k: f"{op} {v}" for k, (op, v) in GOALS.items()}))
    plot(rows, os.path.join(args.out, "bench_host.png"))
    print(f"\n{'workload':<14}{'kind':<15}{'launch':<8}{'host us':>10}")
    for x in rows:
        print(f"{x['workload']:<14}{x['kind']:<15}{x['launch']:<8}{x['median_us']:>10.1f}")
    print()
    for k, v in r.items():
        if k not in GOALS:
            print(f"{k:<32}{v:>9.2f}")
            continue
        op, goal = GOALS[k]
        met = v <= goal if op == "<=" else v >= goal
        print(f"{k:<32}{v:>9.2f}   goal {op} {goal:<6} {'met' if met else 'not met'}")
    print(f"wrote {path}")
    return 0


def plot(rows, path):
    labels = [f"{r['workload']} / {r['kind']}" + (" (real launch)" if r["launch"] == "real" else "")
              for r in rows]
    barh(labels, [r["median_us"] for r in rows], "host µs per step (median)", path, log=True,
         height=4)


if __name__ == "__main__":
    sys.exit(main())
