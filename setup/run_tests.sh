#!/usr/bin/env bash
# Install, then run the test suite (all markers: the default run is what CI runs).
# Extra arguments go to pytest, e.g. `bash setup/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup/install.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
python -m pytest -q "$@"
