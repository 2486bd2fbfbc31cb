"""The seed's training command, on apps.main.train (apps/main/seed.py maps the arguments):

    python train.py model=llama_hybrid train.batch_size=4 train.learning_rate=1e-4
    torchrun --nproc_per_node=4 train.py model=llama_hybrid train.batch_size=2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apps.main import train as main_train  # noqa: E402
from apps.main.seed import map_train_argv, run_entry  # noqa: E402

if __name__ == "__main__":
    run_entry("train.py", map_train_argv, main_train.main, sys.argv[1:])
