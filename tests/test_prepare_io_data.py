"""setup/prepare_io_data.py: two line-aligned files -> {"input", "output"} records in the
layout the trainer and eval read; every bad input is named by file and line, before any write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lingua.data import DataArgs, source_files
from tests.conftest import ROOT

SCRIPT = ROOT / "setup/prepare_io_data.py"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True, timeout=60)


def _pairs(tmp_path: Path, n: int = 40, jsonl: bool = True) -> tuple[Path, Path]:
    fi, fo = tmp_path / ("in.jsonl" if jsonl else "in.txt"), tmp_path / ("out.jsonl" if jsonl else "out.txt")
    ins = [f"question {i}? " for i in range(n)]
    outs = [f"answer {i}" for i in range(n)]
    if jsonl:
        fi.write_text("".join(json.dumps({"text": t}) + "\n" for t in ins))
        fo.write_text("".join(json.dumps({"text": t}) + "\n" for t in outs))
    else:
        fi.write_text("\n".join(ins) + "\n")
        fo.write_text("\n".join(outs) + "\n")
    return fi, fo


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("jsonl", [True, False], ids=["jsonl", "plain"])
def test_pairs_become_train_val_and_test_splits(tmp_path, jsonl):
    fi, fo = _pairs(tmp_path, jsonl=jsonl)
    save = tmp_path / "datasets/io_pairs"
    out = run("--input_file", fi, "--output_file", fo, "--save_dir", save, "--seed", 42, "--nchunks", 2)
    assert out.returncode == 0, out.stderr
    chunks = sorted(save.glob("*.chunk.*.jsonl"))
    assert [p.name for p in chunks] == ["io_pairs.chunk.00.jsonl", "io_pairs.chunk.01.jsonl"]
    train = [r for p in chunks for r in _records(p)]
    val, test = _records(save / "io_pairs.val.jsonl"), _records(save / "test/io_pairs.test.jsonl")
    assert (len(train), len(val), len(test)) == (34, 2, 4)
    everything = train + val + test
    assert sorted(r["input"] for r in everything) == sorted(f"question {i}? " for i in range(40))
    assert all(r["output"] == "answer " + r["input"].split()[1][:-1] for r in everything), "pairs were mixed up"
    # The trainer finds the source under data.root_dir, and the same seed gives the same files.
    files = source_files(DataArgs(root_dir=str(save.parent), sources={"io_pairs": 1.0}))
    assert [Path(p).name for p in files["io_pairs"]] == [p.name for p in chunks]
    again = tmp_path / "again/io_pairs"
    assert run("--input_file", fi, "--output_file", fo, "--save_dir", again, "--seed", 42, "--nchunks", 2).returncode == 0
    assert all((again / p.relative_to(save)).read_bytes() == p.read_bytes() for p in save.rglob("*.jsonl"))


@pytest.mark.parametrize("case, message", [
    ("unequal", "in.jsonl has 40 lines but {d}/out.jsonl has 39"),
    ("empty_line", "out.jsonl:7: empty line"),
    ("bad_json", "in.jsonl:3: bad JSON"),
    ("no_field", "out.jsonl:5: expected an object with a string field 'text'"),
    ("missing_file", "nope.jsonl: no such file"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, case, message):
    fi, fo = _pairs(tmp_path)
    lines_in, lines_out = fi.read_text().splitlines(), fo.read_text().splitlines()
    if case == "unequal":
        fo.write_text("\n".join(lines_out[:-1]) + "\n")
    elif case == "empty_line":
        lines_out[6] = "   "
        fo.write_text("\n".join(lines_out) + "\n")
    elif case == "bad_json":
        lines_in[2] = '{"text": "unterminated'
        fi.write_text("\n".join(lines_in) + "\n")
    elif case == "no_field":
        lines_out[4] = json.dumps({"content": "x"})
        fo.write_text("\n".join(lines_out) + "\n")
    elif case == "missing_file":
        fi = tmp_path / "nope.jsonl"
    save = tmp_path / "datasets/io_pairs"
    out = run("--input_file", fi, "--output_file", fo, "--save_dir", save)
    assert out.returncode == 2
    assert message.format(d=tmp_path) in out.stderr, out.stderr
    assert not (tmp_path / "datasets").exists(), "a failed run wrote output"


def test_an_existing_save_dir_is_never_overwritten(tmp_path):
    fi, fo = _pairs(tmp_path)
    save = tmp_path / "io_pairs"
    save.mkdir()
    (save / "mine.txt").write_text("keep me")
    out = run("--input_file", fi, "--output_file", fo, "--save_dir", save)
    assert out.returncode == 2 and "already holds files" in out.stderr
    assert [p.name for p in save.iterdir()] == ["mine.txt"] and (save / "mine.txt").read_text() == "keep me"


def test_lines_split_at_newlines_only(tmp_path):
    """U+2028, U+0085, form feeds and \\x1c-\\x1e inside a line are part of it (str.splitlines()
    split there: two 3-line files became '4 pairs', the wrong ones)."""
    ins = ["first\u2028still the first ", "second\x0c ", "third\x1c\x1d\x1e\x85 "]
    outs = ["one\u2029", "two", "three"]
    fi, fo = tmp_path / "in.txt", tmp_path / "out.txt"
    fi.write_text("\n".join(ins) + "\n", encoding="utf-8")
    fo.write_text("\n".join(outs) + "\n", encoding="utf-8")
    save = tmp_path / "io"
    out = run("--input_file", fi, "--output_file", fo, "--save_dir", save, "--test_fraction", 0, "--val_fraction", 0)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 pairs")
    records = _records(save / "io.chunk.00.jsonl")
    assert sorted((r["input"], r["output"]) for r in records) == sorted(zip(ins, outs))
