"""Optimizer step throughput: TiedAdamW (each mode) against torch.optim.AdamW and the peers, on
the device at hand (CUDA if present, else CPU).

Workloads (element counts scale with --scale):
  llama   the parameter list of TinyLlama-1.1B (22 layers, hidden 2048, GQA): 201 tensors, 1.1B
  small   2,000 tensors of 65,536 elements (many small tensors: launch/metadata overhead)
  flat    one flat 1B-element tensor (a ZeRO partition)

Each workload runs twice per provider (``--grads``): ``fresh``, new grad tensor objects before
every step (as autograd after ``zero_grad(set_to_none=True)`` leaves them; the headline), and
``kept``, the same grad tensors every step (the cached-plan best case).

Per row: ``median_s``, device time of the whole ``step()`` call (CUDA events around it: the
host run-up the GPU waits for is inside); ``kernel_s``, device time of the work the step
launched (kernels, copies, memsets, from torch's profiler: the same method for every provider;
None on CPU); ``host_s``, wall time of the call; effective bandwidth = counted bytes / time, and
percent of a device-to-device copy's bandwidth measured in the same run, from ``kernel_s``
(``pct_of_copy_bw``: the roofline) and from ``median_s`` (``step_pct_of_copy_bw``); ratio to
torch fused AdamW (same workload and grads; the clipping rows, ``tiedadam-clip`` =
TiedAdamW(max_grad_norm=1.0), against ``torch-fused-clip`` = clip_grad_norm_ + torch fused
AdamW: 32 against 40 bytes per param); host-device synchronisations inside ``step()``
(CUDA only: torch's sync debug mode, its per-sync message only). Writes bench_step.json (after
every row: a stage stopped by its time budget keeps what it measured) and bench_step.png to
--out and prints a table last.

    python perf/bench_step.py                       # GPU: full size; CPU: use --scale 0.01
    python perf/bench_step.py --scale 0.001 --iters 5 --providers tiedadam,torch-fused
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (OUT_HELP, SCRATCH, count_syncs, kernel_time, machine, median_time,  # noqa: E402
                    progress, release, versions, write_json)
from providers import PROVIDERS, Unavailable, make_optimizer  # noqa: E402

BETA = 0.95


def llama_shapes(scale: float) -> list[tuple[int, ...]]:
    """TinyLlama-1.1B: vocab 32000, hidden 2048, 22 layers, 32 heads / 4 kv heads, mlp 5632."""
    vocab, hidden, layers, kv, mlp = 32000, 2048, 22, 256, 5632
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                   (hidden,), (mlp, hidden), (mlp, hidden), (hidden, mlp)]
    shapes += [(hidden,), (vocab, hidden)]
    return [(max(1, round(s[0] * scale)),) + s[1:] for s in shapes]


WORKLOADS = {
    "llama": llama_shapes,
    "small": lambda scale: [(max(1, round(65536 * scale)),)] * 2000,
    "flat": lambda scale: [(max(1, round(2 ** 30 * scale)),)],
}


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), warmup=3, iters=10, device=device)["median_s"]
    return 2 * nbytes / t


GRADS = ("fresh", "kept")


def fresh_grads(targets, sets: int = 2):
    """``prepare()`` that gives every target a grad tensor object other than the last step's
    (``sets`` sets made up front and cycled: no allocation or RNG inside the timing)."""
    pool = [[torch.randn_like(t) * 1e-3 for t in targets] for _ in range(sets)]
    i = [0]

    def prepare():
        for t, g in zip(targets, pool[i[0] % sets]):
            t.grad = g
        i[0] += 1
    return prepare


def host_time(step, device: str, iters: int, prepare=None) -> float:
    """Median wall time of the step() call itself (launch overhead on CUDA)."""
    out = []
    for _ in range(iters):
        if prepare is not None:
            prepare()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    out.sort()
    return out[len(out) // 2]


def run_one(provider: str, shapes, device: str, args, grads: str) -> dict:
    spec = PROVIDERS[provider]
    pdtype = spec.param_dtype
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=pdtype) * 0.02)
              for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(provider, params, lr=1e-4, beta=BETA, device=device)
    targets = getattr(opt, "grad_params", params)  # whose .grad the optimizer reads
    prepare = fresh_grads(targets) if grads == "fresh" else None
    step = opt.step
    timing = median_time(step, warmup=args.warmup, iters=args.iters, device=device,
                         prepare=prepare)
    n = sum(p.numel() for p in params)
    row = dict(provider=provider, algorithm=spec.algorithm, grads=grads, numel=n,
               tensors=len(params), bytes_per_param=spec.bytes_per_param,
               bytes=spec.bytes_per_param * n, **timing,
               kernel_s=kernel_time(step, iters=args.iters, device=device, prepare=prepare),
               host_s=host_time(step, device, max(5, args.iters // 2), prepare),
               syncs=count_syncs(step, prepare))
    row["bandwidth_Bps"] = row["bytes"] / row["median_s"]
    row["kernel_bandwidth_Bps"] = row["bytes"] / row["kernel_s"] if row["kernel_s"] else None
    del opt, params, targets, prepare
    release(device)
    return row


def finish(rows) -> None:
    """Ratios against torch fused AdamW on the same workload and grads (the clipping rows:
    against clip_grad_norm_ + torch fused AdamW, ``providers.Provider.reference``)."""
    for r in rows:
        r["reference"] = PROVIDERS[r["provider"]].reference
        ref = next((x for x in rows if x["workload"] == r["workload"]
                    and x["grads"] == r["grads"] and x["provider"] == r["reference"]), None)
        r["speedup_vs_torch_fused"] = ref["median_s"] / r["median_s"] if ref else None
        r["kernel_speedup_vs_torch_fused"] = (ref["kernel_s"] / r["kernel_s"]
                                              if ref and ref["kernel_s"] and r["kernel_s"]
                                              else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--scale", type=float, default=None,
                    help="scale every workload's element count (default 1 on CUDA, 0.01 on CPU)")
    ap.add_argument("--workloads", default="llama,small,flat", help="comma list of " + ",".join(WORKLOADS))
    ap.add_argument("--providers", default=None,
                    help="comma list (default: all); known: " + ",".join(PROVIDERS))
    ap.add_argument("--iters", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--grads", default=",".join(GRADS),
                    help="comma list: fresh (new grad tensors every step), kept (the same)")
    args = ap.parse_args(argv)
    device = args.device
    scale = args.scale if args.scale is not None else (1.0 if device == "cuda" else 0.01)
    names = args.providers.split(",") if args.providers else list(PROVIDERS)
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        ap.error(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")

    before = machine()
    copy_bw = copy_bandwidth(device, 1 << (30 if device == "cuda" else 27))
    progress(f"device {device}; copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    tag = f"_{args.tag}" if args.tag else ""
    grads_modes = args.grads.split(",")
    rows, skipped = [], {}

    def save(complete: bool) -> str:
        finish(rows)
        payload = dict(what="optimizer step throughput", device=device, scale=scale,
                       beta=BETA, copy_bandwidth_Bps=copy_bw, machine_before=before,
                       machine_after=machine(), versions=versions(), config=vars(args),
                       complete=complete, skipped=skipped, results=rows)
        return write_json(args.out, f"bench_step{tag}.json", payload)

    try:
        for wl in args.workloads.split(","):
            shapes = WORKLOADS[wl](scale)
            for name in names:
                if name in skipped:  # unavailable here: said once, not once per workload
                    continue
                for grads in grads_modes:
                    progress(f"[{wl}] {name} ({grads} grads) ...")
                    try:
                        row = run_one(name, shapes, device, args, grads)
                    except Unavailable as e:
                        skipped[name] = str(e)
                        progress(f"  skipped: {e}")
                        break
                    row["workload"] = wl
                    gpu = device == "cuda"
                    row["pct_of_copy_bw"] = (100.0 * row["kernel_bandwidth_Bps"] / copy_bw
                                             if gpu and row["kernel_bandwidth_Bps"] else None)
                    row["step_pct_of_copy_bw"] = (100.0 * row["bandwidth_Bps"] / copy_bw
                                                  if gpu else None)
                    rows.append(row)
                    save(complete=False)  # a stage stopped by its budget keeps this much
    except KeyboardInterrupt:  # the GPU suite's time budget (timeout --signal=INT)
        path = save(complete=False)
        print(f"interrupted: wrote {len(rows)} rows to {path}")
        return 1
    path = save(complete=True)
    plot(rows, os.path.join(args.out, f"bench_step{tag}.png"), device, copy_bw)
    print_table(rows, skipped, device, copy_bw)
    print(f"wrote {path}")
    return 0


def plot(rows, path, device, copy_bw) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    head = [r for r in rows if r["grads"] == "fresh"] or rows  # the headline: fresh grads
    rows = head
    wls = list(dict.fromkeys(r["workload"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(wls) * max(1, len(provs)) / 3), 4))
    width = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        ys = [next((r["bandwidth_Bps"] / 1e9 for r in rows
                    if r["workload"] == w and r["provider"] == p), 0.0) for w in wls]
        ax.bar([i + j * width for i in range(len(wls))], ys, width, label=p)
    ax.axhline(copy_bw / 1e9, color="k", ls="--", lw=1, label="device copy")
    ax.set_xticks([i + width * (len(provs) - 1) / 2 for i in range(len(wls))], wls)
    ax.set_ylabel("effective bandwidth (GB/s)")
    ax.set_title(f"optimizer step, {device}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows, skipped, device, copy_bw) -> None:
    print(f"\noptimizer step on {device} (copy bandwidth {copy_bw / 1e9:.1f} GB/s)")
    hdr = (f"{'workload':<10}{'provider':<22}{'grads':<6}{'tensors':>8}{'numel':>12}"
           f"{'step ms':>9}{'kern ms':>9}{'%copy':>7}{'vs fused':>9}{'host us':>9}{'syncs':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        vs = f"{r['speedup_vs_torch_fused']:.2f}x" if r["speedup_vs_torch_fused"] else "-"
        pct = "-" if r["pct_of_copy_bw"] is None else f"{r['pct_of_copy_bw']:.1f}"
        kern = "-" if r["kernel_s"] is None else f"{r['kernel_s'] * 1e3:.3f}"
        print(f"{r['workload']:<10}{r['provider']:<22}{r['grads']:<6}{r['tensors']:>8}"
              f"{r['numel']:>12}{r['median_s'] * 1e3:>9.3f}{kern:>9}{pct:>7}{vs:>9}"
              f"{r['host_s'] * 1e6:>9.0f}{'-' if r['syncs'] is None else r['syncs']:>6}")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    if device == "cpu":  # what reads wrong on a CPU (README, "Performance", says the same)
        print("notes: on CPU there is no separate kernel time and no %copy: one copy_ is not a "
              "bandwidth ceiling there (caches, threads). On CPU TiedAdamW runs torch's fused "
              "AdamW for fp32 and, for its other modes (and fp32 with telemetry, whose "
              "statistics it computes in the same pass), one native pass per param group "
              "(tiedadam/kernels/native_cpu.cpp; the compiled step where it cannot be built, "
              "torch ops on fp32 working copies without a C++ compiler).")


if __name__ == "__main__":
    sys.exit(main())
