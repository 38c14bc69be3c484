#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (about 8 minutes on an H200):
#   1. the op tests of every Triton form, compiled and launched on the GPU (no interpreter; tests/ops/conftest.py
#      moves the Triton forms' inputs there and compares with the CPU float64 oracles), and, beside them,
#   2. python -m bench.gpu_parity: every bench entry's model on the GPU (Triton) against the same weights on the
#      CPU (torch), float32: logits, every gradient, decoding;
#   3. then, alone on the GPU, scripts/decode_profile.py: where a cached decoding step goes on the GPU (the baseline
#      transformer's took 65 ms per token at width 256 on an H200, against 4-9 ms for the recurrent models);
#   4. bench.gpu.compare_kernels: zoo's Triton ops against fla / mamba_ssm / flash_attn, each where importable. Put
#      their folder in KERNEL_LIBS (fla-core is pure Python: unpack its wheel there); it joins PYTHONPATH for this
#      step only, since transformers' own Mamba / linear-attention classes switch to those libraries' kernels when
#      they are importable, and the parity checks compare with transformers' torch forms (fla autotunes its kernels
#      on first use: its RWKV-6 comparison alone took 189 s on an H200);
#   5. python -m bench --device cuda: the suite in bf16 (lengths 2K and 8K; BENCH_ARGS replaces the lengths and
#      decoding contexts, BENCH_ENTRIES the entries);
#   6. python -m bench.sparse_attention on CUDA (FlexAttention against the chunked form, which is the CUDA default).
#
#   bash scripts/gpu-check.sh [OUT_DIR]      (default bench/results/gpu_<time>)
#
# Each step has its own time limit (OP_TESTS_TIMEOUT, PARITY_TIMEOUT, BENCH_TIMEOUT, ... seconds); the suite writes its
# result.json after every entry, so a stopped run keeps the entries it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results/gpu_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/gpu_environment.txt"

TIMEOUT_FLAG=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=150")
echo "== op tests on CUDA (ZOO_BACKEND=triton) and bench.gpu_parity, side by side"
( ZOO_BACKEND=triton timeout "${OP_TESTS_TIMEOUT:-220}" "$PY" -m pytest tests/ops -q -n "${WORKERS:-12}" \
    -k "triton and not gpu_compile" -p no:cacheprovider -rfE $TIMEOUT_FLAG > "$OUT_DIR/op_tests_cuda.log" 2>&1
  echo "op tests exit: $?" >> "$OUT_DIR/op_tests_cuda.log" ) &
OPS=$!
timeout "${PARITY_TIMEOUT:-220}" "$PY" -m bench.gpu_parity --out "$OUT_DIR/gpu_parity.json" 2>&1 \
  | tee "$OUT_DIR/gpu_parity.log"
echo "gpu_parity exit: ${PIPESTATUS[0]}"
wait "$OPS"
tail -n 30 "$OUT_DIR/op_tests_cuda.log"

echo "== decoding profile on CUDA"
timeout "${PROFILE_TIMEOUT:-60}" "$PY" scripts/decode_profile.py --entries transformer rmt retnet --context 1024 \
  --rows 15 > "$OUT_DIR/decode_profile_cuda.txt" 2>&1
echo "decode profile exit: $?"; grep "^==" "$OUT_DIR/decode_profile_cuda.txt"

echo "== kernel comparisons (fla / mamba_ssm / flash_attn where importable; KERNEL_LIBS is put on PYTHONPATH here only)"
PYTHONPATH="${KERNEL_LIBS:+$KERNEL_LIBS:}$PYTHONPATH" timeout "${KERNELS_TIMEOUT:-420}" "$PY" -c "
import json, sys
from bench.gpu import compare_kernels
from bench.suite import third_party_status
out = compare_kernels(third_party_status())
json.dump(out, open(sys.argv[1], 'w'), indent=1)
print(json.dumps(out, indent=1))" "$OUT_DIR/kernel_comparisons.json" 2>&1 | tail -n 60
echo "kernel comparisons exit: ${PIPESTATUS[0]}"

echo "== bench on CUDA"
timeout "${BENCH_TIMEOUT:-300}" "$PY" -m bench --device cuda --no-plots --profile-length 0 \
  --out-dir "$OUT_DIR/suite_cuda" ${BENCH_ARGS:---lengths 2048 8192 --decode-contexts 1024 8192} \
  --entries ${BENCH_ENTRIES:-transformer retnet mamba2 hybrid rwkv7 rwkv6 mamba infini hyena longformer bigbird \
    rmt reformer reformer_transformers longformer_mlm bigbird_mlm rwkv4} > "$OUT_DIR/bench_cuda.log" 2>&1
echo "bench exit: $?"
tail -n 45 "$OUT_DIR/bench_cuda.log"

echo "== sparse attention forms on CUDA"
timeout "${SPARSE_TIMEOUT:-90}" "$PY" -m bench.sparse_attention --device cuda --dtype bfloat16 --lengths 4096 16384 \
  --rounds 5 --out "$OUT_DIR/sparse_attention_cuda.json" 2>&1 | tail -n 12
