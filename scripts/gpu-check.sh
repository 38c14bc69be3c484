#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the op tests with every Triton form compiled and launched on the
# GPU (no interpreter; tests/ops/conftest.py moves the Triton forms' inputs there and compares with the CPU
# oracles), then the benchmark with both models on the GPU.
#
#   bash scripts/gpu-check.sh [OUT_DIR]      (default bench/results)
#
# Writes OUT_DIR/gpu_environment.txt, OUT_DIR/op_tests_cuda.log and OUT_DIR/retnet_vs_transformer_cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/gpu_environment.txt"

echo "== op tests on CUDA (ZOO_BACKEND=triton)"
ZOO_BACKEND=triton timeout "${OP_TESTS_TIMEOUT:-300}" "$PY" -m pytest tests/ops -q -n "${WORKERS:-8}" \
  -p no:cacheprovider -rfE 2>&1 | tee "$OUT_DIR/op_tests_cuda.log" | tail -n 40
echo "op tests exit: ${PIPESTATUS[0]}"

echo "== bench on CUDA"
timeout "${BENCH_TIMEOUT:-200}" "$PY" -m bench retnet --device cuda --no-progress \
  --out "$OUT_DIR/retnet_vs_transformer_cuda.json" 2>&1 | tail -n 60
echo "bench exit: ${PIPESTATUS[0]}"
