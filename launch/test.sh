#!/usr/bin/env bash
# Sets up .venv, checks the sources with pyflakes and runs the whole test suite
# on CPU (8 fake devices).
# Extra arguments go to pytest, e.g. bash launch/test.sh -k explain
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test,lime  # lime: the LIME baseline is tested too.
# Unused imports and undefined or dead names fail the run before the tests do.
.venv/bin/python -m pyflakes codajax configs benchmarks tests
exec .venv/bin/python -m pytest tests -n 2 -q "$@"
