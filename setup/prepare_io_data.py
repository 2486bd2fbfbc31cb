"""Turn two line-aligned files (inputs and outputs) into input/output pair data.

    python setup/prepare_io_data.py --input_file in.jsonl --output_file out.jsonl \
        --save_dir datasets/io_pairs [--test_fraction 0.1 --val_fraction 0.05 --seed 42 --nchunks 1]

Line i of --input_file and line i of --output_file make one record {"input", "output"}. Each
file is JSONL (every line an object with a string field `--field`, default "text") when its
first line starts with "{", else plain text lines. The records are shuffled with --seed and
split into:
    SAVE_DIR/<name>.chunk.XX.jsonl   training (data.root_dir=<parent of SAVE_DIR>, source <name>)
    SAVE_DIR/<name>.val.jsonl        validation during training
    SAVE_DIR/test/<name>.test.jsonl  for `python -m apps.main.eval pairs.path=SAVE_DIR/test`
where <name> is SAVE_DIR's name. The trainer concatenates input and output as they are and
trains on the output's tokens only (put any separator at the end of the input).

Every line of both files is checked before anything is written: unequal line counts, an empty
line, bad JSON or a missing field stop the run naming the file and line. SAVE_DIR must not hold
files already (nothing is overwritten); outputs are written as temporary files and renamed.
Both files are read into memory: pair datasets are small next to pretraining corpora.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Optional


class PrepError(ValueError):
    """Bad input, named by file and line."""


def newline_lines(text: str) -> list[str]:
    """The lines of `text`, split at newlines only. str.splitlines() also splits at U+2028,
    U+0085, form feeds and \\x1c-\\x1e, which can sit inside one line of text and would pair
    line i of one file with another line of the other."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_texts(path: Path, field: str) -> list[str]:
    """The text of every line of `path`: a JSONL file's `field`, or the plain line."""
    try:
        lines = newline_lines(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise PrepError(f"{path}: not UTF-8 text ({e})") from None
    jsonl = bool(lines) and lines[0].lstrip().startswith("{")
    texts = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise PrepError(f"{where}: empty line (every line must hold one {'record' if jsonl else 'text'})")
        if not jsonl:
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepError(f"{where}: bad JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise PrepError(f"{where}: expected an object with a string field '{field}' (--field)")
        if not record[field].strip():
            raise PrepError(f"{where}: field '{field}' is empty")
        texts.append(record[field])
    if not texts:
        raise PrepError(f"{path}: no lines")
    return texts


def split_counts(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(test, val) record counts: at least one each when asked for, and some left to train on."""
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise PrepError(f"{n} pairs leave nothing to train on after {n_test} test and {n_val} validation pairs "
                        "(lower --test_fraction / --val_fraction)")
    return n_test, n_val


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Records to a hidden temporary file next to `path`, synced; returns it (renamed later)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def prepare(input_file: Path, output_file: Path, save_dir: Path, test_fraction: float = 0.1,
            val_fraction: float = 0.05, seed: int = 42, nchunks: int = 1, field: str = "text") -> dict:
    """Check both files, then write the splits; returns what was written."""
    for name, value in (("--test_fraction", test_fraction), ("--val_fraction", val_fraction)):
        if not 0 <= value < 1:
            raise PrepError(f"{name} must be in [0, 1), got {value}")
    if nchunks < 1:
        raise PrepError(f"--nchunks must be >= 1, got {nchunks}")
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise PrepError(f"--save_dir {save_dir} already holds files: give an empty or new directory "
                        "(nothing is overwritten)")
    inputs, outputs = read_texts(input_file, field), read_texts(output_file, field)
    if len(inputs) != len(outputs):
        raise PrepError(f"{input_file} has {len(inputs)} lines but {output_file} has {len(outputs)}: the files "
                        f"must be line-aligned (first unpaired line: "
                        f"{(input_file if len(inputs) > len(outputs) else output_file)}:{min(len(inputs), len(outputs)) + 1})")
    records = [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
    n_test, n_val = split_counts(len(records), test_fraction, val_fraction)
    random.Random(seed).shuffle(records)
    test, val, train = records[:n_test], records[n_test : n_test + n_val], records[n_test + n_val :]

    name = save_dir.resolve().name
    files = {save_dir / f"{name}.chunk.{i:02d}.jsonl": train[i::nchunks] for i in range(nchunks)}
    if val:
        files[save_dir / f"{name}.val.jsonl"] = val
    if test:
        files[save_dir / "test" / f"{name}.test.jsonl"] = test
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
    temps = {path: write_jsonl(path, recs) for path, recs in files.items()}
    for path, tmp in temps.items():
        os.replace(tmp, path)
    return {"pairs": len(records), "train": len(train), "val": len(val), "test": len(test),
            "files": [str(p) for p in files]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_file", type=Path, required=True)
    parser.add_argument("--output_file", type=Path, required=True)
    parser.add_argument("--save_dir", type=Path, required=True)
    parser.add_argument("--test_fraction", type=float, default=0.1)
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--nchunks", type=int, default=1)
    parser.add_argument("--field", default="text", help="the text field of JSONL lines")
    ns = parser.parse_args(argv)
    try:
        done = prepare(ns.input_file, ns.output_file, ns.save_dir, ns.test_fraction, ns.val_fraction, ns.seed,
                       ns.nchunks, ns.field)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{done['pairs']} pairs: {done['train']} train, {done['val']} val, {done['test']} test")
    for f in done["files"]:
        print(f"  {f}")
    root, name = ns.save_dir.resolve().parent, ns.save_dir.resolve().name
    print(f"train: python -m apps.main.train config=apps/main/configs/hybrid_debug.yaml data.root_dir={root} "
          f"'data.sources={{{name}: 1.0}}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
