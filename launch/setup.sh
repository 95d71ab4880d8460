#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs codajax with the pinned versions of
# constraints.txt. Idempotent: a second run only checks. Usage: bash launch/setup.sh [extras]
# Extras (setup.py, comma-separated; default test): test, app (the explorer in the
# browser, python -m codajax.explore), torch, lime, video.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      py="$cand"; break
    fi
  done
fi
[ -n "$py" ] || { echo "codajax needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -c constraints.txt -e ".[${extras}]"
