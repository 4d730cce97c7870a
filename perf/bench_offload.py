"""ZeRO-Offload's optimizer step: one flat fp32 CPU partition, as DeepSpeed hands it to the
optimizer under ``offload_optimizer: {"device": "cpu"}``, at each of --numels (50M and 200M
elements by default).

TiedAdamW in each CPU mode against DeepSpeedCPUAdam (DeepSpeed's JIT-built AVX op, fp32 moments)
and torch.optim.AdamW(fused=True):

    tiedadam                  fp32 moments (torch's fused CPU AdamW, betas (beta, beta))
    tiedadam-bf16-sr          bf16 moments, stochastic rounding (the default for bf16 state):
                              the native one-pass step (tiedadam/kernels/native_cpu.cpp)
    tiedadam-bf16-nearest     bf16 moments, round to nearest (native step)
    tiedadam-ratio8-sr        ratio8 moments (int8 codes of m / sqrt(v), bf16 v), stochastic
                              rounding, native step: 18 bytes moved per parameter
    tiedadam-ratio8-nearest   ratio8, round to nearest (native step)
    ...-compiled              the same through the compiled step (tiedadam/kernels/
                              tied_adamw_cpu.py), the route before the native one
    tiedadam-bf16-torch-ops   bf16 moments, stochastic, on the torch-op path (what runs without
                              a C++ compiler)
    stream                    reference: one in-place pass reading and writing 14 bytes per
                              parameter (28 moved), the machine's streaming bandwidth for an
                              optimizer's access pattern; each row's "% stream" is its bytes
                              per second against this row's

and, on request, the modes for bf16 params (each with its own bf16 copy of the partition):
tiedadam-master-bf16 (fp32 master weights and moments), tiedadam-pure-bf16-sr (bf16 moments,
param rounded stochastically), and what they replace, torch-fused+copy-bf16 (torch's fused
fp32 step on fp32 masters, then a copy into the bf16 params: 34 bytes; the column "vs
fused+copy").

Note [offload processes]: each provider runs in a process of its own (``--worker``), the
providers alternating over ``--rounds`` rounds; in one process DeepSpeed's OpenMP runtime and
torch's spin-wait against each other, which distorts DeepSpeed's time and every ratio against
it. A provider's
figure is the median over rounds of each process's median step. ``--threads 2,1`` repeats
everything at each thread count.

Per provider: median step ms, bytes moved per parameter and GB/s, its percent of the streaming
copy's GB/s, host bytes of optimizer state per parameter measured from the tensors (the fp32
partition the optimizer steps plus its moments: what ZeRO-Offload keeps in host RAM), the
process's resident-memory growth from creating the optimizer through its first step, the ratio
to DeepSpeedCPUAdam and to torch fused, and the first call's seconds (the native step loads its
build there, the compiled modes compile: reported, not hidden); the native step's build seconds
in this run (a cold build, or torch's extension cache). All providers step the same partition
and grad (the timing does not depend on the values), so 200M fits in host RAM.

    python perf/bench_offload.py [--numels 50000000,200000000] [--threads 2,1] [--rounds 3]
                                 [--iters 10] [--providers ...] [--out DIR]
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
# name -> (provider, TiedAdamW options, bytes moved per parameter, CPU route: "native" (the
# native step), "compiled" (the compiled step), "torch-ops")
MODES = {
    "tiedadam": ("tiedadam", {}, 28, "native"),
    "tiedadam-bf16-sr": ("tiedadam", dict(state_dtype=BF16), 20, "native"),
    "tiedadam-bf16-nearest": ("tiedadam", dict(state_dtype=BF16, stochastic_rounding=False),
                              20, "native"),
    "tiedadam-bf16-torch-ops": ("tiedadam", dict(state_dtype=BF16), 20, "torch-ops"),
    # ratio8 moments (int8 codes of m / sqrt(v), bf16 v): read p, g fp32, m 1, v 2; write p, m,
    # v: 18 bytes, and 7 B/param of host state with the fp32 partition
    "tiedadam-ratio8-sr": ("tiedadam", dict(state_dtype="ratio8"), 18, "native"),
    "tiedadam-ratio8-nearest": ("tiedadam", dict(state_dtype="ratio8",
                                                 stochastic_rounding=False), 18, "native"),
    # bf16 params (not ZeRO-Offload's case, whose partitions are fp32; the other CPU modes):
    # fp32 master + fp32 moments (read p, g bf16, w, m, v; write p bf16, w, m, v: 32 bytes),
    # pure bf16 with stochastic rounding of the param (bf16 everything: 14 bytes)
    "tiedadam-master-bf16": ("tiedadam", dict(master_weights=True, param_dtype=BF16), 32,
                             "native"),
    "tiedadam-pure-bf16-sr": ("tiedadam", dict(state_dtype=BF16, param_stochastic_rounding=True,
                                               param_dtype=BF16), 14, "native"),
    "deepspeed-cpu": ("deepspeed-cpu", None, 28, None),
    "torch-fused": ("torch-fused", None, 28, None),
    # what the bf16-param modes replace: torch's fused fp32 step on fp32 masters (fp32 grads,
    # as a backward in fp32 would give them), then a copy into the bf16 params: 28 + 6 bytes
    "torch-fused+copy-bf16": ("torch-fused+copy-bf16", None, 34, None),
    "stream": ("stream", None, 28, None),
}
for _name in ("tiedadam-bf16-sr", "tiedadam-bf16-nearest", "tiedadam-ratio8-sr",
              "tiedadam-ratio8-nearest", "tiedadam-master-bf16", "tiedadam-pure-bf16-sr"):
    MODES[_name + "-compiled"] = MODES[_name][:3] + ("compiled",)
DEFAULT = ("tiedadam,tiedadam-bf16-sr,tiedadam-bf16-nearest,tiedadam-ratio8-sr,"
           "tiedadam-ratio8-nearest,tiedadam-master-bf16,tiedadam-pure-bf16-sr,deepspeed-cpu,"
           "torch-fused,stream")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state_bytes_per_param(opt, param) -> float:
    """(bytes of the partition + every state tensor) / numel, from the tensors themselves."""
    inner = getattr(opt, "opt", opt)
    held = param.numel() * param.element_size()
    masters = getattr(opt, "masters", None)  # torch-fused+copy-bf16: fp32 masters hold the state
    if masters is not None:
        return (held + sum(m.numel() * 4 + sum(v.numel() * v.element_size()
                                                for v in inner.state[m].values()
                                                if torch.is_tensor(v) and v.numel() > 1)
                           for m in masters)) / param.numel()
    st = inner.state[param]
    held += sum(v.numel() * v.element_size() for v in st.values()
                if torch.is_tensor(v) and v.numel() > 1)
    return held / param.numel()


class _Step:
    """One provider's step, on its CPU route (the native or compiled step switched on or off
    around it)."""

    def __init__(self, opt, route: str | None):
        from tiedadam.optim import torch_backend
        self.opt, self.route, self.backend = opt, route, torch_backend

    def __call__(self):
        b = self.backend
        saved = b.USE_NATIVE_CPU_STEP, b.USE_COMPILED_CPU_STEP
        b.USE_NATIVE_CPU_STEP = self.route == "native"
        b.USE_COMPILED_CPU_STEP = self.route == "compiled"
        try:
            self.opt.step()
        finally:
            b.USE_NATIVE_CPU_STEP, b.USE_COMPILED_CPU_STEP = saved


class _Stream:
    """The streaming reference: one in-place pass over 14 bytes per parameter (3.5 fp32),
    read and written back (28 moved), an optimizer step's access pattern (its tensors are read
    and written in place: no write-allocate reads, which a copy into other memory pays)."""

    def __init__(self, numel: int):
        self.buf = torch.ones(numel * 7 // 2)
        self.state = {}

    def step(self):
        self.buf.mul_(1.0)


def run_size(numel: int, names: list[str], iters: int, warmup: int) -> tuple[list, dict]:
    from tiedadam import TiedAdamW
    param = torch.nn.Parameter(torch.randn(numel) * 0.02)
    param.grad = torch.randn_like(param) * 1e-3
    steps, rows, skipped = {}, {}, {}
    for name in names:
        provider, options, moved, route = MODES[name]
        gc.collect()
        before = rss_bytes()
        p = param
        try:
            if provider == "stream":
                opt = _Stream(numel)
            elif options is None:
                if provider == "torch-fused+copy-bf16":  # its own bf16 param
                    p = torch.nn.Parameter(param.detach().to(BF16))
                    p.grad = param.grad.to(BF16)
                opt = make_optimizer(provider, [p], lr=1e-4, beta=0.95, device="cpu")
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
        step = _Step(opt, route)
        t0 = time.perf_counter()
        step()  # creates the state; the compiled modes compile here
        first = time.perf_counter() - t0
        steps[name] = step
        rows[name] = dict(provider=name, numel=numel, bytes_moved_per_param=moved,
                          first_step_s=first, rss_growth_bytes=rss_bytes() - before,
                          state_bytes_per_param=(0.0 if provider == "stream" else
                                                 state_bytes_per_param(opt, p)),
                          route=route, threads=torch.get_num_threads())
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
                     ("torch-fused", "speedup_vs_torch_fused"),
                     ("torch-fused+copy-bf16", "speedup_vs_torch_fused_plus_copy")):
        base = rows.get(ref) if ref in times else None
        for r in out:
            r[key] = base["median_s"] / r["median_s"] if base else None
    del steps
    gc.collect()
    return out, skipped


TARGETS = {"tiedadam-bf16-sr": ("speedup_vs_deepspeed_cpu_adam", 1.0),
           "tiedadam-bf16-nearest": ("speedup_vs_deepspeed_cpu_adam", 1.0),
           "tiedadam-ratio8-sr": ("speedup_vs_deepspeed_cpu_adam", 1.3),
           "tiedadam-ratio8-nearest": ("speedup_vs_deepspeed_cpu_adam", 1.3),
           "tiedadam-master-bf16": ("speedup_vs_torch_fused_plus_copy", 1.0),
           "tiedadam-pure-bf16-sr": ("speedup_vs_torch_fused_plus_copy", 1.0)}


def _worker(args) -> int:
    """One provider at one size in this process (Note [offload processes]): prints its row."""
    import json
    r, skipped = run_size(args.numel, [args.worker], args.iters, args.warmup)
    from tiedadam.kernels import native_cpu, tied_adamw_cpu
    print("RESULT " + json.dumps(dict(
        rows=r, skipped=skipped, native_build_s=native_cpu.build_seconds,
        native_isa=native_cpu.isa,
        compile_s={str(k): v for k, v in tied_adamw_cpu.compile_seconds.items()})))
    return 0


def _spawn(args, name: str, numel: int, threads: int) -> dict:
    import json
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--numel", str(numel),
           "--threads", str(threads), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--inductor-cache", args.inductor_cache]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{name} at {numel:,} ({threads} threads) failed:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(line[0][len("RESULT "):])


def _aggregate(runs: list[dict]) -> dict:
    """One provider's rounds: the first round's row (first step, memory), the median of the
    rounds' medians (Note [offload processes])."""
    row = dict(runs[0])
    medians = sorted(r["median_s"] for r in runs)
    row.update(median_s=medians[len(medians) // 2], round_medians_s=[r["median_s"] for r in runs],
               min_s=min(r["min_s"] for r in runs), max_s=max(r["max_s"] for r in runs),
               rounds=len(runs))
    row["bandwidth_Bps"] = row["bytes_moved_per_param"] * row["numel"] / row["median_s"]
    row["params_per_s"] = row["numel"] / row["median_s"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--numels", default="50000000,200000000")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="processes per provider, alternating (Note [offload processes])")
    ap.add_argument("--providers", default=DEFAULT, help=f"any of {', '.join(MODES)}")
    ap.add_argument("--threads", default=str(os.cpu_count()),
                    help="thread counts, comma-separated (e.g. 2,1)")
    ap.add_argument("--inductor-cache", default=None,
                    help="inductor's cache directory (default: a new empty one, so that the "
                         "first step's seconds are a cold compile and no kernel compiled for "
                         "another thread count is reused: Note [compile threads] in "
                         "tiedadam/kernels/tied_adamw_cpu.py)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--numel", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inductor_cache is None:
        import tempfile
        args.inductor_cache = tempfile.mkdtemp(prefix="bench_offload_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache
    if args.worker is not None:
        torch.set_num_threads(int(args.threads))
        return _worker(args)
    names = args.providers.split(",")
    unknown = [n for n in names if n not in MODES]
    if unknown:
        ap.error(f"unknown providers {unknown}: choose from {', '.join(MODES)}")
    rows, skipped, builds, compile_s = [], {}, [], {}
    for threads in (int(x) for x in args.threads.split(",")):
        for numel in (int(x) for x in args.numels.split(",")):
            progress(f"{numel:,}-element partition, {threads} threads")
            runs = {name: [] for name in names}
            for k in range(args.rounds):
                for name in names:
                    out = _spawn(args, name, numel, threads)
                    runs[name] += out["rows"]
                    skipped.update(out["skipped"])
                    compile_s.update(out["compile_s"])
                    if out["native_build_s"] is not None:
                        builds.append(dict(seconds=out["native_build_s"], isa=out["native_isa"]))
                    for r in out["rows"]:
                        progress(f"  round {k + 1} {name}: {r['median_s'] * 1e3:.1f} ms")
            size_rows = [_aggregate(rs) for rs in runs.values() if rs]
            by = {r["provider"]: r for r in size_rows}
            for ref, key in (("deepspeed-cpu", "speedup_vs_deepspeed_cpu_adam"),
                             ("torch-fused", "speedup_vs_torch_fused"),
                             ("torch-fused+copy-bf16", "speedup_vs_torch_fused_plus_copy")):
                for r in size_rows:
                    r[key] = by[ref]["median_s"] / r["median_s"] if ref in by else None
            for r in size_rows:
                r["percent_of_stream"] = (100 * r["bandwidth_Bps"] /
                                          by["stream"]["bandwidth_Bps"]
                                          if "stream" in by else None)
            rows += size_rows
    path = write_json(args.out, "bench_offload.json", dict(
        what="ZeRO-Offload optimizer step on one flat fp32 CPU partition, per TiedAdamW mode, "
             "each provider in its own process, alternating over rounds",
        machine_before=machine(), versions=versions(), config=vars(args), skipped=skipped,
        native_build_seconds=builds[:1] + sorted(builds[1:], key=lambda b: b["seconds"])[:1],
        compile_seconds=compile_s,
        targets={k: f"{m} >= {v}" for k, (m, v) in TARGETS.items()}, results=rows))
    print(f"\nZeRO-Offload step, fp32 partition ({args.rounds} processes per provider)")
    print(f"{'provider':<33}{'thr':>4}{'numel':>13}{'ms':>9}{'GB/s':>7}{'%strm':>7}"
          f"{'B/param':>9}{'RSS MB':>9}{'vs DS':>8}{'vs fused':>10}{'vs f+copy':>10}"
          f"{'first s':>9}")
    for r in rows:
        vs, vf, ps = (r["speedup_vs_deepspeed_cpu_adam"], r["speedup_vs_torch_fused"],
                      r["percent_of_stream"])
        vc = r.get("speedup_vs_torch_fused_plus_copy")
        print(f"{r['provider']:<33}{r['threads']:>4}{r['numel']:>13,}{r['median_s'] * 1e3:>9.1f}"
              f"{r['bandwidth_Bps'] / 1e9:>7.1f}{(f'{ps:.0f}' if ps else '-'):>7}"
              f"{r['state_bytes_per_param']:>9.1f}{r['rss_growth_bytes'] / 2**20:>9.0f}"
              f"{(f'{vs:.2f}x' if vs else '-'):>8}{(f'{vf:.2f}x' if vf else '-'):>10}"
              f"{(f'{vc:.2f}x' if vc else '-'):>10}{r['first_step_s']:>9.1f}")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    print(f"native step build seconds (first process; a cold build unless torch's extension "
          f"cache had it): {builds[:1]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
