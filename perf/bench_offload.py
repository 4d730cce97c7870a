"""ZeRO-Offload's optimizer step: one flat fp32 CPU partition (50M elements by default), as
DeepSpeed hands it to the optimizer under ``offload_optimizer: {"device": "cpu"}``.

TiedAdamW (its CPU path: torch's fused AdamW with betas (beta, beta)) against DeepSpeedCPUAdam
(DeepSpeed's JIT-built AVX op) and torch.optim.AdamW(fused=True). Median of --iters steps,
timed in rotation (Note [interleaving]).

    python perf/bench_offload.py [--numel 50000000] [--iters 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_HELP, SCRATCH, machine, median_time, progress, versions, write_json  # noqa: E402
from providers import Unavailable, make_optimizer  # noqa: E402

BYTES_PER_PARAM = 28  # read p, g, m, v (16 B) + write p, m, v (12 B), fp32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--providers", default="tiedadam,deepspeed-cpu,torch-fused")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Note [interleaving]: the providers' steps are timed in rotation (one step each, round
    # after round) so that drifts in the machine's memory bandwidth, large on shared VMs, hit
    # all of them alike; sequential blocks measured the same kernel 12 ms and 21 ms apart.
    opts, skipped = {}, {}
    for name in args.providers.split(","):
        p = torch.nn.Parameter(torch.randn(args.numel) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        try:
            opts[name] = make_optimizer(name, [p], lr=1e-4, beta=0.95, device="cpu")
        except Unavailable as e:
            skipped[name] = str(e)
            progress(f"{name} skipped: {e}")
    for _ in range(args.warmup):
        for opt in opts.values():
            opt.step()
    times = {name: [] for name in opts}
    for i in range(args.iters):
        for name, opt in opts.items():
            times[name].append(median_time(opt.step, warmup=0, iters=1, device="cpu")["median_s"])
        if (i + 1) % 10 == 0:
            progress(f"round {i + 1}/{args.iters}")
    rows = []
    for name, ts in times.items():
        ts = sorted(ts)
        med = ts[len(ts) // 2]
        rows.append(dict(provider=name, numel=args.numel, median_s=med, min_s=ts[0],
                         max_s=ts[-1], iters=len(ts), bandwidth_Bps=BYTES_PER_PARAM * args.numel / med,
                         params_per_s=args.numel / med))
    del opts
    gc.collect()
    ds = next((r for r in rows if r["provider"] == "deepspeed-cpu"), None)
    for r in rows:
        r["speedup_vs_deepspeed_cpu_adam"] = ds["median_s"] / r["median_s"] if ds else None
    path = write_json(args.out, "bench_offload.json", dict(
        what="ZeRO-Offload optimizer step on one flat fp32 CPU partition",
        machine_before=machine(), versions=versions(), config=vars(args), skipped=skipped,
        results=rows))
    print(f"\nZeRO-Offload step, {args.numel:,}-element fp32 partition, {args.threads} threads")
    print(f"{'provider':<16}{'ms':>9}{'GB/s':>8}{'Mparam/s':>10}{'vs DS CPUAdam':>15}")
    for r in rows:
        vs = r["speedup_vs_deepspeed_cpu_adam"]
        print(f"{r['provider']:<16}{r['median_s'] * 1e3:>9.1f}{r['bandwidth_Bps'] / 1e9:>8.1f}"
              f"{r['params_per_s'] / 1e6:>10.0f}{(f'{vs:.2f}x' if vs else '-'):>15}")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
