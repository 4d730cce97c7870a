"""Kernel-quality report: compile every TiedAdamW kernel variant for sm_90 (no GPU needed) and
print registers, spill bytes and the widest global load/store per variant.

    python perf/kernel_report.py [--out DIR] [--arch 90]

Writes kernel_report.json into --out. Runs without TRITON_INTERPRET (it is removed here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # must happen before triton kernels are decorated
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT_HELP, SCRATCH, versions, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    args = ap.parse_args(argv)

    from tiedadam.kernels.sm90_report import compile_variant, variants

    t0 = time.time()
    todo = list(variants())
    header = f"{'variant':<32}{'regs':>6}{'spill B':>9}{'widest ld':>11}{'widest st':>11}  full-path ops"
    print(f"compiling {len(todo)} kernel variants for sm_{args.arch} (a few seconds each)",
          flush=True)
    print(header)
    print("-" * len(header))
    rows = []
    for spec in todo:  # one line per variant as it compiles: progress, not silence
        r = compile_variant(**spec, arch=args.arch)
        rows.append(r)
        wide = {k: v for k, v in {**r.loads, **r.stores}.items() if k.endswith((".128", ".64"))}
        print(f"{r.name:<32}{r.registers:>6}{r.spill_bytes:>9}{r.widest_load:>11}"
              f"{r.widest_store:>11}  {wide}", flush=True)
    path = write_json(args.out, "kernel_report.json", {
        "what": f"TiedAdamW kernel variants compiled for sm_{args.arch} (no GPU: static compile)",
        "versions": versions(), "seconds": round(time.time() - t0, 1),
        "variants": [r.as_dict() for r in rows]})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
