"""The HMT reference's entry point (OswaldHe/HMT-pytorch hmt_src/main.py), on apps.hmt.train:

    python hmt_src/main.py --task_name wikitext --task_config wikitext-103-raw-v1 --segment_length 128 ...
    accelerate launch hmt_src/main.py ...

The reference's flags as apps/hmt/args.py reads them; --model_name defaults to the reference's
backbone (facebook/opt-2.7b).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.hmt.train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
