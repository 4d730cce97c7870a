"""What every perf script records: versions, the machine (pynvml for the GPU's own view), and
its JSON output. Only the public tiedadam API is used by the scripts."""

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
    return out


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


def median_time(fn: Callable[[], Any], *, warmup: int, iters: int, device: str) -> dict:
    """Median/min/max seconds of ``fn`` over ``iters`` timed calls after ``warmup`` calls.

    On CUDA each call is timed with events (device time); on CPU with perf_counter.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "iters": iters}


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
