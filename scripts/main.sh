#!/usr/bin/env bash
# The main job: the long-context leaderboard. Every registered causal architecture is trained at one matched size
# on one mixture (text, multi-query associative recall, passkey), evaluated at 1x..8x its training length, and
# compared on quality and cost in one report: outputs/leaderboard/report.md (plots, JSON and the saved models
# beside it). About 20 minutes on 2 CPU cores; `--budget MINUTES`, `--architectures ...`, `--lengths ...` change it.
# The earlier single-model job (train the tiny transformer, run the eval suite, YaRN) is scripts/single-model.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m eval.leaderboard --out outputs/leaderboard "$@"
