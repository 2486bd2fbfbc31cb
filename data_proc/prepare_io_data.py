"""The seed's data preparation command: setup/prepare_io_data.py under its old path.

    python data_proc/prepare_io_data.py --input_file in.jsonl --output_file out.jsonl --save_dir datasets/io_pairs
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv[0] = str(Path(__file__).resolve().parents[1] / "setup" / "prepare_io_data.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
