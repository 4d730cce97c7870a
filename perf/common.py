"""What every perf script records: versions, the machine (pynvml for the GPU's own view), and
its JSON output. The scripts use tiedadam's public API, except where they measure the kernel itself
(bench_host.py replaces its launch with a no-op; kernel_report.py and sass.py compile it)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Note [scratch]: every script writes here unless told otherwise (git-ignored), so running one
# never overwrites the committed results behind the README; committing results is an explicit
# `--out perf/results/<machine>`.
SCRATCH = os.path.join(ROOT, "perf", "results", "tmp")
OUT_HELP = ("folder for the JSON/PNG results (default: perf/results/tmp, git-ignored; "
            "use --out perf/results/<machine> for results you mean to commit)")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for mod in ("triton", "deepspeed", "tiedadam"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # not installed, or broken: say which
            out[mod] = f"unavailable ({type(e).__name__})"
    out.update(commit())
    return out


def commit() -> dict:
    """The checkout's commit and whether tiedadam/ differs from it (README tables name the
    commit a result measured); {} outside a git checkout (a copy made without .git)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tiedadam"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if head.returncode != 0:
        return {}
    return {"commit": head.stdout.strip(), "tiedadam_modified": bool(dirty.stdout.strip())}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_snapshot() -> dict | None:
    """pynvml's view of GPU 0: name, driver, memory, clocks, power. None without a GPU."""
    if not torch.cuda.is_available():
        return None
    out: dict[str, Any] = {"torch_name": torch.cuda.get_device_name(0)}
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        out.update(
            name=_s(pynvml.nvmlDeviceGetName(h)), driver=_s(pynvml.nvmlSystemGetDriverVersion()),
            memory_total_mib=mem.total // 2**20, memory_used_mib=mem.used // 2**20,
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            temperature_c=pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        pynvml.nvmlShutdown()
    except Exception as e:  # pynvml missing or NVML not reachable: record why
        out["nvml_error"] = f"{type(e).__name__}: {e}"
    return out


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def machine() -> dict:
    return {"host_cpu": cpu_name(), "cpu_cores": os.cpu_count(),
            "gpu": gpu_snapshot(), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def write_json(out_dir: str, name: str, payload: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    payload = {"written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def median_time(fn: Callable[[], Any], *, warmup: int, iters: int, device: str,
                prepare: Callable[[], Any] | None = None) -> dict:
    """Median/min/max seconds of ``fn`` over ``iters`` timed calls after ``warmup`` calls;
    ``prepare()`` (fresh grads) runs before each call, untimed.

    On CUDA each call is timed with events recorded just before and after it (device time of
    the whole call: host run-up the GPU waits for included); on CPU with perf_counter.
    """
    prepare = prepare or (lambda: None)
    for _ in range(warmup):
        prepare()
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            prepare()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            prepare()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "iters": iters}


def device_seconds(events, device_type) -> float:
    """Seconds of the profiler ``events`` that ran on ``device_type`` (for CUDA: kernels,
    copies, memsets, everything the step put on the device), summed. A device event's own
    duration is its ``time_range`` (what torch's ``device_time_total`` returns for it)."""
    return sum(e.time_range.elapsed_us() for e in events
               if e.device_type == device_type) / 1e6


def kernel_time(fn: Callable[[], Any], *, iters: int, device: str,
                prepare: Callable[[], Any] | None = None) -> float | None:
    """Mean device seconds per call of ``fn`` spent in the device work it launched (CUDA
    kernels, copies, memsets, from torch's profiler: the same method for every optimizer),
    without the host run-up before them. None on a CPU: there the call's time is its work."""
    if device != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    prepare = prepare or (lambda: None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            prepare()
            fn()
        torch.cuda.synchronize()
    return device_seconds(prof.events(), DeviceType.CUDA) / iters


# What torch's sync debug mode says at each synchronising call ("warn" mode). The first switch
# into the mode in a process also warns once, with other words: not a synchronisation.
SYNC_WARNING = "called a synchronizing CUDA operation"


def sync_count(caught) -> int:
    """Synchronisations among caught warnings: only torch's per-sync message counts."""
    return sum(str(w.message).strip() == SYNC_WARNING for w in caught)


def count_syncs(fn: Callable[[], Any], prepare: Callable[[], Any] | None = None) -> int | None:
    """Host-device synchronisations inside one call of ``fn`` (torch's sync debug mode);
    None without CUDA."""
    if not torch.cuda.is_available():
        return None
    import warnings
    if prepare is not None:
        prepare()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sync_count(caught)


def release(device: str) -> None:
    """Give memory back between measurements (call after dropping the references)."""
    import gc
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def progress(msg: str) -> None:
    print(msg, flush=True)


def barh(labels, values, xlabel: str, path: str, *, log: bool = False, height: float = 3.5):
    """One horizontal bar chart (first label on top) written to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, height))
    ax.barh(labels, values)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
