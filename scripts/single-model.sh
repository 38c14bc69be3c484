#!/usr/bin/env bash
# The single-model job: train the tiny baseline transformer on a CPU, evaluate it with the quick long-context suite,
# measure perplexity against context length with and without YaRN (4x), and write one report.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/transformer-tiny
accelerate launch train.py --config configs/transformer/tiny.yaml
# Trained on 128-token blocks (RoPE window 256): 512 tokens is 4x the training length.
python -m eval --model "$OUT" --suite quick --lengths 128,256,512 --out "$OUT/eval"
python -m eval --model "$OUT" --suite quick --tasks perplexity --lengths 128,256,512 \
    --rope-scaling yarn:4 --out "$OUT/eval-yarn4"
python -m eval.report "$OUT/eval" "$OUT/eval-yarn4" --out "$OUT/report"
python -c "from zoo.hub import add_eval_results; print('model card:', add_eval_results('$OUT', '$OUT/report'))"
echo "report: $OUT/report/report.md"
