"""Optimizer memory per provider and mode on the TinyLlama-1.1B parameter list: state bytes per
parameter, and peak device memory during a step (torch.cuda.max_memory_allocated around the
step; pynvml's view of the whole device before and after).

    python perf/bench_memory.py [--scale 1] [--providers ...] [--out DIR]

On CPU only state bytes are measured (peak device memory is a CUDA notion): use --scale 0.01.
Writes bench_memory.json and bench_memory.png and prints a table last.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import llama_shapes  # noqa: E402
from common import OUT_HELP, SCRATCH, barh, gpu_snapshot, machine, progress, release, versions, write_json  # noqa: E402
from providers import PROVIDERS, Unavailable, make_optimizer, state_bytes  # noqa: E402

DEFAULT = ("tiedadam,tiedadam-master-bf16,tiedadam-bf16-state,tiedadam-ratio8,"
           "tiedadam-pure-bf16,"
           "torch-fused,torch-fused+copy-bf16,deepspeed-fused,bnb-adamw8bit,torchao-adamw8bit")


def measure(name, shapes, device):
    spec = PROVIDERS[name]
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=spec.param_dtype) * 0.02)
              for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    opt = make_optimizer(name, params, lr=1e-4, beta=0.95, device=device)
    opt.step()  # state exists after the first step
    row = dict(provider=name, algorithm=spec.algorithm, numel=n, param_dtype=str(spec.param_dtype))
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        nvml_before = (gpu_snapshot() or {}).get("memory_used_mib")
        opt.step()
        torch.cuda.synchronize()
        row.update(step_peak_extra_bytes=torch.cuda.max_memory_allocated() - base,
                   allocated_bytes=base, nvml_used_mib_before=nvml_before,
                   nvml_used_mib_after=(gpu_snapshot() or {}).get("memory_used_mib"))
    row["state_bytes"] = state_bytes(opt)
    row["state_bytes_per_param"] = row["state_bytes"] / n
    del opt, params
    release(device)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--scale", type=float, default=None, help="default 1 on CUDA, 0.01 on CPU")
    ap.add_argument("--providers", default=DEFAULT)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    scale = args.scale if args.scale is not None else (1.0 if args.device == "cuda" else 0.01)
    shapes = llama_shapes(scale)
    rows, skipped = [], {}
    for name in args.providers.split(","):
        progress(f"{name} ...")
        try:
            rows.append(measure(name, shapes, args.device))
        except Unavailable as e:
            skipped[name] = str(e)
            progress(f"  skipped: {e}")
    tag = f"_{args.tag}" if args.tag else ""
    path = write_json(args.out, f"bench_memory{tag}.json", dict(
        what="optimizer memory on the TinyLlama-1.1B parameter list", device=args.device,
        scale=scale, machine_before=machine(), versions=versions(), config=vars(args),
        skipped=skipped, results=rows))
    plot(rows, os.path.join(args.out, f"bench_memory{tag}.png"))
    print(f"\noptimizer memory, {rows[0]['numel'] if rows else 0:,} params, {args.device}")
    print(f"{'provider':<24}{'state B/param':>14}{'state MiB':>11}{'step peak extra MiB':>21}")
    for r in rows:
        extra = r.get("step_peak_extra_bytes")
        print(f"{r['provider']:<24}{r['state_bytes_per_param']:>14.2f}{r['state_bytes'] / 2**20:>11.1f}"
              f"{'-' if extra is None else f'{extra / 2**20:.1f}':>21}")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    print(f"wrote {path}")
    return 0


def plot(rows, path):
    barh([r["provider"] for r in rows], [r["state_bytes_per_param"] for r in rows],
         "optimizer state bytes per parameter", path)


if __name__ == "__main__":
    sys.exit(main())
