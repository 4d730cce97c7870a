"""ZeRO-Offload's optimizer step: one flat fp32 CPU partition, as DeepSpeed hands it to the
optimizer under ``offload_optimizer: {"device": "cpu"}``, at each of --numels (50M and 200M
elements by default).

TiedAdamW in each CPU mode against DeepSpeedCPUAdam (DeepSpeed's JIT-built AVX op, fp32 moments)
and torch.optim.AdamW(fused=True):

    tiedadam                  fp32 moments (torch's fused CPU AdamW, betas (beta, beta))
    tiedadam-bf16-sr          bf16 moments, stochastic rounding (the default for bf16 state):
                              the compiled one-pass step (tiedadam/kernels/tied_adamw_cpu.py)
    tiedadam-bf16-nearest     bf16 moments, round to nearest (compiled step)
    tiedadam-bf16-torch-ops   bf16 moments, stochastic, on the torch-op path (what runs without
                              a C++ compiler, and what ran before the compiled step)
    tiedadam-ratio8-sr        ratio8 moments (int8 codes of m / sqrt(v), bf16 v), stochastic
                              rounding, compiled step: 18 bytes moved per parameter
    tiedadam-ratio8-nearest   ratio8, round to nearest (compiled step)

and, on request, the modes for bf16 params (each with its own bf16 copy of the partition):
tiedadam-master-bf16 (fp32 master weights and moments), tiedadam-pure-bf16-sr (bf16 moments,
param rounded stochastically).

Per provider: median step ms (steps timed in rotation, Note [interleaving]), bytes moved per
parameter and GB/s, host bytes of optimizer state per parameter measured from the tensors (the
fp32 partition the optimizer steps plus its moments: what ZeRO-Offload keeps in host RAM), the
process's resident-memory growth from creating the optimizer through its first step, the ratio
to DeepSpeedCPUAdam and to torch fused, and the first call's seconds (the compiled modes compile
there: reported, not hidden). All providers step the same partition and grad (the timing does
not depend on the values), so 200M fits in host RAM.

    python perf/bench_offload.py [--numels 50000000,200000000] [--iters 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_HELP, SCRATCH, machine, progress, versions, write_json  # noqa: E402
from providers import Unavailable, make_optimizer  # noqa: E402

BF16 = torch.bfloat16
# name -> (provider, TiedAdamW options, bytes moved per parameter, compiled CPU step on)
MODES = {
    "tiedadam": ("tiedadam", {}, 28, True),
    "tiedadam-bf16-sr": ("tiedadam", dict(state_dtype=BF16), 20, True),
    "tiedadam-bf16-nearest": ("tiedadam", dict(state_dtype=BF16, stochastic_rounding=False),
                              20, True),
    "tiedadam-bf16-torch-ops": ("tiedadam", dict(state_dtype=BF16), 20, False),
    # ratio8 moments (int8 codes of m / sqrt(v), bf16 v): read p, g fp32, m 1, v 2; write p, m,
    # v: 18 bytes, and 7 B/param of host state with the fp32 partition
    "tiedadam-ratio8-sr": ("tiedadam", dict(state_dtype="ratio8"), 18, True),
    "tiedadam-ratio8-nearest": ("tiedadam", dict(state_dtype="ratio8",
                                                 stochastic_rounding=False), 18, True),
    # bf16 params (not ZeRO-Offload's case, whose partitions are fp32; the other CPU modes):
    # fp32 master + fp32 moments (read p, g bf16, w, m, v; write p bf16, w, m, v: 32 bytes),
    # pure bf16 with stochastic rounding of the param (bf16 everything: 14 bytes)
    "tiedadam-master-bf16": ("tiedadam", dict(master_weights=True, param_dtype=BF16), 32, True),
    "tiedadam-pure-bf16-sr": ("tiedadam", dict(state_dtype=BF16, param_stochastic_rounding=True,
                                               param_dtype=BF16), 14, True),
    "deepspeed-cpu": ("deepspeed-cpu", None, 28, True),
    "torch-fused": ("torch-fused", None, 28, True),
}
DEFAULT = ("tiedadam,tiedadam-bf16-sr,tiedadam-bf16-nearest,tiedadam-ratio8-sr,"
           "tiedadam-ratio8-nearest,deepspeed-cpu,torch-fused")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state_bytes_per_param(opt, param) -> float:
    """(bytes of the partition + every state tensor) / numel, from the tensors themselves."""
    inner = getattr(opt, "opt", opt)
    st = inner.state[param]
    held = param.numel() * param.element_size()
    held += sum(v.numel() * v.element_size() for v in st.values()
                if torch.is_tensor(v) and v.numel() > 1)
    return held / param.numel()


class _Step:
    """One provider's step, with the compiled CPU step switched on or off around it."""

    def __init__(self, opt, compiled: bool):
        from tiedadam.optim import torch_backend
        self.opt, self.compiled, self.backend = opt, compiled, torch_backend

    def __call__(self):
        saved = self.backend.USE_COMPILED_CPU_STEP
        self.backend.USE_COMPILED_CPU_STEP = self.compiled
        try:
            self.opt.step()
        finally:
            self.backend.USE_COMPILED_CPU_STEP = saved


