#!/usr/bin/env bash
# The one prepared run for an NVIDIA GPU (written for an H200): GPU tests, kernel report, step
# throughput (fresh and kept grads, kernel time apart from step time), the bound of every kernel
# variant, host cost, end-to-end training, memory, the compiled peer; each stage under its own
# time budget, 480 s in all. A stage stopped by its budget is logged as such, and bench_step
# keeps the rows it measured. Installs nothing from the network: DeepSpeed and its missing
# dependencies come as wheels in .whl/ (perf/README.md says how to prepare them).
#
#   bash perf/gpu_suite.sh OUTDIR            # on the GPU machine: results in OUTDIR
#   PACK=1 bash perf/gpu_suite.sh OUTDIR     # ... packed into OUTDIR/gpu_suite.tgz (one file)
#   bash perf/gpu_suite.sh --dry-run OUTDIR  # rehearsal on a CPU-only machine: every stage at toy
#                                            # sizes (Triton's interpreter, torch CPU, DeepSpeed
#                                            # CPU), the same files and summary lines
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash perf/gpu_suite.sh [--dry-run] OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=0
PY=${PYTHON:-python3}
if [ $DRY = 1 ]; then
  unset TIEDADAM_TEST_GPU  # the GPU tests are collected and skipped: no CUDA here
  export TRITON_INTERPRET=1
else
  export TIEDADAM_TEST_GPU=1
  unset TRITON_INTERPRET
  # DeepSpeed's op builder failed to JIT-build FusedAdam on the H200 image with "invalid
  # literal for int() with base 10: '0a'" (an arch like 9.0a it cannot parse); naming the
  # device's plain capability here fixed it (second H200 run, perf/results/h200/README.md).
  export TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/tiedadam_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tiedadam_site"
fi

run() {  # run NAME BUDGET_S CMD...: log to OUTDIR/NAME.log, one summary line per stage
  local name=$1 budget=$2; shift 2
  echo "== $name (budget ${budget} s)"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  local why=""
  [ $rc = 124 ] && why=" (stopped by its budget)"
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (budget $budget s)$why" | tee -a "$OUT/summary.txt"
}

{ if [ $DRY = 1 ]; then echo "dry run on $(uname -n): no GPU"; else nvidia-smi; fi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# Sizes: the GPU run's, or toy sizes for the rehearsal (same stages, same output files).
# Budgets (480 s in all) from the first H200 run's stage times (perf/results/h200/summary.txt:
# GPU tests 84 s, kernel report 30 s, bench_step 42 s for half of today's rows, inductor
# compiling the TinyLlama step for ~90 s): bench_compiled runs the flat workload first and, like
# bench_step, keeps the rows it finished if its budget stops it.
if [ $DRY = 1 ]; then
  KR=(--limit 2)
  STEP=(--scale 0.0005 --iters 2 --warmup 1)
  VAR=(--iters 2 --warmup 1 --limit 4)
  HOST=(--params 20 --iters 5)
  TRAIN=(--d-model 32 --layers 1 --seq 16 --batch 2 --steps 2 --warmup 1)
  MEM=(--scale 0.0005)
else
  KR=()
  STEP=(--iters 10 --warmup 3)
  VAR=()
  HOST=(--real-launch --iters 100)
  TRAIN=()
  MEM=()
fi

run gpu_tests     100 $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_gpu.py tests/test_gpu_deepspeed.py
run kernel_report  45 $PY perf/kernel_report.py --out "$OUT" "${KR[@]}"
run bench_step    110 $PY perf/bench_step.py --out "$OUT" "${STEP[@]}" \
    --providers tiedadam,tiedadam-telemetry,tiedadam-master-bf16,tiedadam-bf16-state,tiedadam-ratio8,tiedadam-pure-bf16,tiedadam-clip,torch-foreach,torch-fused,torch-fused-clip,torch-fused+copy-bf16,deepspeed-fused,bnb-adamw8bit,torchao-adamw8bit
run bench_variants 45 $PY perf/bench_variants.py --out "$OUT" --report "$OUT/kernel_report.json" "${VAR[@]}"
run bench_host     25 $PY perf/bench_host.py --out "$OUT" "${HOST[@]}"
run bench_train    50 $PY perf/bench_train.py --out "$OUT" "${TRAIN[@]}"
run bench_memory   25 $PY perf/bench_memory.py --out "$OUT" "${MEM[@]}"
run bench_compiled 80 $PY perf/bench_step.py --out "$OUT" --tag compiled --workloads flat,llama \
    --providers torch-compiled,torch-fused "${STEP[@]}"

cat "$OUT/summary.txt"
if [ "${PACK:-0}" = 1 ]; then  # one file (the device tool returns at most 8)
  tmp=$(mktemp -d)
  tar czf "$tmp/gpu_suite.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$tmp/gpu_suite.tgz" "$OUT/"
  ls -la "$OUT"
fi
