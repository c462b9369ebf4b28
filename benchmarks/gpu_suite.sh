#!/usr/bin/env bash
# The GPU suite of issue #18, prepared to run in one call of about 8 minutes on one GPU
# (H100/H200): the CUDA-marked tests, then figures at the full 1.78B size (random weights):
#   - inference, bf16, one-shot top-10, 3 continuation steps: batch 1 (our sampler and the
#     reference's no-cache algorithm), 16 and 64: time per phase, peak GPU memory;
#   - training, bf16, micro-batch 16: dynamic padding vs every sequence padded to 512 (the
#     reference), without and with torch.compile: images/s, peak GPU memory.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # default OUT_DIR: $OUT or ./gpu-suite
#
# Every stage has its own timeout and writes OUT_DIR/<stage>.txt; a failing stage is
# reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-suite}}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT_DIR"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S))"
  timeout "$seconds" "$@" >"$OUT_DIR/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.txt"
  [ $rc -eq 0 ] || echo "!! $name failed (exit $rc)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
stage tests 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py
stage infer-b1 60 "$PY" -m nxtrec bench infer --preset nxtp-1.78b --device cuda --dtype bfloat16 --top-k 10 --batch-size 1 --baseline
stage infer-b16 45 "$PY" -m nxtrec bench infer --preset nxtp-1.78b --device cuda --dtype bfloat16 --top-k 10 --batch-size 16
stage infer-b64 60 "$PY" -m nxtrec bench infer --preset nxtp-1.78b --device cuda --dtype bfloat16 --top-k 10 --batch-size 64
for compile in false true; do
  stage "train-compile-$compile" 100 "$PY" benchmarks/bench_train.py --config base --set model.preset=nxtp-1.78b \
    --set run.device=cuda --set train.precision=bf16 --set "model.compile=$compile" --micro-batch 16 \
    --steps 12 --warmup 4 --repeat 1 --json "$OUT_DIR/train-compile-$compile.json"
done
echo "== done ($(date -u +%H:%M:%S)); results in $OUT_DIR"
