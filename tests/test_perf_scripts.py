"""Each perf script runs in its smallest CPU configuration and writes sane JSON. Benchmarks never
assert timings: only that times are positive and bytes are counted right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCRATCH = os.path.join(ROOT, "perf", "results", "tmp")  # the scripts' default --out


def git_status():
    """Tracked changes and untracked, not-ignored files; None outside a git checkout."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 else None


def run_script(name, *args, tmp_path, timeout=600):
    """Run a perf script with its *default* output folder (the git-ignored scratch folder),
    check that it left the checkout as it was (no committed result overwritten, nothing
    untracked added), and copy what it wrote into ``tmp_path`` for the test to read."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    before_status = git_status()
    before = {f: os.path.getmtime(os.path.join(SCRATCH, f))
              for f in (os.listdir(SCRATCH) if os.path.isdir(SCRATCH) else [])}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "perf", name), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert git_status() == before_status, (
        f"{name} with its default --out changed the checkout:\n{git_status()}")
    for f in os.listdir(SCRATCH):
        src = os.path.join(SCRATCH, f)
        if os.path.isfile(src) and before.get(f) != os.path.getmtime(src):
            shutil.copy(src, tmp_path / f)
    return proc.stdout


def test_bench_step_smallest(tmp_path):
    scale = 0.0005
    out = run_script("bench_step.py", "--scale", str(scale), "--iters", "3", "--warmup", "1",
                     "--providers", "tiedadam,torch-fused,torch-fused+copy-bf16,bnb-adamw8bit",
                     tmp_path=tmp_path)
    assert "provider" in out.splitlines()[-9] or "skipped" in out
    data = json.load(open(tmp_path / "bench_step.json"))
    assert data["device"] == "cpu" and data["copy_bandwidth_Bps"] > 0 and data["complete"]
    assert data["versions"]["torch"] and data["machine_before"]["host_cpu"]
    assert data["versions"].get("commit")  # the checkout the run measured
    assert "bnb-adamw8bit" in data["skipped"] or any(
        r["provider"] == "bnb-adamw8bit" for r in data["results"])
    rows = {(r["workload"], r["provider"], r["grads"]): r for r in data["results"]}
    assert {w for w, _, _ in rows} == {"llama", "small", "flat"}
    assert {g for _, _, g in rows} == {"fresh", "kept"}  # every workload both ways
    flat = rows[("flat", "tiedadam", "fresh")]
    assert flat["numel"] == round(2 ** 30 * scale) and flat["tensors"] == 1
    assert flat["bytes"] == 28 * flat["numel"]
    assert rows[("llama", "tiedadam", "kept")]["tensors"] == 201
    assert rows[("small", "torch-fused", "fresh")]["tensors"] == 2000
    assert rows[("small", "torch-fused+copy-bf16", "kept")]["bytes"] == 34 * rows[
        ("small", "torch-fused", "kept")]["numel"]
    for r in data["results"]:
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["bandwidth_Bps"] > 0 and r["host_s"] > 0
        # CPU: no device kernels apart from the call, no copy ceiling, nothing to sync with
        assert r["kernel_s"] is None and r["pct_of_copy_bw"] is None and r["syncs"] is None
    assert rows[("flat", "torch-fused", "fresh")]["speedup_vs_torch_fused"] == 1.0
    assert (tmp_path / "bench_step.png").stat().st_size > 1000


def test_sync_count_counts_only_torchs_per_sync_warning():
    """The one-time notice torch prints when sync debug mode is first switched on also
    mentions synchronisation; only the per-sync message counts (perf/common.py)."""
    import warnings
    sys.path.insert(0, os.path.join(ROOT, "perf"))
    from common import SYNC_WARNING, sync_count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet "
                      "detect all synchronizing operations")
        warnings.warn(SYNC_WARNING)
        warnings.warn("something else entirely")
        warnings.warn(SYNC_WARNING)
    assert sync_count(caught) == 2


def test_device_seconds_sums_the_profilers_device_events():
    """kernel_s's aggregation (perf/common.py) on real profiler events: it reads each event's
    own duration (a CPU profile stands in for the CUDA one, where only device events count)."""
    sys.path.insert(0, os.path.join(ROOT, "perf"))
    from common import device_seconds
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(512, 512)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            x @ x
    mm = [e for e in prof.events() if e.name == "aten::mm"]
    assert len(mm) == 3
    got = device_seconds(mm, DeviceType.CPU)
    assert got > 0 and abs(got - sum(e.cpu_time_total for e in mm) / 1e6) < 1e-9
    assert device_seconds(prof.events(), DeviceType.CUDA) == 0.0  # nothing ran on a GPU


def test_bench_offload_smallest(tmp_path):
    # (the compiled modes are left out: compiling costs tens of seconds on a cold cache)
    run_script("bench_offload.py", "--numels", "100000", "--iters", "3", "--warmup", "1",
               "--rounds", "1", "--providers", "tiedadam,tiedadam-bf16-torch-ops,torch-fused",
               tmp_path=tmp_path)
    data = json.load(open(tmp_path / "bench_offload.json"))
    rows = {r["provider"]: r for r in data["results"]}
    assert list(rows) == ["tiedadam", "tiedadam-bf16-torch-ops", "torch-fused"]
    for name, r in rows.items():
        assert r["numel"] == 100000 and r["iters"] == 3
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        moved = 20 if "bf16" in name else 28
        assert abs(r["bandwidth_Bps"] * r["median_s"] - moved * 100000) < 1
    # optimizer state per parameter, measured: fp32 partition + moments
    assert rows["tiedadam"]["state_bytes_per_param"] == 12
    assert rows["tiedadam-bf16-torch-ops"]["state_bytes_per_param"] == 8
    assert rows["torch-fused"]["speedup_vs_torch_fused"] == 1


def test_bench_offload_train_smallest(tmp_path):
    # two ranks of DeepSpeed ZeRO-2 offload; DeepSpeed's own CPU Adam is left out (its first
    # use builds a C++ op: a minute of CI for a smoke test)
    run_script("bench_offload_train.py", "--providers", "tiedadam-ratio8", "--d-model", "32",
               "--layers", "1", "--heads", "2", "--seq", "16", "--batch", "2", "--steps", "3",
               "--warmup", "1", tmp_path=tmp_path)
    data = json.load(open(tmp_path / "bench_offload_train.json"))
    (r,) = data["rows"]
    assert r["provider"] == "tiedadam-ratio8" and r["optimizer"] == "TiedAdamW"
    assert r["state_bytes_per_param"] == 7.0  # fp32 partition + int8 codes + bf16 v
    assert len(r["losses"]) == 3 and all(x == x for x in r["losses"])
    assert 0 < r["median_engine_step_s"] < r["median_step_s"]
    assert r["rss_mib"] > 0 and r["peak_rss_mib"] >= r["rss_mib"]
    assert (tmp_path / "bench_offload_train.png").stat().st_size > 0


def test_bench_host_smallest(tmp_path):
    run_script("bench_host.py", "--params", "20", "--iters", "5", tmp_path=tmp_path)
    data = json.load(open(tmp_path / "bench_host.json"))
    kinds = {(r["workload"], r["kind"]) for r in data["results"]}
    assert {("flat", "tiedadam"), ("table-fresh", "tiedadam"), ("table-kept", "tiedadam"),
            ("groups", "tiedadam"), ("table-dtensor", "tiedadam"), ("table-fresh", "floor"),
            ("flat", "empty-step"), ("table-fresh", "torch-fused"),
            ("flat", "torch-fused")} <= kinds
    assert all(r["median_us"] > 0 and r["launch"] == "no-op" for r in data["results"])
    assert set(data["ratios"]) >= {"table_fresh_over_floor", "flat_above_empty_step_us",
                                   "torch_fused_over_table_fresh", "torch_fused_over_flat"}
    assert (tmp_path / "bench_host.png").stat().st_size > 0


def test_bench_memory_smallest(tmp_path):
    run_script("bench_memory.py", "--scale", "0.0005", "--providers",
               "tiedadam,tiedadam-master-bf16,tiedadam-bf16-state,torch-fused,bnb-adamw8bit",
               tmp_path=tmp_path)
    data = json.load(open(tmp_path / "bench_memory.json"))
    rows = {r["provider"]: r for r in data["results"]}
    n = rows["tiedadam"]["numel"]
    steps = 201 * 4  # one fp32 step counter per tensor
    assert rows["tiedadam"]["state_bytes"] == 8 * n + steps
    assert rows["tiedadam-master-bf16"]["state_bytes"] == 12 * n + steps
    assert rows["tiedadam-bf16-state"]["state_bytes"] == 4 * n + steps
    assert rows["torch-fused"]["state_bytes"] == 8 * n + steps
    assert "bnb-adamw8bit" in data["skipped"] or "bnb-adamw8bit" in rows
    assert (tmp_path / "bench_memory.png").exists()


def test_bench_train_smallest(tmp_path):
    run_script("bench_train.py", "--d-model", "32", "--layers", "1", "--seq", "16", "--batch",
               "2", "--steps", "2", "--warmup", "1", tmp_path=tmp_path)
    data = json.load(open(tmp_path / "bench_train.json"))
    got = {(r["framework"], r["provider"]) for r in data["results"]}
    assert got == {("plain", "tiedadam"), ("plain", "torch-fused"), ("fsdp2", "tiedadam"),
                   ("fsdp2", "torch-fused"), ("ds-zero2", "tiedadam"),
                   ("ds-zero2", "deepspeed-fused")}, data["skipped"]
    for r in data["results"]:
        assert r["step_s"] > 0 and 0 < r["optimizer_share"] < 1 and r["tokens_per_s"] > 0
        assert len(r["losses"]) == 2 and all(x == x for x in r["losses"])


def test_precision_study_smoke(tmp_path):
    run_script("precision_study.py", "--steps", "3", "--warmup", "1", "--d-model", "32",
               "--layers", "1", "--seq", "16", "--batch", "2", "--data-bytes", "20000",
               "--eval-batches", "1", tmp_path=tmp_path)
    data = json.load(open(tmp_path / "precision_study.json"))
    modes = [s["mode"] for s in data["summary"]]
    assert modes[0] == "fp32" and {"bf16-state-sr", "ratio8", "ratio8-sqrt", "untied"} <= set(modes)
    by = {s["mode"]: s for s in data["summary"]}
    fp32 = by["fp32"]
    assert fp32["val_gap_vs_fp32"] == 0.0 and fp32["mean_abs_curve_gap"] == 0.0
    assert fp32["state_bytes_per_param"] > by["bf16-state-sr"]["state_bytes_per_param"] > \
        by["ratio8"]["state_bytes_per_param"]
    # moments only, plus one step count per tensor: ratio8 is 3 B/param of moments
    assert 3.0 <= by["ratio8"]["state_bytes_per_param"] < 3.1
    # tied betas bound the update by 1 (fp32 states; rounded states by about a rounding)
    assert by["fp32"]["update"]["max_abs_u"] <= 1.0 + 1e-6, by["fp32"]["update"]
    assert by["untied"]["update"]["max_abs_u"] > 0 and by["ratio8"]["update"]["max_abs_u"] < 1.1
    assert (tmp_path / "precision_study.png").exists()


def test_beta_study_smoke(tmp_path):
    run_script("beta_study.py", "--steps", "4", "--warmup", "1", "--lrs", "1e-3", "--seeds", "2",
               "--d-model", "32", "--layers", "1", "--seq", "16", "--batch", "2",
               "--data-bytes", "20000", "--eval-batches", "1", "--log-every", "2",
               "--u-sample", "100", tmp_path=tmp_path)
    data = json.load(open(tmp_path / "beta_study.json"))
    assert [s["setting"] for s in data["summary"]] == [
        "tied 0.9", "tied 0.95", "tied 0.975", "untied 0.9/0.95", "untied 0.9/0.999"]
    assert len(data["runs"]) == 10
    for r in data["runs"]:
        assert len(r["train_loss"]) == 4 and [s["step"] for s in r["stats"]] == [2, 4]
        assert sum(r["u_abs_hist"]) == 100 and r["val_loss"] > 0
        if r["betas"][0] == r["betas"][1]:  # tied: the bound on the sampled |u|
            assert r["u_abs_max_sample"] <= 1.0 + 1e-6
            assert all(0 <= s["high_snr_fraction"] <= 1 for s in r["stats"])
    assert (tmp_path / "beta_study.png").exists()


STAGES = ["gpu_tests", "kernel_report", "bench_step", "bench_variants", "bench_host",
          "bench_train", "bench_memory", "bench_compiled"]


def test_gpu_suite_rehearses_every_stage_on_cpu(tmp_path):
    """`bash perf/gpu_suite.sh --dry-run OUT`: every stage of the GPU run at toy sizes on this
    CPU, each within its budget, writing the files the GPU run writes (perf/README.md)."""
    out = tmp_path / "suite"
    before = git_status()
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the suite sets what each stage needs
    proc = subprocess.run(["bash", os.path.join(ROOT, "perf", "gpu_suite.sh"), "--dry-run",
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert git_status() == before, "the rehearsal changed the checkout"
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == STAGES, summary
    assert all(" rc=0 " in line for line in summary), summary
    for name in ("kernel_report", "bench_step", "bench_variants", "bench_host", "bench_train",
                 "bench_memory", "bench_step_compiled"):
        data = json.load(open(out / f"{name}.json"))
        assert data["versions"].get("commit"), name
    step = json.load(open(out / "bench_step.json"))
    assert step["complete"] and {r["grads"] for r in step["results"]} == {"fresh", "kept"}
    variants = json.load(open(out / "bench_variants.json"))["results"]
    assert len(variants) == 4 and all(r["step_median_s"] > 0 and r["bytes_per_element"] > 0
                                      for r in variants)
    assert "commit" in (out / "machine.txt").read_text()


def test_bench_variants_launches_the_variant_it_names():
    """bench_variants.optimizer_for configures TiedAdamW so that its one bucket is exactly the
    kernel variant perf/sass.py names (dtypes, master, rounding, telemetry, flat or table)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.join(ROOT, "perf"))
    import torch
    import bench_variants
    from tiedadam.optim import introspect
    import sass
    for spec in sass.variants():
        opt, params = bench_variants.optimizer_for(spec, 64, 4, "cpu")
        opt.step()
        ((backend, b),) = introspect.buckets(opt)
        want_state = torch.float64 if spec["param"] == torch.float64 else spec["state"]
        assert backend == "triton", spec
        assert (b.param_dtype, b.state_dtype, b.has_master) == (spec["param"], want_state,
                                                                spec["master"]), spec
        assert (b.state_sr, b.param_sr) == (spec["state_sr"], spec["param_sr"]), spec
        assert (b.telemetry is not None) == spec.get("telemetry", False), spec
        assert (len(b.params) == 1) == spec["flat"], spec
        assert (getattr(opt, "grad_scale", None) is not None) == spec["scale"], spec
        assert (opt.max_grad_norm is not None) == spec.get("clip", False), spec
