#!/usr/bin/env bash
# Builds a new virtual environment with the oldest versions requirements*.txt admit (each ">=" read
# as "==", the rest left to pip) and runs the whole test suite in it: the floors hold when it passes.
# Usage: tools/check_floors.sh [PYTHON] [VENV]   (defaults: python3.10, /tmp/floor-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3.10} venv=${2:-/tmp/floor-venv}
rm -rf "$venv" && "$python" -m venv "$venv"
sed -nE 's/^([A-Za-z0-9_.-]+(\[[a-z,]+\])?)>=([^,; ]+).*/\1==\3/p' requirements.txt requirements-dev.txt \
    > "$venv/floors.txt"
# A constraints file in the pip configuration (one capping torch, say) must not move a floor.
PIP_CONSTRAINT=/dev/null "$venv/bin/pip" install -q --disable-pip-version-check -r "$venv/floors.txt"
"$venv/bin/python" --version && "$venv/bin/pip" freeze | grep -iE "^($(cut -d= -f1 "$venv/floors.txt" |
    sed 's/\[.*//' | paste -sd'|'))=="
WANDB_MODE=offline "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:3}"
