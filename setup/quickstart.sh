#!/usr/bin/env bash
# Fresh machine -> trained debug model: install, prepare the embedded corpus (Python's stdlib
# sources, no network), train apps/main/configs/debug.yaml, evaluate, sample, plot.
# DUMP_DIR (default ./dump/debug) and DATA_DIR (default ./data) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup/install.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
DUMP_DIR=${DUMP_DIR:-./dump/debug}
DATA_DIR=${DATA_DIR:-./data}
python setup/download_prepare_hf_data.py stdlib 2 --data_dir "$DATA_DIR" --seed 42
python -m apps.main.train config=apps/main/configs/debug.yaml dump_dir="$DUMP_DIR" data.root_dir="$DATA_DIR"
python -m apps.main.eval ckpt_dir="$DUMP_DIR" validation.max_steps=50
python -m apps.main.generate ckpt_dir="$DUMP_DIR" prompt='def ' generator.max_gen_len=200 generator.temperature=0.7 generator.top_p=0.9
python -m apps.plots "$DUMP_DIR"
cat <<MSG

Everything went to $DUMP_DIR:
  config.yaml                 the resolved training config
  metrics.jsonl               one row per logged step (loss/out, optim/lr, speed/wps, speed/MFU, ...)
  metrics.validation.jsonl    validation loss and bits per byte
  checkpoints/<step>/         DCP shards, params.json, train_state_00000.json
  train.log                   the training log
  plots/                      loss, validation, lr, grad norm and speed curves (PNG)
Next: edit apps/main/configs/debug.yaml or override keys on the command line, e.g.
  python -m apps.main.train config=apps/main/configs/debug.yaml dump_dir=./dump/run2 steps=600 model.dim=384
MSG
