"""Which bound each kernel variant hits: its measured kernel time beside the memory floor (bytes
over the copy bandwidth measured in the same run) and the issue floor (the static estimate of
perf/kernel_report.py: SASS instructions per element on the hot loop's fast path, times
elements, over what the SMs can issue).

    python perf/bench_variants.py [--numel N] [--tensors T] [--iters 10] [--out DIR]

Every variant of perf/sass.py's list (param/state dtypes, master weights, AMP scaling,
stochastic rounding, telemetry; as a table of --tensors tensors and as one flat tensor) is
launched through TiedAdamW configured for exactly that variant, on --numel elements in all, and
timed by the device time of the step's own work (torch's profiler: ``kernel_s``). Per variant:

    bytes       bytes moved per element by role (perf/sass.py ``roles``) x elements
    t_memory    bytes / copy bandwidth (read + write) of a device copy in the same run
    t_issue     instructions/element (kernel_report.json) x elements
                / (SMs x 128 thread-instructions per cycle x SM clock)
    bound       the larger of the two; efficiency = that floor / kernel_s

On a CPU (the GPU suite's --dry-run) the kernel runs in Triton's interpreter at a toy size:
the rows are written with the same fields, ``kernel_s`` None and the wall time of the step in
its place, to rehearse the plumbing; they say nothing about speed. Writes bench_variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import copy_bandwidth  # noqa: E402
from common import (OUT_HELP, ROOT, SCRATCH, kernel_time, machine, median_time,  # noqa: E402
                    progress, release, versions, write_json)

# An SM of sm_90 has 4 schedulers, each issuing one warp instruction (32 threads) per cycle.
ISSUE_PER_SM_PER_CYCLE = 4 * 32


def sm_clock_hz() -> float | None:
    """The SM's maximum clock (pynvml), the rate the issue estimate assumes; None without."""
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        pynvml.nvmlShutdown()
        return mhz * 1e6
    except Exception:
        return None


def static_report(path: str) -> dict:
    """variant name -> instructions per element, from a kernel_report.json."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {v["name"]: v["loop"]["instructions_per_element"]
                for v in json.load(f)["variants"]}


def optimizer_for(spec: dict, numel: int, tensors: int, device: str):
    """TiedAdamW and its params, configured to launch exactly ``spec``'s kernel variant."""
    from tiedadam import TiedAdamW
    n = 1 if spec["flat"] else tensors
    sizes = [numel // n] * n
    params = [torch.nn.Parameter(torch.randn(k, device=device).to(spec["param"]) * 0.02)
              for k in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    state = spec["state"] if spec["param"] != torch.float64 else torch.float64
    names = {torch.bfloat16: "bfloat16", torch.int8: "ratio8"}  # int8: sass.py's ratio8
    opt = TiedAdamW(params, lr=1e-4, beta=0.95, backend="triton",
                    state_dtype=names.get(state),
                    master_weights=spec["master"], stochastic_rounding=spec["state_sr"],
                    param_stochastic_rounding=spec["param_sr"],
                    telemetry=spec.get("telemetry", False),
                    # a bound no grad reaches: the coefficient is read, and is 1
                    max_grad_norm=1e9 if spec.get("clip") else None)
    if spec["scale"]:  # AMP: the kernel unscales (and writes the unscaled grad back)
        opt.grad_scale = torch.tensor(1024.0, device=device)
        opt.found_inf = torch.zeros((), device=device)
        for p in params:
            p.grad.mul_(1024.0)
    return opt, params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--numel", type=int, default=None,
                    help="elements per variant (default 2**28 on CUDA, 2**12 on CPU)")
    ap.add_argument("--tensors", type=int, default=8, help="tensors of a table variant")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="only the first N variants")
    ap.add_argument("--report", default=os.path.join(ROOT, "perf", "results",
                                                     "kernel_report.json"),
                    help="the static kernel report to read instructions per element from")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before tiedadam's kernels import
    import sass
    numel = args.numel or (2 ** 28 if device == "cuda" else 2 ** 12)
    ipe = static_report(args.report)
    clock = sm_clock_hz() if device == "cuda" else None
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else None
    copy_bw = copy_bandwidth(device, 1 << (30 if device == "cuda" else 24))
    progress(f"device {device}; copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
             f"{sms} SMs at {clock and clock / 1e9} GHz; {numel:,} elements per variant")
    specs = list(sass.variants())[:args.limit]
    rows = []
    for spec in specs:
        name = sass.variant_name(**spec)
        opt, params = optimizer_for(spec, numel, args.tensors, device)
        timing = median_time(opt.step, warmup=args.warmup, iters=args.iters, device=device)
        k = kernel_time(opt.step, iters=args.iters, device=device)
        per_el = sum(b * (ld + st) for b, ld, st in sass.roles(**spec).values())
        n = sum(p.numel() for p in params)
        t_mem = per_el * n / copy_bw
        t_issue = (ipe[name] * n / (sms * ISSUE_PER_SM_PER_CYCLE * clock)
                   if name in ipe and sms and clock else None)
        floor = max(t_mem, t_issue or 0.0)
        measured = k if k is not None else timing["median_s"]
        row = dict(variant=name, numel=n, tensors=len(params), bytes_per_element=per_el,
                   kernel_s=k, step_median_s=timing["median_s"],
                   kernel_bandwidth_Bps=per_el * n / k if k else None,
                   pct_of_copy_bw=100.0 * t_mem / k if k else None,
                   instructions_per_element=ipe.get(name), t_memory_s=t_mem,
                   t_issue_s=t_issue,
                   bound=None if t_issue is None else ("issue" if t_issue > t_mem else "memory"),
                   efficiency=floor / k if k else None)
        rows.append(row)
        progress(f"  {name:<30} {measured * 1e3:9.3f} ms  floor {floor * 1e3:8.3f} ms  "
                 f"{row['bound'] or '-'}")
        del opt, params
        release(device)
    path = write_json(args.out, "bench_variants.json", dict(
        what="kernel time per variant against the memory and issue floors", device=device,
        numel=numel, copy_bandwidth_Bps=copy_bw, sms=sms, sm_clock_hz=clock,
        issue_per_sm_per_cycle=ISSUE_PER_SM_PER_CYCLE, static_report=os.path.relpath(
            args.report, ROOT), machine_before=machine(), versions=versions(),
        config=vars(args), results=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
