"""The seed's evaluation command, on apps.main.eval (apps/main/seed.py maps the flags):

    python eval.py --checkpoint checkpoints/best_model.pt --test_data datasets/io_pairs/test

`checkpoints/best_model.pt` is the best validated checkpoint of the newest run under ./dump
(DUMP/checkpoints/best); a dump dir or checkpoint dir of ours may be named instead.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apps.main import eval as main_eval  # noqa: E402
from apps.main.seed import map_eval_argv, print_once  # noqa: E402
from lingua.args import ConfigError  # noqa: E402

if __name__ == "__main__":
    try:
        argv, lines = map_eval_argv(sys.argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_once(lines, "eval.py")
    main_eval.main(argv)
