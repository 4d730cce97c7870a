"""Kernel-quality report: compile every TiedAdamW kernel variant for sm_90 (no GPU needed) and
measure what the hardware would run (perf/sass.py, Note [hot loop]): registers, threads per SM,
spill bytes, and in the hot loop the SASS instructions per element on its fast path,
shared-memory instructions, and the access width of each role. Each variant is checked
against the targets (<= 64 registers, no spills, no shared memory in the loop, <= 60
instructions per element, <= 80 with stochastic rounding).

    python perf/kernel_report.py [--out DIR] [--arch 90] [--dump CUBIN_DIR] [--only TEXT]

Writes kernel_report.json into --out; --dump also writes each variant's cubin as
CUBIN_DIR/<variant>.cubin (check with `cuobjdump --dump-sass`). Runs without TRITON_INTERPRET
(it is removed here). Exit status 1 when a variant misses a structural target (registers,
spills, shared memory in the loop, access widths); an instruction count over its budget is
listed, not an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # must happen before triton kernels are decorated
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT_HELP, SCRATCH, versions, write_json  # noqa: E402


def _widths(r) -> str:
    short = {"param": "p", "grad": "g", "exp_avg": "m", "exp_avg_sq": "v", "master": "w"}
    return " ".join(f"{short[k]}{b}" for k, b in r.loop.role_bits.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    ap.add_argument("--dump", metavar="CUBIN_DIR", help="also write <variant>.cubin files here")
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N variants (the GPU suite's --dry-run)")
    ap.add_argument("--only", metavar="TEXT", default=None,
                    help="only the variants whose name contains TEXT (e.g. ratio8)")
    args = ap.parse_args(argv)

    import sass

    t0 = time.time()
    todo = [v for v in sass.variants()
            if args.only is None or args.only in sass.variant_name(**v)][:args.limit]
    header = (f"{'variant':<30}{'regs':>5}{'thr/SM':>7}{'spill':>6}{'instr/el':>9}{'budget':>7}"
              f"{'smem':>5}  widths (bits)  misses")
    print(f"compiling {len(todo)} kernel variants for sm_{args.arch} (a few seconds each)",
          flush=True)
    print(header)
    print("-" * len(header))
    rows = []
    for spec in todo:  # one line per variant as it compiles: progress, not silence
        r = sass.analyse(spec, arch=args.arch, dump_dir=args.dump)
        rows.append(r)
        print(f"{r.name:<30}{r.registers:>5}{r.threads_per_sm:>7}{r.spill_bytes:>6}"
              f"{r.loop.instructions_per_element:>9.1f}{r.instr_budget:>7}"
              f"{sum(r.loop.shared.values()):>5}  {_widths(r):<14} {'; '.join(r.misses()) or '-'}",
              flush=True)
    path = write_json(args.out, "kernel_report.json", {
        "what": f"TiedAdamW kernel variants compiled for sm_{args.arch} (no GPU: static compile)",
        "targets": {"max_registers": sass.MAX_REGISTERS,
                    "max_instructions_per_element": sass.MAX_INSTR_PER_ELEMENT,
                    "max_instructions_per_element_sr": sass.MAX_INSTR_PER_ELEMENT_SR,
                    "spill_bytes": 0, "shared_memory_ops_in_hot_loop": 0},
        "versions": versions(), "seconds": round(time.time() - t0, 1),
        "variants": [r.as_dict() for r in rows]})
    print(f"wrote {path}")
    if args.dump:
        print(f"cubins in {args.dump}")
    over = [r.name for r in rows if r.misses() and not r.structural_misses()]
    if over:
        print(f"over the instruction budget: {', '.join(over)}")
    broken = [r.name for r in rows if r.structural_misses()]
    if broken:
        print(f"{len(broken)} variants miss a structural target: {', '.join(broken)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
