"""Regenerate the result tables of README.md and docs/performance.md from committed results
files, so that every figure there is traceable to a JSON file that a real run wrote.

    python perf/readme_tables.py [--check]

Blocks between ``<!-- BEGIN:name -->`` and ``<!-- END:name -->`` are replaced; a block whose
results file is missing says so instead of showing numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(rel):
    path = os.path.join(ROOT, rel)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def machine_line(d) -> str:
    m = d.get("machine_before") or d.get("machine") or {}
    v = d.get("versions", {})
    gpu = m.get("gpu")
    where = (f"{gpu.get('name', gpu.get('torch_name'))}, driver {gpu.get('driver', '?')}" if gpu
             else f"CPU: {m.get('host_cpu', '?')}, {m.get('cpu_cores', '?')} cores, no GPU")
    commit = v.get("commit")
    at = (f"commit {commit}{' + local changes to tiedadam/' if v.get('tiedadam_modified') else ''}"
          if commit else "commit not recorded")
    return (f"*Machine: {where}; torch {v.get('torch')}, triton {v.get('triton')}; {at}; "
            f"written {d.get('written', '?')}.*")


def kernel_table(rel="perf/results/kernel_report.json") -> str:
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    short = {"param": "p", "grad": "g", "exp_avg": "m", "exp_avg_sq": "v", "master": "w"}
    lines = ["| variant | registers | threads/SM | spill bytes | instructions/element (budget) "
             "| shared-memory ops in loop | access bits per role | targets |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for v in d["variants"]:
        loop = v["loop"]
        widths = " ".join(f"{short[k]}{b}" for k, b in loop["role_bits"].items())
        met = "met" if not v["misses"] else "missed: " + "; ".join(v["misses"])
        lines.append(f"| {v['name']} | {v['registers']} | {v['threads_per_sm']} | "
                     f"{v['spill_bytes']} | {loop['instructions_per_element']} "
                     f"({v['instr_budget']}) | {sum(loop['shared'].values())} | {widths} | "
                     f"{met} |")
    c = d["versions"].get("commit")
    return "\n".join(lines) + (f"\n\n*{d['what']}; torch {d['versions']['torch']}, "
                               f"triton {d['versions']['triton']}; "
                               f"{f'commit {c}' if c else 'commit not recorded'}. Hot loop: the "
                               f"SASS loop over whole blocks, fast path (perf/sass.py, Note "
                               f"[hot loop]).*")


def step_table(rel) -> str:
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    # % of copy only where a device copy is a bandwidth ceiling (a GPU), and from the device
    # time of the step's own work (kernel ms); on a CPU one copy_ is not a ceiling (caches,
    # threads), and there is no separate kernel time.
    gpu = d.get("device") != "cpu"
    lines = ["| workload | provider | grads | tensors | elements | step ms | "
             + ("kernel ms | kernel GB/s | % of copy | " if gpu else "GB/s | ")
             + "vs torch fused | host µs |",
             "|---|---|---|---:|---:|---:|" + ("---:|---:|---:|" if gpu else "---:|")
             + "---:|---:|"]
    for r in d["results"]:
        vs = f"{r['speedup_vs_torch_fused']:.2f}×" if r.get("speedup_vs_torch_fused") else "–"
        if r.get("reference", "torch-fused") != "torch-fused":
            vs += f" (vs {r['reference']})"
        if gpu:
            k = r.get("kernel_s")
            mid = (f"{k * 1e3:.2f} | {r['bytes'] / k / 1e9:.1f} | {r['pct_of_copy_bw']:.0f} | "
                   if k else "– | – | – | ")
        else:
            mid = f"{r['bandwidth_Bps'] / 1e9:.1f} | "
        lines.append(f"| {r['workload']} | {r['provider']} | {r.get('grads', 'kept')} | "
                     f"{r['tensors']} | {r['numel']:,} | {r['median_s'] * 1e3:.2f} | {mid}"
                     f"{vs} | {r['host_s'] * 1e6:.0f} |")
    skipped = "; ".join(f"{k}: {v}" for k, v in d.get("skipped", {}).items())
    return ("\n".join(lines) + "\n\n" + machine_line(d)
            + (f" Skipped: {skipped}." if skipped else ""))


def precision_table(rel="perf/results/cpu/precision_study.json") -> str:
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    lines = ["| mode | final train loss | val loss | val − fp32 | mean \\|curve gap\\| | state bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in d["summary"]:
        lines.append(f"| {r['mode']} | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['val_gap_vs_fp32']:+.4f} | {r['mean_abs_curve_gap']:.4f} | "
                     f"{sum(r['state_bytes'].values()):,} |")
    m, c = d["model"], d["config"]
    return ("\n".join(lines) + f"\n\n*{m['params']:,}-parameter LM ({m['n_layers']} layers, "
            f"d={m['d_model']}), {c['steps']} steps, {c['seeds']} seeds averaged, "
            f"beta={c.get('beta', c.get('betas'))}, "
            f"lr={c['lr']}; " + machine_line({"machine_before": d["machine"], **d})[1:])


RATIO8 = "perf/results/cpu/precision_ratio8/precision_study.json"
RATIO8_OFFLOAD = "perf/results/cpu/ratio8_offload/bench_offload.json"
NATIVE_OFFLOAD = "perf/results/cpu/native_offload/bench_offload.json"
NATIVE_OFFLOAD_1T = "perf/results/cpu/native_offload/threads1/bench_offload.json"


def ratio8_table(rel=RATIO8) -> str:
    """ratio8 against fp32/bf16 states, untied AdamW and the 8-bit peers, one table per beta
    (perf/precision_study.py --betas ...)."""
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    out = []
    for beta in sorted({s["beta"] for s in d["summary"]}):
        rows = [s for s in d["summary"] if s["beta"] == beta]
        lines = [f"**β = {beta}**", "",
                 "| mode | val loss (mean) | seed range | val − fp32 | mean \|curve gap\| | "
                 "update RMS | max \|u\| | state B/param |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            u = r.get("update") or {}
            rms = f"{u['update_rms']:.3f}" if u else "–"
            mx = f"{u['max_abs_u']:.3f}" if u else "–"
            lines.append(f"| {r['mode']} | {r['val_loss']:.4f} | {r['val_loss_min']:.4f}–"
                         f"{r['val_loss_max']:.4f} | {r['val_gap_vs_fp32']:+.4f} | "
                         f"{r['mean_abs_curve_gap']:.4f} | {rms} | {mx} | "
                         f"{r['state_bytes_per_param']:.2f} |")
        out.append("\n".join(lines))
    m, c = d["model"], d["config"]
    skipped = ", ".join(d.get("skipped") or []) or "none"
    return ("\n\n".join(out) + f"\n\n*{m['params']:,}-parameter LM ({m['n_layers']} layers, "
            f"d={m['d_model']}), {c['steps']} steps, {c['seeds']} seeds, lr={c['lr']}; untied = "
            f"torch.optim.AdamW(betas=(β, 0.999)); 8-bit peers with betas (β, β); skipped: "
            f"{skipped}; " + machine_line({"machine_before": d["machine"], **d})[1:])


def offload_table(rel="perf/results/cpu/bench_offload.json") -> str:
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    per_process = "rounds" in d["config"]  # Note [offload processes] in perf/bench_offload.py
    stream = per_process and any(r.get("percent_of_stream") for r in d["results"])
    plus = any(r.get("speedup_vs_torch_fused_plus_copy") for r in d["results"])
    lines = ["| provider | " + ("threads | " if per_process else "") + "partition | step ms | "
             "GB/s | " + ("% of stream | " if stream else "") + "state B/param | "
             "RSS growth MB | vs DeepSpeedCPUAdam | vs torch fused | "
             + ("vs fused+copy | " if plus else "") + "first step s |",
             "|---|" + ("---:|" if per_process else "") + "---:|---:|---:|"
             + ("---:|" if stream else "") + "---:|---:|---:|---:|" + ("---:|" if plus else "")
             + "---:|"]
    for r in d["results"]:
        vs, vf = r.get("speedup_vs_deepspeed_cpu_adam"), r.get("speedup_vs_torch_fused")
        vc = r.get("speedup_vs_torch_fused_plus_copy")
        ps = r.get("percent_of_stream")
        lines.append(f"| {r['provider']} | " + (f"{r['threads']} | " if per_process else "")
                     + f"{r['numel'] / 1e6:.0f}M | {r['median_s'] * 1e3:.1f} | "
                     f"{r['bandwidth_Bps'] / 1e9:.1f} | "
                     + ((f"{ps:.0f} | " if ps else "– | ") if stream else "")
                     + f"{r['state_bytes_per_param']:.1f} | "
                     f"{r['rss_growth_bytes'] / 2**20:,.0f} | {f'{vs:.2f}×' if vs else '–'} | "
                     f"{f'{vf:.2f}×' if vf else '–'} | "
                     + ((f"{vc:.2f}× | " if vc else "– | ") if plus else "")
                     + f"{r['first_step_s']:.1f} |")
    c = d["config"]
    how = (f"{c['rounds']} processes per provider, alternating, {c['iters']} steps each, the "
           f"median of their medians" if per_process else
           f"{c['iters']} steps per provider in rotation")
    build = d.get("native_build_seconds") or []
    built = (f"; native step loaded in {build[0]['seconds']:.1f} s ({build[0]['isa']})"
             if build else "")
    return "\n".join(lines) + (f"\n\n*{how}, {c['threads']} threads{built}; "
                               + machine_line(d)[1:])


OFFLOAD_TRAIN = "perf/results/cpu/offload_train/bench_offload_train.json"


def offload_train_table(rel=OFFLOAD_TRAIN) -> str:
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    rows = d["rows"]
    ref = next((r for r in rows if r["provider"] == "deepspeed-adamw"), None)
    tail = 10
    lines = ["| optimizer (JSON config) | steps | state B/param | step ms | engine.step ms | "
             f"host RSS MiB (2 ranks) | peak RSS MiB | loss, mean of last {tail} steps | "
             "engine.step / step vs DeepSpeedCPUAdam |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        last = sum(r["losses"][-tail:]) / len(r["losses"][-tail:])
        vs = (f"{ref['median_engine_step_s'] / r['median_engine_step_s']:.2f}× / "
              f"{ref['median_step_s'] / r['median_step_s']:.2f}×" if ref else "–")
        lines.append(f"| {r['provider']} ({r['optimizer']}) | {len(r['losses'])} | "
                     f"{r['state_bytes_per_param']:.1f} | {r['median_step_s'] * 1e3:,.0f} | "
                     f"{r['median_engine_step_s'] * 1e3:,.1f} | {r['rss_mib']:,.0f} | "
                     f"{r['peak_rss_mib']:,.0f} | {last:.4f} | {vs} |")
    c = d["config"]
    return "\n".join(lines) + (
        f"\n\n*{rows[0]['n_params'] / 1e6:.1f}M-param LM (d {c['d_model']}, {c['layers']} "
        f"layers, seq {c['seq']}, micro-batch {c['batch']} per rank), ZeRO-2 offload, 2 ranks "
        f"x {c['threads']} thread, medians over steps {c['warmup'] + 1}-{c['steps']}; "
        + machine_line(d)[1:])


def beta_table(rel="perf/results/cpu/beta_study.json") -> str:
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    lines = ["| setting | best lr | val loss (seed mean) | seed min … max | val loss at each lr | update RMS | high-SNR fraction |",
             "|---|---:|---:|---|---|---:|---:|"]
    for s in d["summary"]:
        by_lr = ", ".join(f"{float(k):g}: {v:.4f}" for k, v in s["val_loss_by_lr"].items())
        lines.append(f"| {s['setting']} | {s['best_lr']:g} | {s['val_loss_mean']:.4f} | "
                     f"{s['val_loss_min']:.4f} … {s['val_loss_max']:.4f} | {by_lr} | "
                     f"{s['final_update_rms']:.3f} | {s['final_high_snr_fraction']:.3f} |")
    m, c = d["model"], d["config"]
    return ("\n".join(lines) + f"\n\n*{m['params']:,}-parameter LM ({m['n_layers']} layers, "
            f"d={m['d_model']}), {c['steps']} steps of {c['batch']}×{c['seq']} tokens, "
            f"{c['seeds']} seeds; " + machine_line({"machine_before": d["machine"], **d})[1:])


def train_table(*rels) -> str:
    """End-to-end training rows from one or more bench_train JSON files (one machine line each)."""
    lines = ["| framework | provider | step ms | tokens/s | optimizer ms | optimizer share | peak MiB | file |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    notes = []
    for rel in rels:
        d = _load(rel)
        if d is None:
            return f"*(no results file `{rel}` yet)*"
        for r in d["results"]:
            lines.append(f"| {r['framework']} | {r['provider']} | {r['step_s'] * 1e3:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['optimizer_s'] * 1e3:.2f} | "
                         f"{r['optimizer_share'] * 100:.1f} % | "
                         f"{r['peak_memory_bytes'] / 2**20:,.0f} | {os.path.basename(rel)} |")
        m = d["model"]
        notes.append(f"`{os.path.basename(rel)}`: {m['params'] / 1e6:.1f}M-param GPT "
                     f"({m['n_layers']} layers, d={m['d_model']}), batch {d['config']['batch']} × "
                     f"{m['seq']}; " + machine_line(d)[1:-1])
    return "\n".join(lines) + "\n\n" + "\n".join(f"*{n}*" for n in notes)


def host_table(rel) -> str:
    d = _load(rel)
    if d is None:
        return f"*(no results file `{rel}` yet)*"
    lines = ["| workload | kind | launch | tensors | host µs per step |",
             "|---|---|---|---:|---:|"]
    for r in d["results"]:
        lines.append(f"| {r['workload']} | {r['kind']} | {r['launch']} | {r['tensors']} | "
                     f"{r['median_us']:,.1f} |")
    lines += ["", "| ratio | value | goal |", "|---|---:|---|"]
    for k, v in d["ratios"].items():
        lines.append(f"| {k} | {v:.2f} | {d['goals'].get(k, '–')} |")
    return "\n".join(lines) + "\n\n" + machine_line({"machine_before": d["machine"], **d})


def summary_table() -> str:
    """README's one performance table: a line per result file, each figure read from it."""
    rows = ["| measured | figure | machine, commit | from |", "|---|---|---|---|"]

    def where(d):
        m = d.get("machine_before") or d.get("machine") or {}
        gpu = m.get("gpu")
        c = d.get("versions", {}).get("commit")
        return (f"{gpu.get('name', 'GPU') if gpu else 'CPU, ' + str(m.get('cpu_cores', '?')) + ' cores'}"
                f", {c or 'commit not recorded'}")
    step = newest_gpu_run("bench_step.json")
    if step is None:
        rows.append("| optimizer step on a GPU (kernel and step time, fresh grads) | not yet run "
                    "on the current code | – | [history](perf/results/h200/README.md) |")
    else:
        d = _load(step)
        r = next((x for x in d["results"] if x["workload"] == "llama"
                  and x["provider"] == "tiedadam" and x.get("grads") == "fresh"), None)
        if r is not None and r.get("kernel_s"):
            rows.append(f"| TinyLlama-1.1B list, fresh grads: kernel % of copy, step vs torch "
                        f"fused | {r['pct_of_copy_bw']:.0f} %, {r['speedup_vs_torch_fused']:.2f}× | "
                        f"{where(d)} | [{step}]({step}) |")
    k = _load("perf/results/kernel_report.json")
    if k is not None:
        v = k["variants"]
        ipe = [x["loop"]["instructions_per_element"] for x in v]
        c = k["versions"].get("commit") or "commit not recorded"
        rows.append(f"| kernel, {len(v)} variants (static sm_90 compile) | ≤ "
                    f"{max(x['registers'] for x in v)} registers, "
                    f"{max(x['spill_bytes'] for x in v)} spill bytes, {min(ipe)}–{max(ipe)} "
                    f"instructions/element, {sum(not x['misses'] for x in v)}/{len(v)} meet "
                    f"every target | no GPU needed, {c} | [kernel_report.json]"
                    f"(perf/results/kernel_report.json) |")
    h = _load("perf/results/cpu/bench_host.json")
    if h is not None:
        t = next(r for r in h["results"] if r["workload"] == "table-fresh"
                 and r["kind"] == "tiedadam")
        rows.append(f"| host time of `step()`, 500 tensors, fresh grads | {t['median_us']:,.0f} µs "
                    f"({h['ratios']['table_fresh_over_floor']:.1f}× reading every `.grad`; "
                    f"torch fused {h['ratios']['torch_fused_over_table_fresh']:.1f}× more) | "
                    f"{where(h)} | [bench_host.json](perf/results/cpu/bench_host.json) |")
    o = _load(NATIVE_OFFLOAD)  # the newest ZeRO-Offload measurement (the native step)
    if o is not None:
        rs = [r for r in o["results"] if r["threads"] == max(x["threads"] for x in o["results"])]

        def speeds(mode):
            return "/".join(f"{r['speedup_vs_deepspeed_cpu_adam']:.2f}×" for r in rs
                            if r["provider"] == mode)
        sizes = "/".join(f"{r['numel'] / 1e6:.0f}M" for r in rs if r["provider"] == "deepspeed-cpu")
        parts = [f"{label} ({b} B/param) {speeds(m + '-nearest')} nearest, {speeds(m + '-sr')} "
                 f"stochastic" for label, b, m in (("bf16 moments", 8, "tiedadam-bf16"),
                                                    ("ratio8", 7, "tiedadam-ratio8"))]
        rows.append(f"| ZeRO-Offload CPU step vs DeepSpeedCPUAdam (12 B/param), native step, "
                    f"{sizes} | {'; '.join(parts)} | {where(o)}, {rs[0]['threads']} threads | "
                    f"[bench_offload.json]({NATIVE_OFFLOAD}) |")
    t = _load(OFFLOAD_TRAIN)
    if t is not None:
        by = {r["provider"]: r for r in t["rows"]}
        ds, r8 = by.get("deepspeed-adamw"), by.get("tiedadam-ratio8")
        if ds and r8:
            rows.append(f"| ZeRO-2 offload training, {r8['n_params'] / 1e6:.0f}M-param LM, 2 ranks: "
                        f"ratio8 against DeepSpeedCPUAdam | `engine.step()` "
                        f"{ds['median_engine_step_s'] / r8['median_engine_step_s']:.2f}×, "
                        f"whole step {ds['median_step_s'] / r8['median_step_s']:.2f}×, host RSS "
                        f"{r8['rss_mib']:,.0f} against {ds['rss_mib']:,.0f} MiB, loss curves "
                        f"alike | {where(t)} | [bench_offload_train.json]({OFFLOAD_TRAIN}) |")
    r = _load(RATIO8)
    if r is not None:
        parts = []
        for beta in sorted({x["beta"] for x in r["summary"]}):
            by = {x["mode"]: x for x in r["summary"] if x["beta"] == beta}
            if "ratio8" in by:
                f = by["fp32"]
                parts.append(f"β {beta}: {by['ratio8']['val_gap_vs_fp32']:+.4f} (fp32 seed range "
                             f"{f['val_loss_max'] - f['val_loss_min']:.4f})")
        rows.append(f"| ratio8 moments, val loss − fp32 states (small LM, "
                    f"{r['config']['seeds']} seeds) | {'; '.join(parts)} | {where(r)} | "
                    f"[precision_study.json]({RATIO8}) |")
    q = _load("perf/results/cpu/precision_study.json")
    if q is not None:
        gaps = {x["mode"]: x["val_gap_vs_fp32"] for x in q["summary"] if x["mode"] != "fp32"}
        near = {m: g for m, g in gaps.items() if m != "pure-bf16-nearest"}
        rows.append(f"| precision modes, val loss − fp32 states (small LM) | "
                    f"{min(near.values()):+.4f} … {max(near.values()):+.4f}; pure bf16 rounded "
                    f"to nearest {gaps.get('pure-bf16-nearest', 0):+.4f} | "
                    f"{where(q)} | [precision_study.json](perf/results/cpu/precision_study.json) |")
    return "\n".join(rows)


