#!/usr/bin/env bash
# The one prepared run for an NVIDIA GPU (written for an H200): GPU tests, kernel report,
# step / memory / end-to-end benchmarks, each under its own time budget (about 8 minutes of wall
# time in total; 6.5 minutes on the first H200 run). Installs nothing from the network: DeepSpeed and its missing dependencies come
# as wheels in .whl/ (perf/README.md says how to prepare them).
#
#   bash perf/gpu_suite.sh OUTDIR          # results in OUTDIR
#   PACK=1 bash perf/gpu_suite.sh OUTDIR   # ... packed into OUTDIR/gpu_suite.tgz (one file)
set -uo pipefail
OUT=${1:?usage: bash perf/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TIEDADAM_TEST_GPU=1
export TRITON_DEFAULT_FP_FUSION=0
unset TRITON_INTERPRET
# DeepSpeed's op builder failed to JIT-build FusedAdam on the H200 image with "invalid literal
# for int() with base 10: '0a'" (an arch like 9.0a it cannot parse); naming the device's plain
# capability here fixed it (second H200 run, perf/results/h200/README.md).
export TORCH_CUDA_ARCH_LIST=$(${PYTHON:-python3} -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/tiedadam_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tiedadam_site"
fi

run() {  # run NAME BUDGET_S CMD...: log to OUTDIR/NAME.log, one summary line per step
  local name=$1 budget=$2; shift 2
  echo "== $name (budget ${budget} s)"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (budget $budget s)" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)";
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

run gpu_tests     150 $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_gpu.py tests/test_gpu_deepspeed.py
run kernel_report  70 $PY perf/kernel_report.py --out "$OUT"
run bench_host     40 $PY perf/bench_host.py --out "$OUT" --real-launch --iters 100
run bench_step    110 $PY perf/bench_step.py --out "$OUT" --iters 20 \
    --providers tiedadam,tiedadam-telemetry,tiedadam-master-bf16,tiedadam-bf16-state,tiedadam-pure-bf16,torch-foreach,torch-fused,torch-fused+copy-bf16,deepspeed-fused,bnb-adamw8bit,torchao-adamw8bit
run bench_compiled 150 $PY perf/bench_step.py --out "$OUT" --tag compiled --workloads llama --providers torch-compiled,torch-fused
run bench_memory   40 $PY perf/bench_memory.py --out "$OUT"
run bench_train    80 $PY perf/bench_train.py --out "$OUT"

cat "$OUT/summary.txt"
if [ "${PACK:-0}" = 1 ]; then  # one file (the device tool returns at most 8)
  tmp=$(mktemp -d)
  tar czf "$tmp/gpu_suite.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$tmp/gpu_suite.tgz" "$OUT/"
  ls -la "$OUT"
fi
