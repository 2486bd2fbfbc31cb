"""Tests for setup/download_prepare_hf_data.py on hub-style and local datasets.

Datasets are written by the tests (parquet in the hub's layout, jsonl, jsonl.zst, txt); only
the hub itself is mocked (huggingface_hub.snapshot_download). Most runs call the script's
main() in-process; the kill-and-resume test runs it as a subprocess, the way users do.
"""

from __future__ import annotations

import collections
import fnmatch
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

SCRIPT = Path(__file__).resolve().parents[1] / "setup" / "download_prepare_hf_data.py"


@pytest.fixture(scope="module")
def prep_mod():
    spec = importlib.util.spec_from_file_location("download_prepare_hf_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def mod(prep_mod, monkeypatch):
    monkeypatch.setattr(prep_mod, "RETRY_BASE_DELAY_S", 0.0)
    return prep_mod


def run(mod, capsys, *argv: str) -> tuple[int, str, str]:
    rc = mod.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ----------------------------------------------------------------------------- data helpers


def doc_text(f: int, i: int) -> str:
    return f"document {f}-{i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(50 + i % 30))


def write_hub_parquet(root: Path, nfiles: int = 3, rows: int = 400) -> list[dict]:
    """FineWeb-Edu's 10BT layout: sample/10BT/000_00000.parquet ..., columns text + id."""
    d = root / "sample" / "10BT"
    d.mkdir(parents=True, exist_ok=True)
    docs = []
    for f in range(nfiles):
        texts = [doc_text(f, i) for i in range(rows)]
        ids = [f"{f}-{i}" for i in range(rows)]
        pq.write_table(pa.table({"text": texts, "id": ids}), d / f"{f:03d}_00000.parquet")
        docs += [{"text": t, "id": i} for t, i in zip(texts, ids)]
    # Files the dataset's pattern must not pick up.
    (root / "README.md").write_text("# dataset card\n")
    (root / "sample" / "100BT").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": ["not this one"], "id": ["x"]}), root / "sample" / "100BT" / "000_00000.parquet")
    return docs


def write_jsonl_files(root: Path, nfiles: int, docs_per_file: int, doc_bytes: int = 1000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for f in range(nfiles):
        with open(root / f"part-{f:03d}.jsonl", "w") as out:
            for i in range(docs_per_file):
                words = " ".join(f"w{rng.randrange(1000)}" for _ in range(doc_bytes // 5))
                d = {"text": f"doc {f}-{i} {words}"[:doc_bytes], "n": f * docs_per_file + i}
                out.write(json.dumps(d) + "\n")
                docs.append(d)
    return docs


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith(".jsonl")}


def output_docs(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("*.jsonl")) for line in p.read_bytes().splitlines()]


def key(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def assert_exactly_once(out: Path, docs: list[dict]) -> list[dict]:
    got = output_docs(out)
    counts = collections.Counter(key(d) for d in got)
    assert counts == collections.Counter(key(d) for d in docs)
    assert set(counts.values()) == {1}
    return got


def chunk_order(out: Path, name: str) -> list[dict]:
    """Documents in the shuffled order: val lines, then chunk 0, 1, ..."""
    return [json.loads(l) for p in [out / f"{name}.val.jsonl", *sorted(out.glob(f"{name}.chunk.*.jsonl"))]
            for l in p.read_bytes().splitlines()]


# ----------------------------------------------------------------------------- 1. parquet in the hub layout


def test_parquet_hub_layout_full_prep(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    docs = write_hub_parquet(src)
    args = ["fineweb_edu_10bt", "1", "--seed", "42", "--nchunks", "4", "--src_dir", src]
    rc, out, err = run(mod, capsys, *args, "--data_dir", tmp_path / "d1")
    assert rc == 0, err
    o1 = tmp_path / "d1" / "fineweb_edu_10bt_shuffled"
    assert {p.name for p in o1.iterdir()} == {".done", "fineweb_edu_10bt.val.jsonl"} | {
        f"fineweb_edu_10bt.chunk.{i:02d}.jsonl" for i in range(4)}
    got = assert_exactly_once(o1, docs)  # every column kept, the 100BT file not read
    assert all(set(d) == {"text", "id"} for d in got)
    assert "MB/s" in out and "next: python -m apps.main.train" in out
    marker = json.loads((o1 / ".done").read_text())
    assert marker["n_docs"] == 1200 and marker["source_files"] == 3
    assert marker["n_val"] == 4 * marker["val_docs_per_chunk"] == 4 * 6  # ceil(2% of 1200 / 4)
    for name, info in marker["files"].items():
        assert (o1 / name).stat().st_size == info["bytes"]
    assert [d["id"] for d in chunk_order(o1, "fineweb_edu_10bt")] != [d["id"] for d in docs]

    rc, _, err = run(mod, capsys, *args, "--data_dir", tmp_path / "d2")
    assert rc == 0, err
    assert output_files(tmp_path / "d2" / "fineweb_edu_10bt_shuffled") == output_files(o1)
    rc, _, err = run(mod, capsys, *args[:2], "--seed", "7", *args[4:], "--data_dir", tmp_path / "d3")
    assert rc == 0, err
    other = output_files(tmp_path / "d3" / "fineweb_edu_10bt_shuffled")
    assert other.keys() == output_files(o1).keys() and other != output_files(o1)

    rc, out, _ = run(mod, capsys, *args, "--data_dir", tmp_path / "d1")
    assert rc == 0 and "already prepared" in out


# ----------------------------------------------------------------------------- 2. mocked hub download


class FakeHub:
    """snapshot_download over a local tree: copies the files matching allow_patterns."""

    def __init__(self, repo: Path, failures: int = 0):
        self.repo, self.failures, self.calls = repo, failures, []

    def __call__(self, repo_id, *, repo_type=None, local_dir=None, allow_patterns=None, token=None, **kw):
        self.calls.append({"repo_id": repo_id, "repo_type": repo_type, "local_dir": local_dir,
                           "allow_patterns": allow_patterns, "token": token})
        if len(self.calls) <= self.failures:
            raise ConnectionError(f"simulated network failure {len(self.calls)}")
        for p in sorted(self.repo.rglob("*")):
            rel = p.relative_to(self.repo).as_posix()
            if p.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(rel, a) for a in allow_patterns)):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, Path(local_dir) / rel)
        cache = Path(local_dir) / ".cache" / "huggingface"  # what the real client leaves
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "x.jsonl").write_text("not data\n")
        return str(local_dir)


