#!/usr/bin/env bash
# The seed's launch script: the LM2 + LongMem hybrid (apps/main/configs/llama_hybrid.yaml) on
# every GPU of this machine (one process on a CPU-only one), through the seed's train.py.
#   bash scripts/train_hybrid.sh [key=value ...]     e.g. train.batch_size=2 data.root_dir=./datasets
# NPROC overrides the process count. Run it from where datasets/ lies (the config's data.root_dir).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
echo "scripts/train_hybrid.sh: torchrun --nproc_per_node=$NPROC train.py model=llama_hybrid $*"
exec python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$ROOT/train.py" model=llama_hybrid "$@"
