#!/usr/bin/env bash
# The embedded default: sets up .venv, trains a CoDA-Net on scikit-learn's
# bundled digits (no download), evaluates it and writes explanation figures.
# Usage: bash launch/digits.sh [WORKDIR] [--config.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
workdir="workdirs/digits"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then  # A first argument that is not a flag.
  workdir="$1"
  shift
fi
exec .venv/bin/python -m codajax.main --config configs/digits.py --workdir "$workdir" "$@"
