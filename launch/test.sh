#!/usr/bin/env bash
# Sets up .venv, checks the sources with pyflakes and runs the whole test suite
# on CPU (8 fake devices).
# Extra arguments go to pytest, e.g. bash launch/test.sh -k explain
set -euo pipefail
cd "$(dirname "$0")/.."
# lime, torch, video: the LIME baseline, the pretrained-model conversion (CPU torch)
# and the explanation videos are tested too; test itself brings the explorer's
# gradio, gradio_client and selenium. Its browser test needs Debian's chromium and
# chromium-driver (apt-get install chromium chromium-driver; .ci/run installs them)
# and skips without them, unless CODAJAX_REQUIRE_BROWSER=1.
bash launch/setup.sh test,lime,torch,video
# Unused imports and undefined or dead names fail the run before the tests do.
.venv/bin/python -m pyflakes codajax configs benchmarks tests
# -rs: why a test skipped; --durations: the slowest tests by name (the notebooks among them).
exec .venv/bin/python -m pytest tests -n 2 -q -rs --durations=15 "$@"
