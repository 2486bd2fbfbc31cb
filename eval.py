"""The seed's evaluation command, on apps.main.eval (apps/main/seed.py maps the flags):

    python eval.py --checkpoint checkpoints/best_model.pt --test_data datasets/io_pairs/test

`checkpoints/best_model.pt` is the best validated checkpoint of the newest run under ./dump
(DUMP/checkpoints/best); a dump dir or checkpoint dir of ours may be named instead.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apps.main import eval as main_eval  # noqa: E402
from apps.main.seed import map_eval_argv, run_entry  # noqa: E402

if __name__ == "__main__":
    run_entry("eval.py", map_eval_argv, main_eval.main, sys.argv[1:])
