#!/usr/bin/env bash
# Install lingua-memory's Python dependencies.
# Into the active virtualenv / conda env if there is one, else into ./.venv (created here).
# torch==2.13.0 goes first and alone, so nothing later can pull a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null \
  || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt
python -c "import torch; print(f'installed: torch {torch.__version__} (cuda: {torch.cuda.is_available()}) in {__import__(\"sys\").prefix}')"