def test_hub_download_with_retries(mod, capsys, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    repo = tmp_path / "remote"
    docs = write_hub_parquet(repo)
    hub = FakeHub(repo, failures=2)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    data = tmp_path / "data"
    args = ["fineweb_edu_10bt", "1", "--data_dir", data, "--seed", "42", "--nchunks", "4"]
    rc, out, err = run(mod, capsys, *args)
    assert rc == 0, err
    assert len(hub.calls) == 3 and "attempt 1/5 failed" in err and "attempt 2/5 failed" in err
    assert hub.calls[-1] == {"repo_id": "HuggingFaceFW/fineweb-edu", "repo_type": "dataset",
                             "local_dir": str(data / "fineweb_edu_10bt"), "allow_patterns": ["sample/10BT/*"],
                             "token": "hf_test"}
    out_dir = data / "fineweb_edu_10bt_shuffled"
    assert_exactly_once(out_dir, docs)

    # The downloaded files give the same output as the same files read with --src_dir.
    rc, _, err = run(mod, capsys, *args[:2], "--data_dir", tmp_path / "local", *args[4:], "--src_dir", repo)
    assert rc == 0, err
    assert output_files(tmp_path / "local" / "fineweb_edu_10bt_shuffled") == output_files(out_dir)

    rc, out, _ = run(mod, capsys, *args)  # finished: no second download
    assert rc == 0 and "already prepared" in out and len(hub.calls) == 3


def test_hub_id_downloads_data_files_only(mod, capsys, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    repo = tmp_path / "remote"
    docs = write_jsonl_files(repo / "data", nfiles=2, docs_per_file=50)
    (repo / "LICENSE.txt").write_text("licence text, not a document")
    hub = FakeHub(repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    rc, out, err = run(mod, capsys, "some-org/my.data", "1", "--data_dir", tmp_path / "d", "--nchunks", "2")
    assert rc == 0, err
    assert hub.calls[0]["repo_id"] == "some-org/my.data"
    assert hub.calls[0]["allow_patterns"] == list(mod.HUB_DATA_PATTERNS)
    assert hub.calls[0]["local_dir"] == str(tmp_path / "d" / "some-org_my.data")
    out_dir = tmp_path / "d" / "some-org_my.data_shuffled"
    assert (out_dir / "some-org_my.data.chunk.01.jsonl").exists()
    assert_exactly_once(out_dir, docs)

    rc, _, err = run(mod, capsys, "some-org/other", "1", "--data_dir", tmp_path / "e", "--nchunks", "2",
                     "--allow_patterns", "data/part-000.jsonl")
    assert rc == 0, err
    assert hub.calls[-1]["allow_patterns"] == ["data/part-000.jsonl"]
    assert_exactly_once(tmp_path / "e" / "some-org_other_shuffled", docs[:50])


def test_hub_download_gives_up(mod, capsys, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    hub = FakeHub(tmp_path, failures=99)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    rc, _, err = run(mod, capsys, "dclm_baseline_1.0", "1", "--data_dir", tmp_path / "d")
    assert rc == 1 and "failed 5 times" in err and "mlfoundations/dclm-baseline-1.0" in err
    assert len(hub.calls) == 5 and hub.calls[0]["allow_patterns"] == ["*.jsonl.zst"]
    assert not (tmp_path / "d" / "dclm_baseline_1.0_shuffled").exists()

    def invalid(*a, **kw):  # a wrong name is not retried
        hub.calls.append(kw)
        raise HFValidationError("bad repo id")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", invalid)
    hub.calls.clear()
    rc, _, err = run(mod, capsys, "fineweb_edu", "1", "--data_dir", tmp_path / "d")
    assert rc == 1 and "bad repo id" in err and len(hub.calls) == 1


# ----------------------------------------------------------------------------- 3. memory cap


def traced_peak(mod, capsys, tmp_path: Path, *argv) -> tuple[int, int]:
    """Exit code and tracemalloc peak (bytes) of one in-process prep.

    A tiny prep runs first so that one-time costs (lazy imports, caches of re, tqdm and
    argparse) are not counted against the shuffle.
    """
    warm = tmp_path / "warmup"
    write_jsonl_files(warm / "src", nfiles=1, docs_per_file=20)
    assert run(mod, capsys, "warm", "0.0003", "--src_dir", warm / "src", "--data_dir", warm, "--nchunks", "2")[0] == 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        rc, _, err = run(mod, capsys, *argv)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 0, err
    return rc, peak


def test_tiny_memory_shuffle_is_a_full_permutation_within_budget(mod, capsys, tmp_path: Path) -> None:
    docs = write_jsonl_files(tmp_path / "src", nfiles=3, docs_per_file=1500)  # ~4.5 MB
    data_bytes = sum(p.stat().st_size for p in (tmp_path / "src").iterdir())
    cap = 0.0003e9
    rc, peak = traced_peak(mod, capsys, tmp_path, "corpus", "0.0003", "--src_dir", tmp_path / "src",
                           "--data_dir", tmp_path / "d", "--nchunks", "4")
    assert rc == 0
    # The shuffle's buffers stay under MEMORY, a fifteenth of the data here.
    assert peak < cap < data_bytes / 15, (peak, cap, data_bytes)
    out = tmp_path / "d" / "corpus_shuffled"
    assert_exactly_once(out, docs)
    assert [d["n"] for d in chunk_order(out, "corpus")] != [d["n"] for d in docs]
    marker = json.loads((out / ".done").read_text())
    assert marker["nbuckets"] > 1 and marker["memory_gb"] == 0.0003


def record_shuffle_tags(mod, monkeypatch) -> list:
    """The tags of the buckets that pass 2 shuffles, in order (recorded around the real shuffle)."""
    tags = []
    real_shuffle = mod.shuffle_bucket

    def recording(path, n_lines, nbytes, tag, *a, **kw):
        tags.append(tag)
        return real_shuffle(path, n_lines, nbytes, tag, *a, **kw)

    monkeypatch.setattr(mod, "shuffle_bucket", recording)
    return tags


def test_bucket_too_big_for_memory_is_split_on_disk(mod, capsys, tmp_path: Path, monkeypatch) -> None:
    """A wrong size estimate (here: one bucket for everything) still shuffles within MEMORY."""
    docs = write_jsonl_files(tmp_path / "src", nfiles=2, docs_per_file=1000)  # ~2 MB
    monkeypatch.setattr(mod, "choose_nbuckets", lambda est, budget: 1)
    tags = record_shuffle_tags(mod, monkeypatch)
    rc, peak = traced_peak(mod, capsys, tmp_path, "corpus", "0.0003", "--src_dir", tmp_path / "src",
                           "--data_dir", tmp_path / "d", "--nchunks", "3")
    assert rc == 0
    assert peak < 0.0003e9, peak
    out = tmp_path / "d" / "corpus_shuffled"
    assert json.loads((out / ".done").read_text())["nbuckets"] == 1
    assert any(t.count(".") >= 1 for t in tags if t.startswith("0"))  # bucket 0 was split
    assert not list((out).rglob("split-*"))
    assert_exactly_once(out, docs)
    order = [d["n"] for d in chunk_order(out, "corpus")]
    assert order != sorted(order)
    # One document larger than the whole budget is still fine (a bucket of one).
    big = [{"text": "x" * 400_000}, {"text": "y" * 400_000}, {"text": "z"}]
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in big))
    rc, _, err = run(mod, capsys, "big", "0.0003", "--src_dir", tmp_path / "big", "--data_dir", tmp_path / "d",
                     "--nchunks", "1")
    assert rc == 0, err
    assert_exactly_once(tmp_path / "d" / "big_shuffled", big)


# ----------------------------------------------------------------------------- 4. interruption


def prep_cmd(src: Path, data_dir: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "corpus", "0.003", "--src_dir", str(src), "--data_dir", str(data_dir),
            "--seed", "5", "--nchunks", "4"]


def kill_during_pass1(src: Path, data_dir: Path) -> bool:
    """Start a prep, SIGKILL it once pass 1 has saved >= 1 file; False if it got too far first."""
    work = data_dir / "corpus_shuffled" / ".prep-work"
    proc = subprocess.Popen(prep_cmd(src, data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                done = json.loads((work / "state.json").read_text())["files_done"]
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= 1:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return not (work / "pass1.done").exists()
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_prep_resumes_to_identical_output(tmp_path: Path) -> None:
    for attempt, doc_bytes in enumerate((1000, 4000, 16000)):
        src = tmp_path / f"src{attempt}"
        docs = write_jsonl_files(src, nfiles=30, docs_per_file=800, doc_bytes=doc_bytes)
        data = tmp_path / f"killed{attempt}"
        if kill_during_pass1(src, data):
            break
    else:
        pytest.fail("the prep finished pass 1 before it could be killed, even on the biggest dataset")
    out = data / "corpus_shuffled"
    names = {p.name for p in out.iterdir()}
    assert ".done" not in names and not [n for n in names if n.startswith("corpus.")]

    res = subprocess.run(prep_cmd(src, data), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resuming after" in res.stdout
    clean = subprocess.run(prep_cmd(src, tmp_path / "clean"), capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert output_files(out) == output_files(tmp_path / "clean" / "corpus_shuffled")
    assert not (out / ".prep-work").exists()
    assert len(output_docs(out)) == len(docs)


def test_interrupted_pass1_and_pass2_resume(mod, capsys, tmp_path: Path, monkeypatch) -> None:
    """Interruptions at chosen points: mid-file in pass 1 (partial bucket lines), then in pass 2."""
    docs = write_jsonl_files(tmp_path / "src", nfiles=5, docs_per_file=300)
    args = ["corpus", "0.001", "--src_dir", tmp_path / "src", "--nchunks", "4", "--seed", "3"]
    rc, _, err = run(mod, capsys, *args, "--data_dir", tmp_path / "clean")
    assert rc == 0, err
    want = output_files(tmp_path / "clean" / "corpus_shuffled")

    real_read = mod.read_jsonl

    def dies_in_third_file(src, progress, budget):
        for i, line in enumerate(real_read(src, progress, budget)):
            if src.rel == "part-002.jsonl" and i == 250:
                raise KeyboardInterrupt
            yield line

    monkeypatch.setattr(mod, "read_jsonl", dies_in_third_file)
    rc, _, err = run(mod, capsys, *args, "--data_dir", tmp_path / "d")
    assert rc == 130 and "re-run the same command to resume" in err
    monkeypatch.setattr(mod, "read_jsonl", real_read)
    out = tmp_path / "d" / "corpus_shuffled"
    state = json.loads((out / ".prep-work" / "state.json").read_text())
    assert state["files_done"] == 2
    # The interrupted file's lines reached the buckets beyond the saved sizes; resume cuts them.
    sizes = [p.stat().st_size for p in sorted((out / ".prep-work").glob("bucket-*"))]
    assert sum(sizes) > sum(state["bucket_bytes"])

    real_shuffle = mod.shuffle_bucket
    calls = []

    def dies_in_pass2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_shuffle(*a, **kw)

    monkeypatch.setattr(mod, "shuffle_bucket", dies_in_pass2)
    rc, stdout, _ = run(mod, capsys, *args, "--data_dir", tmp_path / "d")
    assert rc == 130 and "resuming after 2 of 5 files" in stdout
    monkeypatch.setattr(mod, "shuffle_bucket", real_shuffle)
    assert {p.name for p in out.iterdir()} == {".prep-work"}  # no chunks, no temp files, no marker
    assert (out / ".prep-work" / "pass1.done").exists()

    rc, stdout, err = run(mod, capsys, *args, "--data_dir", tmp_path / "d")
    assert rc == 0, err
    assert "pass 1 already done" in stdout
    assert output_files(out) == want
    assert {p.name for p in out.iterdir()} == set(want) | {".done"}
    assert len(output_docs(out)) == len(docs)


# ----------------------------------------------------------------------------- 5. bad input


def assert_no_output(data: Path) -> None:
    assert not data.exists() or not [p for p in data.rglob("*") if p.name.endswith(".jsonl") or p.name == ".done"]


def test_missing_and_empty_src_dir(mod, capsys, tmp_path: Path) -> None:
    data = tmp_path / "data"
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", tmp_path / "nowhere", "--data_dir", data)
    assert rc == 1 and str(tmp_path / "nowhere") in err and "does not exist" in err
    assert not data.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no data here")
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", empty, "--data_dir", data)
    assert rc == 1 and str(empty) in err and "no data files" in err
    assert not data.exists()

    write_hub_parquet(tmp_path / "wrong")  # has sample/10BT, but dclm wants *.jsonl.zst
    rc, _, err = run(mod, capsys, "dclm_baseline_1.0", "1", "--src_dir", tmp_path / "wrong", "--data_dir", data)
    assert rc == 1 and "*.jsonl.zst" in err
    assert not data.exists()


def test_corrupt_parquet_is_named_before_output(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_hub_parquet(src)
    bad = src / "sample" / "10BT" / "001_00001.parquet"
    bad.write_bytes(random.Random(0).randbytes(5000))
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("the user's own file")
    rc, _, err = run(mod, capsys, "fineweb_edu_10bt", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "4")
    assert rc == 1 and str(bad) in err and "parquet" in err
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt"]
    assert (data / "notes.txt").read_text() == "the user's own file"


def test_parquet_rows_without_text(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"body": ["a", "b"]}), src / "nocol.parquet")
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", tmp_path / "d")
    assert rc == 1 and f"{src / 'nocol.parquet'}: row 1" in err and "body" in err
    (src / "nocol.parquet").unlink()
    pq.write_table(pa.table({"text": ["a", "b", "c", None, "e"]}), src / "nulls.parquet")
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", tmp_path / "d")
    assert rc == 1 and f"{src / 'nulls.parquet'}: row 4" in err
    assert not (tmp_path / "d").exists()


def test_bad_jsonl_lines_are_named(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good = [{"text": f"doc {i}"} for i in range(20)]
    (src / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in good))
    (src / "b.jsonl").write_text('{"text": "ok"}\n\n{"txt": "typo"}\n')
    data = tmp_path / "data"
    out = data / "corpus_shuffled"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "2")
    assert rc == 1 and f"{src / 'b.jsonl'}:3:" in err and "'text'" in err and "txt" in err
    assert "re-run to continue" in err  # a.jsonl's pass-1 work is kept
    assert_no_output(data)
    assert (out / "notes.txt").read_text() == "mine"

    (src / "b.jsonl").write_text('{"text": "ok"}\n{"text": "broken\n')
    rc, out_text, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "2")
    assert rc == 1 and f"{src / 'b.jsonl'}:2:" in err and "not valid JSON" in err
    assert "resuming after 1 of 2 files" in out_text
    assert_no_output(data)

    # The first file bad: nothing was worth keeping, so nothing is left behind.
    (src / "a.jsonl").write_text('["a list"]\n')
    rc, _, err = run(mod, capsys, "other", "1", "--src_dir", src, "--data_dir", data)
    assert rc == 1 and f"{src / 'a.jsonl'}:1:" in err
    assert not (data / "other_shuffled").exists()


def test_unknown_dataset_without_src_dir_exits_2(mod, capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        mod.main(["fineweb_edu_typo", "1", "--data_dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "fineweb_edu_typo" in err and "--src_dir" in err and "fineweb_edu_10bt" in err and "stdlib" in err
    assert not (tmp_path / "data").exists()
    with pytest.raises(SystemExit) as e:
        mod.main(["a/b/c", "1", "--data_dir", str(tmp_path / "data")])
    assert e.value.code == 2 and not (tmp_path / "data").exists()


def test_too_many_chunks_keeps_pass1_for_the_retry(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    docs = write_jsonl_files(src, nfiles=1, docs_per_file=10, doc_bytes=50)
    data = tmp_path / "data"
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data)  # default 32 chunks
    assert rc == 1 and "smaller --nchunks" in err
    assert_no_output(data)
    rc, out, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "2")
    assert rc == 0, err
    assert "pass 1 already done" in out
    assert_exactly_once(data / "corpus_shuffled", docs)


# ----------------------------------------------------------------------------- 6. other formats


def test_jsonl_zst_txt_and_chat_records_pass_through(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    records = [
        {"input": "2+2?", "output": "4", "meta": {"k": [1, 2]}},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "héllo \u2028 ✓"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"text": "unicode: ünïcødé 日本語 \U0001f600"},
    ] * 5
    cctx = zstandard.ZstdCompressor()
    (src / "a.jsonl.zst").write_bytes(cctx.compress("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                            for r in records).encode("utf-8")))
    prompts = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    (src / "nested" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    texts = {f"t{i}.txt": f"plain text file {i}\nsecond line\n" for i in range(6)}
    for n, t in texts.items():
        (src / "nested" / n).write_text(t)
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}], "id": i}
             for i in range(8)]
    pq.write_table(pa.Table.from_pylist(chats), src / "chats.parquet")
    rc, _, err = run(mod, capsys, "mixed", "1", "--src_dir", src, "--data_dir", tmp_path / "d", "--nchunks", "3")
    assert rc == 0, err
    out = tmp_path / "d" / "mixed_shuffled"
    got = collections.Counter(key(d) for d in output_docs(out))
    want = collections.Counter(key(d) for d in records + prompts + chats + [{"text": t} for t in texts.values()])
    assert got == want
    for p in out.glob("*.jsonl"):
        assert p.read_bytes().isascii()  # ensure_ascii output, one document per line

    bad = tmp_path / "badzst"
    bad.mkdir()
    (bad / "x.jsonl.zst").write_bytes(b"not zstd at all")
    rc, _, err = run(mod, capsys, "mixed2", "1", "--src_dir", bad, "--data_dir", tmp_path / "d")
    assert rc == 1 and "x.jsonl.zst" in err and "zstandard" in err


def test_importable_without_side_effects(tmp_path: Path) -> None:
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('p', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(callable(m.prepare), callable(m.main), 'pyarrow' in sys.modules, 'huggingface_hub' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path)
    assert res.stdout.split() == ["True", "True", "False", "False"], res.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 7. sources changed


def add_documents(src: Path, n: int, tag: str) -> list[dict]:
    """Appends n new documents to the first source file and writes a new file of n more."""
    first = sorted(src.glob("*.jsonl"))[0]
    added = [{"text": f"added {tag} {i}", "n": f"{tag}-{i}"} for i in range(2 * n)]
    with open(first, "a") as f:
        f.write("".join(json.dumps(d) + "\n" for d in added[:n]))
    (src / f"part-new-{tag}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in added[n:]))
    return added


def test_finished_output_is_redone_when_sources_change(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    docs = write_jsonl_files(src, nfiles=2, docs_per_file=100, doc_bytes=200)
    data = tmp_path / "data"
    out = data / "corpus_shuffled"
    args = ["corpus", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "2"]
    rc, _, err = run(mod, capsys, *args)
    assert rc == 0, err
    (out / "notes.txt").write_text("the user's own file")
    rc, stdout, err = run(mod, capsys, *args)
    assert rc == 0 and "already prepared" in stdout, err

    docs += add_documents(src, 20, "a")
    rc, stdout, err = run(mod, capsys, *args)
    assert rc == 0, err
    assert "already prepared" not in stdout and "changed" in stdout
    assert_exactly_once(out, docs)
    assert {p.name for p in out.iterdir()} == {".done", "notes.txt", "corpus.val.jsonl", "corpus.chunk.00.jsonl",
                                              "corpus.chunk.01.jsonl"}
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert json.loads((out / ".done").read_text())["n_docs"] == len(docs)

    # Same size, same name, other content: the fingerprint still sees it (mtime).
    first = src / "part-000.jsonl"
    before, mtime = first.read_text(), first.stat().st_mtime_ns
    assert before.startswith('{"text": "doc 0-0 ')
    first.write_text(before.replace("doc 0-0 ", "DOC 0-0 ", 1))
    os.utime(first, ns=(mtime + 10**9, mtime + 10**9))  # an edit a second later, whatever the fs's mtime tick
    assert first.stat().st_size == len(before)
    docs[0] = {**docs[0], "text": docs[0]["text"].replace("doc 0-0 ", "DOC 0-0 ", 1)}
    rc, stdout, err = run(mod, capsys, *args)
    assert rc == 0 and "already prepared" not in stdout, err
    assert_exactly_once(out, docs)
    rc, stdout, _ = run(mod, capsys, *args)
    assert rc == 0 and "already prepared" in stdout

    # A redo that fails leaves the finished output as it was, marker included.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (src / "part-bad.jsonl").write_text('{"txt": "typo"}\n')
    rc, _, err = run(mod, capsys, *args)
    assert rc == 1 and f"{src / 'part-bad.jsonl'}:1:" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / ".prep-work").exists()  # the redo's pass 1 over the files before the bad one
    (src / "part-bad.jsonl").unlink()
    rc, stdout, _ = run(mod, capsys, *args)
    assert rc == 0 and "already prepared" in stdout and not (out / ".prep-work").exists()

    # Sources gone (moved, or a download deleted to free disk): the output stands, with a warning.
    shutil.rmtree(src)
    rc, stdout, err = run(mod, capsys, *args)
    assert rc == 0 and "already prepared" in stdout and "not checked" in err
    assert_exactly_once(out, docs)


def test_finished_pass1_is_redone_when_sources_change(mod, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    docs = write_jsonl_files(src, nfiles=2, docs_per_file=10, doc_bytes=50)
    data = tmp_path / "data"
    # 32 chunks cannot be filled: the finished first pass is kept for the retry.
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data)
    assert rc == 1 and "smaller --nchunks" in err
    assert (data / "corpus_shuffled" / ".prep-work" / "pass1.done").exists()

    docs += add_documents(src, 5, "b")
    rc, stdout, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "2")
    assert rc == 0, err
    assert "pass 1 already done" not in stdout
    assert_exactly_once(data / "corpus_shuffled", docs)


# ----------------------------------------------------------------------------- 8. records the trainer rejects


TRAINER_REJECTS = {
    "empty_messages": {"messages": []},
    "no_assistant_turn": {"conversations": [{"from": "human", "value": "q"}]},
    "unknown_role": {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "a"}]},
    "both_pair_spellings": {"prompt": "p", "response": "r", "output": "o"},
}


def trainer_verdict(record: dict) -> str | None:
    """What the trainer's own parser says of the record: None if it trains on it, else its error."""
    from lingua.data import DataError, parse_document

    try:
        parse_document(json.dumps(record).encode(), "x", 0)
        return None
    except DataError as e:
        return str(e)


@pytest.mark.parametrize("kind", sorted(TRAINER_REJECTS))
def test_records_the_trainer_rejects_fail_prep_naming_the_line(mod, capsys, tmp_path: Path, kind: str) -> None:
    bad = TRAINER_REJECTS[kind]
    assert trainer_verdict(bad) is not None  # the premise: training would stop on this line
    src = tmp_path / "src"
    src.mkdir()
    good = [{"text": f"doc {i}"} for i in range(2)]
    (src / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [*good, bad]))
    data = tmp_path / "data"
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "1")
    assert rc == 1 and f"{src / 'a.jsonl'}:3:" in err, err
    assert_no_output(data)

    # A parquet row: named by its row number.
    (src / "a.jsonl").unlink()
    # The first row names the columns (from_pylist): give it all of them, as nulls.
    rows = [{"text": "ok", **dict.fromkeys(bad)}, {"text": None, **bad}]
    pq.write_table(pa.Table.from_pylist(rows), src / "b.parquet")
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", data, "--nchunks", "1")
    assert rc == 1 and f"{src / 'b.parquet'}: row 2:" in err, err
    assert_no_output(data)


def test_prep_accepts_what_the_trainer_accepts(mod, capsys, tmp_path: Path) -> None:
    records = [
        {"input": "i", "output": "o", "prompt": "p", "response": "r"},
        {"text": "t", "messages": []},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    assert [trainer_verdict(r) for r in records] == [None] * len(records)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in records * 3))
    rc, _, err = run(mod, capsys, "corpus", "1", "--src_dir", src, "--data_dir", tmp_path / "d", "--nchunks", "1")
    assert rc == 0, err
    assert collections.Counter(key(d) for d in output_docs(tmp_path / "d" / "corpus_shuffled")) == \
        collections.Counter(key(d) for d in records * 3)


