"""Tests for setup/download_prepare_hf_data.py on the embedded `stdlib` corpus.

The script runs as a subprocess with plain python, the way users run it; each run
takes about a second. Hub and local datasets are tested in tests/test_prepare_hf.py.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "setup" / "download_prepare_hf_data.py"
NCHUNKS = 4


def prep(data_dir: Path, *extra: str, dataset: str = "stdlib", memory: str = "2", seed: int = 42,
         nchunks: int = NCHUNKS) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), dataset, memory, "--data_dir", str(data_dir),
           "--seed", str(seed), "--nchunks", str(nchunks), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def expected_files(nchunks: int = NCHUNKS) -> set[str]:
    return {f"stdlib.chunk.{i:02d}.jsonl" for i in range(nchunks)} | {"stdlib.val.jsonl", ".done"}


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith(".jsonl")}


def stdlib_sources() -> tuple[dict[str, str], int]:
    """Independent listing: readable stdlib .py files outside site-packages, and the skip count."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found, skipped = {}, 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath) / f
                try:
                    found[p.relative_to(root).as_posix()] = p.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    skipped += 1
    return found, skipped


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    data_dir = tmp_path_factory.mktemp("prep") / "data"
    res = prep(data_dir)
    assert res.returncode == 0, res.stderr
    return data_dir / "stdlib_shuffled", res


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_layout_and_output(prepared: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, res = prepared
    assert {p.name for p in out.iterdir()} == expected_files()
    assert str(out) in res.stdout
    assert "MB/s" in res.stdout
    assert "python -m apps.main.train config=apps/main/configs/debug.yaml" in res.stdout
    marker = json.loads((out / ".done").read_text())
    assert (marker["dataset"], marker["seed"], marker["nchunks"]) == ("stdlib", 42, NCHUNKS)
    for name, info in marker["files"].items():
        assert (out / name).stat().st_size == info["bytes"]
        assert len(read_jsonl(out / name)) == info["docs"]
    sizes = [marker["files"][f"stdlib.chunk.{i:02d}.jsonl"]["docs"] for i in range(NCHUNKS)]
    assert max(sizes) - min(sizes) <= 1  # round-robin dealing
    # Val is a couple of percent of the documents: the first positions of every chunk.
    per_chunk = math.ceil(0.02 * marker["n_docs"] / NCHUNKS)
    assert marker["val_docs_per_chunk"] == per_chunk
    assert marker["n_val"] == NCHUNKS * per_chunk == marker["files"]["stdlib.val.jsonl"]["docs"]
    assert 0.015 <= marker["n_val"] / marker["n_docs"] <= 0.05
    assert sum(sizes) + marker["n_val"] == marker["n_docs"]
    assert marker["nbuckets"] == 1  # 2 GB holds the whole corpus: one in-memory shuffle


def test_every_document_exactly_once(prepared: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = prepared
    docs = [d for f in sorted(out.glob("*.jsonl")) for d in read_jsonl(f)]
    counts = collections.Counter(d["src"] for d in docs)
    assert not [s for s, n in counts.items() if n > 1]
    sources, skipped = stdlib_sources()
    assert set(counts) == set(sources)
    assert all(d["text"] == sources[d["src"]] for d in docs)
    marker = json.loads((out / ".done").read_text())
    assert marker["n_docs"] == len(docs) and marker["n_skipped"] == skipped
    # A shuffle happened: the first chunk is not in path order.
    first = [d["src"] for d in read_jsonl(out / "stdlib.chunk.00.jsonl")]
    assert first != sorted(first)


def test_deterministic_per_seed(prepared: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    out, _ = prepared
    again = prep(tmp_path / "same")
    assert again.returncode == 0, again.stderr
    assert snapshot(tmp_path / "same" / "stdlib_shuffled") == snapshot(out)
    other = prep(tmp_path / "other", seed=7)
    assert other.returncode == 0, other.stderr
    other_files = snapshot(tmp_path / "other" / "stdlib_shuffled")
    assert other_files.keys() == snapshot(out).keys()
    assert other_files["stdlib.chunk.00.jsonl"] != snapshot(out)["stdlib.chunk.00.jsonl"]


def test_rerun_is_already_prepared_and_other_args_refused(
    prepared: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, _ = prepared
    before = snapshot(out)
    res = prep(out.parent, memory="0.5")  # MEMORY does not define the output
    assert res.returncode == 0, res.stderr
    assert "already prepared" in res.stdout
    res = prep(out.parent, seed=43)
    assert res.returncode == 1
    assert "already holds a finished preparation" in res.stderr
    assert snapshot(out) == before


def test_unknown_dataset_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    res = prep(tmp_path / "data", dataset="fineweb_edu_typo")
    assert res.returncode == 2
    assert "fineweb_edu_typo" in res.stderr and "stdlib" in res.stderr
    assert not (tmp_path / "data").exists()


def test_small_memory_spills_to_disk(prepared: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    # 5 MB for a ~30 MB corpus: the shuffle goes through buckets on disk instead of failing.
    out, _ = prepared
    res = prep(tmp_path / "data", memory="0.005")
    assert res.returncode == 0, res.stderr
    small = tmp_path / "data" / "stdlib_shuffled"
    assert {p.name for p in small.iterdir()} == expected_files()
    assert json.loads((small / ".done").read_text())["nbuckets"] > 1
    docs = lambda d: sorted(json.dumps(x, sort_keys=True) for f in sorted(d.glob("*.jsonl")) for x in read_jsonl(f))
    assert docs(small) == docs(out)


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    # An interrupted run leaves some chunks and temp debris but no marker.
    out = tmp_path / "data" / "stdlib_shuffled"
    out.mkdir(parents=True)
    (out / "stdlib.chunk.00.jsonl").write_text("partial")
    (out / ".stdlib.chunk.01.jsonl.tmp-12345").write_text("debris")
    (out / "notes.txt").write_text("the user's own file")
    res = prep(tmp_path / "data")
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} == expected_files() | {"notes.txt"}
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert read_jsonl(out / "stdlib.chunk.00.jsonl")


def test_stray_chunks_from_other_args_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "data" / "stdlib_shuffled"
    out.mkdir(parents=True)
    (out / "stdlib.chunk.07.jsonl").write_text("{}\n")
    res = prep(tmp_path / "data")
    assert res.returncode == 1
    assert "stdlib.chunk.07.jsonl" in res.stderr
    assert {p.name for p in out.iterdir()} == {"stdlib.chunk.07.jsonl"}