GPU = "perf/results/h200"


def newest_gpu_run(name: str) -> str | None:
    """``perf/results/h200/<run>/<name>`` of the newest run folder holding it (folders are
    named ``<date>-<commit>``, so their order is their age); None before the first."""
    import glob
    found = sorted(glob.glob(os.path.join(ROOT, GPU, "*", name)))
    return os.path.relpath(found[-1], ROOT) if found else None


def gpu_block(name: str, table) -> str:
    rel = newest_gpu_run(name)
    if rel is None:
        return (f"*(no GPU run of the current suite yet: `{name}` appears here from "
                f"`{GPU}/<date>-<commit>/` once `perf/gpu_suite.sh` has run on a GPU)*")
    return table(rel)


def variants_table(rel) -> str:
    d = _load(rel)
    lines = ["| variant | elements | bytes/element | kernel ms | kernel GB/s | % of copy | "
             "instructions/element | memory floor ms | issue floor ms | bound | floor / kernel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in d["results"]:
        k = r.get("kernel_s")
        ti = r.get("t_issue_s")
        lines.append(
            f"| {r['variant']} | {r['numel']:,} | {r['bytes_per_element']} | "
            f"{k * 1e3:.3f} | {r['kernel_bandwidth_Bps'] / 1e9:.0f} | {r['pct_of_copy_bw']:.0f} | "
            f"{r.get('instructions_per_element') or '–'} | {r['t_memory_s'] * 1e3:.3f} | "
            f"{'–' if ti is None else f'{ti * 1e3:.3f}'} | {r.get('bound') or '–'} | "
            f"{r['efficiency']:.2f} |" if k else
            f"| {r['variant']} | {r['numel']:,} | {r['bytes_per_element']} | – | – | – | – | – | "
            f"– | – | – |")
    return "\n".join(lines) + "\n\n" + machine_line(d) + (
        f" Copy bandwidth {d['copy_bandwidth_Bps'] / 1e9:.0f} GB/s (read + write), {d['sms']} "
        f"SMs at {d['sm_clock_hz'] and d['sm_clock_hz'] / 1e9} GHz, issue floor from "
        f"`{d['static_report']}` of the same run.")

BLOCKS = {
    "beta_study": beta_table,
    "precision_study": precision_table,
    "ratio8_study": ratio8_table,
    "cpu_offload": offload_table,
    "ratio8_offload": lambda: offload_table(RATIO8_OFFLOAD),
    "native_offload": lambda: offload_table(NATIVE_OFFLOAD),
    "native_offload_1t": lambda: offload_table(NATIVE_OFFLOAD_1T),
    "offload_train": offload_train_table,
    "kernel_report": kernel_table,
    "cpu_host": lambda: host_table("perf/results/cpu/bench_host.json"),
    "cpu_step": lambda: step_table("perf/results/cpu/bench_step.json"),
    "cpu_clip": lambda: step_table("perf/results/cpu/clip/bench_step.json"),
    "gpu_step": lambda: gpu_block("bench_step.json", step_table),
    "gpu_variants": lambda: gpu_block("bench_variants.json", variants_table),
    "gpu_train": lambda: gpu_block("bench_train.json", train_table),
    "summary": summary_table,
}
# where the blocks are: the README (summary, precision study) and the full tables' page
DOCUMENTS = ("README.md", "docs/performance.md")


def render(text: str) -> str:
    for name, fn in BLOCKS.items():
        pat = re.compile(rf"(<!-- BEGIN:{name} -->).*?(<!-- END:{name} -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + "\n" + fn() + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a document is out of date")
    args = ap.parse_args(argv)
    stale = []
    for rel in DOCUMENTS:
        path = os.path.join(ROOT, rel)
        with open(path) as f:
            old = f.read()
        new = render(old)
        if new == old:
            continue
        if args.check:
            stale.append(rel)
        else:
            with open(path, "w") as f:
                f.write(new)
            print(f"{rel}: tables regenerated")
    if stale:
        print(f"out of date: {', '.join(stale)}: run python perf/readme_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