# ----------------------------------------------------------------------------- 9. shuffle quality


def shuffled_positions(out: Path, name: str) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    """Document number -> its index g in the shuffled order, and -> (chunk, line) for chunk lines.

    The writer deals g round-robin: position p = g // nchunks of chunk g % nchunks, and the first
    val_docs_per_chunk positions of every chunk go to the val file, in order of g.
    """
    marker = json.loads((out / ".done").read_text())
    n, v = marker["nchunks"], marker["val_docs_per_chunk"]
    pos, where = {}, {}
    for g, line in enumerate((out / f"{name}.val.jsonl").read_bytes().splitlines()):
        pos[json.loads(line)["n"]] = g
    for c in range(n):
        for j, line in enumerate((out / f"{name}.chunk.{c:02d}.jsonl").read_bytes().splitlines()):
            doc = json.loads(line)["n"]
            pos[doc], where[doc] = (v + j) * n + c, (c, j)
    return pos, where


def spearman(a: list[int], b: list[int]) -> float:
    """Rank correlation of two permutations of range(len(a))."""
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


# One in-memory bucket; buckets; buckets split again in pass 2 (lines under LINE_OVERHEAD bytes
# make the size estimate low).
@pytest.mark.parametrize("memory,doc_bytes,bucketed,split", [("1", 40, False, False), ("0.002", 250, True, False),
                                                             ("0.0002", 30, True, True)])
