#!/usr/bin/env bash
# Install, then run the test suite (all markers: the default run is what CI runs).
# Extra arguments go to pytest, e.g. `bash setup/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup/install.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
# The `slurm` tests submit real jobs: start a one-node cluster when we can (root: it installs
# Debian's slurm-wlm and munge if missing). Without it those tests skip, saying why.
if [ "$(id -u)" -eq 0 ] && [ "${LINGUA_NO_LOCAL_SLURM:-0}" != 1 ]; then
  bash setup/local_slurm.sh || echo "warning: could not start a local SLURM; slurm tests will skip"
fi
python -m pytest -q "$@"