def run_size(numel: int, names: list[str], iters: int, warmup: int) -> tuple[list, dict]:
    from tiedadam import TiedAdamW
    param = torch.nn.Parameter(torch.randn(numel) * 0.02)
    param.grad = torch.randn_like(param) * 1e-3
    steps, rows, skipped = {}, {}, {}
    for name in names:
        provider, options, moved, compiled = MODES[name]
        gc.collect()
        before = rss_bytes()
        p = param
        try:
            if options is None:
                opt = make_optimizer(provider, [param], lr=1e-4, beta=0.95, device="cpu")
            else:
                options = dict(options)
                if "param_dtype" in options:  # its own bf16 param and grad
                    p = torch.nn.Parameter(param.detach().to(options.pop("param_dtype")))
                    p.grad = param.grad.to(p.dtype)
                opt = TiedAdamW([p], lr=1e-4, beta=0.95, weight_decay=0.01, **options)
        except Unavailable as e:
            skipped[name] = str(e)
            progress(f"{name} skipped: {e}")
            continue
        step = _Step(opt, compiled)
        t0 = time.perf_counter()
        step()  # creates the state; the compiled modes compile here
        first = time.perf_counter() - t0
        steps[name] = step
        rows[name] = dict(provider=name, numel=numel, bytes_moved_per_param=moved,
                          first_step_s=first, rss_growth_bytes=rss_bytes() - before,
                          state_bytes_per_param=state_bytes_per_param(opt, p))
        progress(f"  {name}: first step {first:.1f} s")
    for _ in range(warmup):
        for step in steps.values():
            step()
    # Note [interleaving]: the providers' steps are timed in rotation (one step each, round
    # after round) so that drifts in the machine's memory bandwidth, large on shared VMs, hit
    # all of them alike; sequential blocks measured the same kernel 12 ms and 21 ms apart.
    times = {name: [] for name in steps}
    for i in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    out = []
    for name, ts in times.items():
        ts = sorted(ts)
        r = rows[name]
        r.update(median_s=ts[len(ts) // 2], min_s=ts[0], max_s=ts[-1], iters=len(ts))
        r["bandwidth_Bps"] = r["bytes_moved_per_param"] * numel / r["median_s"]
        r["params_per_s"] = numel / r["median_s"]
        out.append(r)
    for ref, key in (("deepspeed-cpu", "speedup_vs_deepspeed_cpu_adam"),
                     ("torch-fused", "speedup_vs_torch_fused")):
        base = rows.get(ref) if ref in times else None
        for r in out:
            r[key] = base["median_s"] / r["median_s"] if base else None
    del steps
    gc.collect()
    return out, skipped


TARGETS = {"tiedadam-bf16-sr": ("speedup_vs_deepspeed_cpu_adam", 1.0),
           "tiedadam-bf16-nearest": ("speedup_vs_deepspeed_cpu_adam", 1.0),
           "tiedadam-ratio8-sr": ("speedup_vs_deepspeed_cpu_adam", 1.3),
           "tiedadam-ratio8-nearest": ("speedup_vs_deepspeed_cpu_adam", 1.3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--numels", default="50000000,200000000")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--providers", default=DEFAULT, help=f"any of {', '.join(MODES)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--inductor-cache", default=None,
                    help="inductor's cache directory (default: a new empty one, so that the "
                         "first step's seconds are a cold compile and no kernel compiled for "
                         "another thread count is reused: Note [compile threads] in "
                         "tiedadam/kernels/tied_adamw_cpu.py)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.inductor_cache is None:
        import tempfile
        args.inductor_cache = tempfile.mkdtemp(prefix="bench_offload_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache
    names = args.providers.split(",")
    unknown = [n for n in names if n not in MODES]
    if unknown:
        ap.error(f"unknown providers {unknown}: choose from {', '.join(MODES)}")
    rows, skipped = [], {}
    for numel in (int(x) for x in args.numels.split(",")):
        progress(f"{numel:,}-element partition")
        r, s = run_size(numel, names, args.iters, args.warmup)
        rows += r
        skipped.update(s)
    from tiedadam.kernels import tied_adamw_cpu
    compile_s = {str(k): v for k, v in tied_adamw_cpu.compile_seconds.items()}
    path = write_json(args.out, "bench_offload.json", dict(
        what="ZeRO-Offload optimizer step on one flat fp32 CPU partition, per TiedAdamW mode",
        machine_before=machine(), versions=versions(), config=vars(args), skipped=skipped,
        compile_seconds=compile_s, targets={k: f"{m} >= {v}" for k, (m, v) in TARGETS.items()},
        results=rows))
    print(f"\nZeRO-Offload step, fp32 partition, {args.threads} threads")
    print(f"{'provider':<25}{'numel':>13}{'ms':>9}{'GB/s':>7}{'B/param':>9}{'RSS MB':>9}"
          f"{'vs DS':>8}{'vs fused':>10}{'first s':>9}")
    for r in rows:
        vs = r["speedup_vs_deepspeed_cpu_adam"]
        vf = r["speedup_vs_torch_fused"]
        print(f"{r['provider']:<25}{r['numel']:>13,}{r['median_s'] * 1e3:>9.1f}"
              f"{r['bandwidth_Bps'] / 1e9:>7.1f}{r['state_bytes_per_param']:>9.1f}"
              f"{r['rss_growth_bytes'] / 2**20:>9.0f}{(f'{vs:.2f}x' if vs else '-'):>8}"
              f"{(f'{vf:.2f}x' if vf else '-'):>10}{r['first_step_s']:>9.1f}")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    print(f"compile seconds per compiled mode: {compile_s}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