def test_shuffle_is_uniform_and_seeded(mod, capsys, tmp_path: Path, monkeypatch, memory: str, doc_bytes: int,
                                       bucketed: bool, split: bool) -> None:
    nfiles, per_file, nchunks = 4, 1000, 4
    ndocs = nfiles * per_file
    src = tmp_path / "src"
    src.mkdir()
    for f in range(nfiles):  # numbered in input order: file by file, line by line
        (src / f"part-{f}.jsonl").write_text("".join(
            json.dumps({"text": f"document {n} ".ljust(doc_bytes - 20, "x"), "n": n}) + "\n"
            for n in range(f * per_file, (f + 1) * per_file)))
    tags = record_shuffle_tags(mod, monkeypatch)

    def prep(seed: int, data: Path) -> tuple[dict[int, int], dict[int, tuple[int, int]], dict]:
        rc, _, err = run(mod, capsys, "corpus", memory, "--src_dir", src, "--data_dir", data, "--seed", seed,
                         "--nchunks", nchunks)
        assert rc == 0, err
        out = data / "corpus_shuffled"
        pos, where = shuffled_positions(out, "corpus")
        assert sorted(pos) == list(range(ndocs)) and sorted(pos.values()) == list(range(ndocs))
        return pos, where, json.loads((out / ".done").read_text())

    pos, where, marker = prep(42, tmp_path / "a")
    assert (marker["nbuckets"] > 1) == bucketed and any("." in t for t in tags) == split, (marker["nbuckets"], tags)
    order = [pos[i] for i in range(ndocs)]
    # No trace of the input order: rank correlation ~ N(0, 1/sqrt(4000) = 0.016).
    assert abs(spearman(list(range(ndocs)), order)) < 0.1
    # Every chunk holds its share of every quarter of the input (~250 documents each, sd ~14).
    quarters = collections.Counter((c, i * 4 // ndocs) for i, (c, _) in where.items())
    expected = len(where) / nchunks / 4
    assert all(abs(quarters[c, q] - expected) < 0.25 * expected for c in range(nchunks) for q in range(4)), quarters
    # Neighbours in the input are not neighbours in the output (expected ~2 pairs of 3999).
    kept = sum(abs(order[i + 1] - order[i]) == 1 for i in range(ndocs - 1))
    same_file = [i for i in range(ndocs - 1) if i in where and i + 1 in where and where[i][0] == where[i + 1][0]]
    kept_in_file = sum(abs(where[i + 1][1] - where[i][1]) == 1 for i in same_file)
    assert kept / (ndocs - 1) < 0.005 and kept_in_file / (ndocs - 1) < 0.005, (kept, kept_in_file)

    again, _, _ = prep(42, tmp_path / "b")
    assert again == pos
    other, _, _ = prep(7, tmp_path / "c")
    assert other != pos
    assert abs(spearman(order, [other[i] for i in range(ndocs)])) < 0.1
