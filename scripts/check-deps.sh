#!/usr/bin/env bash
# Runs the test suite against dependency releases other than the ones this machine has, in a throwaway
# virtual environment, so that an upstream rename is found here rather than by a user.
#
#   bash scripts/check-deps.sh            # latest: the newest release of every dependency, ignoring the upper
#                                         # bounds of setup.cfg (the next transformers minor included)
#   bash scripts/check-deps.sh lowest     # lowest: every dependency at the lower bound setup.cfg declares
#
# torch stays at the CPU build the README installs (ZOO_TORCH=... to choose another). Extra pytest arguments
# go after the mode: `bash scripts/check-deps.sh latest -x -k shared_suite`. The environment is removed at the
# end (ZOO_KEEP_VENV=1 keeps it); the installed versions are printed first, so a failure names what it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-latest}"
shift || true
case "$MODE" in latest | lowest) ;; *) echo "usage: $0 [latest|lowest] [pytest args...]" >&2; exit 2 ;; esac

VENV="$(mktemp -d)/venv"
cleanup() { [[ "${ZOO_KEEP_VENV:-0}" == 1 ]] && echo "kept $VENV" || rm -rf "$(dirname "$VENV")"; }
trap cleanup EXIT
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip install -q "torch==${ZOO_TORCH:-2.13.0}"

# install_requires and the test extras of setup.cfg, one requirement a line (environment markers kept)
read_cfg() {
    python3 - "$1" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser(interpolation=None)
cfg.read("setup.cfg")
section, key = sys.argv[1].split(":")
for line in cfg[section][key].strip().splitlines():
    print(line.strip())
PY
}
REQS="$(read_cfg options:install_requires | grep -vE '^torch[ ;<>=!~]')"
mapfile -t TEST_REQS < <(read_cfg options.extras_require:test)
pip install -q --no-deps -e .
if [[ "$MODE" == latest ]]; then
    # names only: the newest release of each, whatever setup.cfg's upper bounds say
    mapfile -t names < <(sed -E 's/[ ;<>=!~].*//' <<<"$REQS")
    pip install -q --upgrade "${names[@]}" "${TEST_REQS[@]}"
else
    # name==lower bound, markers kept
    mapfile -t pins < <(sed -E 's/>=([^,;]+)(,[^;]*)?/==\1/' <<<"$REQS")
    pip install -q "${pins[@]}" "${TEST_REQS[@]}"
fi
pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|accelerate|datasets|peft|evaluate|safetensors|huggingface.hub|numpy) '
pip check
ruff check .
python -m pytest -q "$@"
