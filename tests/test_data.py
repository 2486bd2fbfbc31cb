"""Tests for lingua/data.py: every file and line read exactly once across ranks and every
document at the same rate on every rank, packing that loses or duplicates no token, weighted
sources, bit-exact resume (sync and async, and with another buffer geometry), bad lines named
by file and line, config errors named by key, an async loader child that neither outlives its
trainer nor dies of the signals the trainer handles, data.text_field (the fields that make a
pretraining text) and data.num_samples (the first documents only, split over the ranks).

All data is JSONL written here into tmp_path; the tokenizer is the real bytes tokenizer.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import failure_report

from lingua.data import (
    CHUNK_GLOB,
    AsyncBatches,
    DataArgs,
    DataError,
    JSONLReader,
    PackedBatches,
    TokenStream,
    assign_files,
    build_data_loader,
    source_files,
)
from lingua.tokenizer import ByteTokenizer, TokenizerArgs

TOK = ByteTokenizer()


# ---------------------------------------------------------------- helpers


def doc_text(source: str, file_idx: int, doc_idx: int) -> str:
    # Lengths vary from a few bytes to several windows; non-ASCII bytes included.
    filler = "xyzé" * ((doc_idx * 7 + file_idx * 3) % 11)
    return f"{source}/{file_idx}/{doc_idx}:{filler}."


def write_source(
    root: Path, name: str, n_files: int, docs_per_file: int, blank_every: int = 0
) -> list[list[str]]:
    """Write `name`'s chunk files; returns the documents of each file in order."""
    (root / name).mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n_files):
        docs = [doc_text(name, i, j) for j in range(docs_per_file)]
        lines = []
        for j, d in enumerate(docs):
            lines.append(json.dumps({"text": d, "id": j}))
            if blank_every and j % blank_every == 0:
                lines.append("")  # blank lines are skipped, not errors
        (root / name / f"{name}.chunk.{i:02d}.jsonl").write_text("\n".join(lines) + "\n")
        out.append(docs)
    return out


def make_args(root: Path, sources: dict[str, float], **kw) -> DataArgs:
    defaults = dict(batch_size=2, seq_len=16, prefetch_size=3, load_async=False, seed=7)
    defaults.update(kw)
    return DataArgs(root_dir=str(root), sources=sources, tokenizer=TokenizerArgs(name="bytes"), **defaults)


def read_one_epoch(reader: JSONLReader) -> list[str]:
    docs = []
    while True:
        [(text, _)] = next(reader)  # pretraining documents are one trained segment
        if reader.epoch > 0:  # this document already belongs to the second epoch
            return docs
        docs.append(text)


def take(loader, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [tuple(np.array(a, copy=True) for a in next(loader)) for _ in range(n)]


def windows_of(batches: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, ...]]:
    """Each row's n+1 tokens: the input then the last label."""
    return [tuple(np.concatenate([x, y[-1:]]).tolist()) for xb, yb in batches for x, y in zip(xb, yb)]


# ---------------------------------------------------------------- source_files / config errors


def test_source_files_sorted_and_filtered(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 3, 2)
    (tmp_path / "web" / "web.val.jsonl").write_text('{"text": "v"}\n')
    (tmp_path / "web" / "notes.txt").write_text("x")
    files = source_files(make_args(tmp_path, {"web": 1.0}))
    assert [f.name for f in files["web"]] == [f"web.chunk.{i:02d}.jsonl" for i in range(3)]


@pytest.mark.parametrize("load_async", [False, True])
def test_config_errors_name_the_key(tmp_path: Path, load_async: bool) -> None:
    write_source(tmp_path, "web", 1, 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "data.jsonl").write_text('{"text": "not a chunk name"}\n')

    def error(args: DataArgs) -> str:
        with pytest.raises(DataError) as info:
            build_data_loader(args)
        return str(info.value)

    kw = dict(load_async=load_async)
    assert "data.root_dir" in error(DataArgs(sources={"web": 1.0}, **kw))
    missing_root = tmp_path / "no_such_dir"
    msg = error(make_args(missing_root, {"web": 1.0}, **kw))
    assert "data.root_dir" in msg and str(missing_root) in msg
    msg = error(make_args(tmp_path, {"web": 1.0, "nosuch": 1.0}, **kw))
    assert "data.sources.nosuch" in msg and str(tmp_path / "nosuch") in msg
    msg = error(make_args(tmp_path, {"web": 1.0, "empty": 1.0}, **kw))
    assert "data.sources.empty" in msg
    msg = error(make_args(tmp_path, {"wrong": 1.0}, **kw))
    assert "data.sources.wrong" in msg and CHUNK_GLOB in msg
    assert "data.sources" in error(make_args(tmp_path, {}, **kw))
    assert "data.sources.web" in error(make_args(tmp_path, {"web": 0.0}, **kw))
    assert "data.n_views" in error(make_args(tmp_path, {"web": 1.0}, n_views=3, **kw))


# ---------------------------------------------------------------- assign_files: every line once


@pytest.mark.parametrize(
    "n_files, world_size",
    [(1, 1), (4, 2), (5, 3), (6, 6), (7, 3), (1, 2), (2, 5), (3, 5), (3, 8)],
)
def test_every_line_read_exactly_once_across_ranks(tmp_path: Path, n_files: int, world_size: int) -> None:
    per_file = write_source(tmp_path, "web", n_files, 9, blank_every=4)
    files = sorted((tmp_path / "web").glob(CHUNK_GLOB))
    expected = collections.Counter(d for docs in per_file for d in docs)

    seen: collections.Counter = collections.Counter()
    for rank in range(world_size):
        assignment = assign_files(files, rank, world_size)
        assert assignment, f"rank {rank} got nothing"
        docs = read_one_epoch(JSONLReader(assignment))
        assert docs, f"rank {rank} read nothing"
        seen.update(docs)
        if n_files % world_size == 0:
            # Whole files per rank, round-robin.
            assert all(stride == 1 and offset == 0 for _, stride, offset in assignment)
            assert [p for p, _, _ in assignment] == [str(f) for i, f in enumerate(files) if i % world_size == rank]
    assert seen == expected  # every document once: none dropped, none duplicated


def test_ranks_sharing_a_file_get_balanced_shares(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 2, 30)
    files = sorted((tmp_path / "web").glob(CHUNK_GLOB))
    counts = [len(read_one_epoch(JSONLReader(assign_files(files, r, 5)))) for r in range(5)]
    assert sum(counts) == 60
    assert max(counts) - min(counts) <= 6  # 30 lines over 3 ranks (10) or 2 ranks (15)


def test_reader_resumes_mid_file_and_mid_epoch(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 3, 5, blank_every=2)
    files = sorted((tmp_path / "web").glob(CHUNK_GLOB))
    a = JSONLReader(assign_files(files, 0, 1))
    first = [next(a) for _ in range(7)]
    state = json.loads(json.dumps(a.state()))
    rest = [next(a) for _ in range(20)]  # crosses into the next epoch
    b = JSONLReader(assign_files(files, 0, 1))
    b.load(state)
    assert [next(b) for _ in range(20)] == rest
    assert first[0] == rest[8]  # 15 docs per epoch
    # States written before the share and the epoch's document count were saved resume too.
    c = JSONLReader(assign_files(files, 0, 1))
    c.load({k: v for k, v in state.items() if k not in ("share", "docs")})
    assert [next(c) for _ in range(20)] == rest


# ---------------------------------------------------------------- packing


def expected_stream(per_file: list[list[str]], add_bos: bool, add_eos: bool, epochs: int) -> list[int]:
    out: list[int] = []
    for _ in range(epochs):
        for docs in per_file:
            for d in docs:
                out.extend(TOK.encode(d, add_bos=add_bos, add_eos=add_eos))
    return out


@pytest.mark.parametrize("add_bos, add_eos", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("seq_len", [5, 16, 64])
def test_windows_reproduce_the_token_stream(tmp_path: Path, add_bos: bool, add_eos: bool, seq_len: int) -> None:
    per_file = write_source(tmp_path, "web", 2, 6, blank_every=3)
    files = sorted((tmp_path / "web").glob(CHUNK_GLOB))
    stream = TokenStream(JSONLReader(assign_files(files, 0, 1)), TOK, add_bos, add_eos)
    expected = expected_stream(per_file, add_bos, add_eos, epochs=4)
    n_windows = (len(expected) - 1) // seq_len - 2
    windows = [stream.window(seq_len) for _ in range(n_windows)]
    assert all(mask.all() for _, mask in windows)  # pretraining text: every token is a label
    windows = [tokens for tokens, _ in windows]
    assert all(w.shape == (seq_len + 1,) and w.dtype == np.int64 for w in windows)
    for a, b in zip(windows, windows[1:]):
        assert a[-1] == b[0]  # overlap by exactly one token: every token is a label once
    rebuilt = [t for w in windows for t in w[:-1].tolist()] + [int(windows[-1][-1])]
    assert rebuilt == expected[: len(rebuilt)]
    assert len(rebuilt) == n_windows * seq_len + 1
    n_bos = rebuilt.count(TOK.bos_id)
    n_eos = rebuilt.count(TOK.eos_id)
    assert (n_bos > 0) == add_bos and (n_eos > 0) == add_eos


def test_packed_batches_are_shuffled_windows_of_the_stream(tmp_path: Path) -> None:
    per_file = write_source(tmp_path, "web", 2, 7)
    args = make_args(tmp_path, {"web": 1.0}, batch_size=3, seq_len=12, prefetch_size=4)
    loader = PackedBatches(args)
    per_buffer = args.batch_size * args.prefetch_size
    batches = take(loader, 3 * args.prefetch_size)
    for x, y in batches:
        assert x.shape == y.shape == (3, 12) and x.dtype == y.dtype == np.int64
        assert np.array_equal(y[:, :-1], x[:, 1:])  # labels are inputs shifted by one
    got = windows_of(batches)
    expected = expected_stream(per_file, True, True, epochs=6)
    ref = [tuple(expected[i * 12 : i * 12 + 13]) for i in range(len(got))]
    for b in range(3):
        chunk = slice(b * per_buffer, (b + 1) * per_buffer)
        # Each buffer holds exactly the next consecutive windows, in shuffled order.
        assert sorted(got[chunk]) == sorted(ref[chunk])
    assert got != ref  # and the order really is shuffled
    assert loader.n_tokens_read() >= len(got) * 12


# ---------------------------------------------------------------- weighted sources


def test_weighted_sources_follow_weights(tmp_path: Path) -> None:
    root = tmp_path
    weights = {"aaa": 1.0, "bbb": 2.0, "ccc": 5.0}
    for name in weights:
        (root / name).mkdir()
        lines = [json.dumps({"text": name[0] * (5 + i % 13)}) for i in range(40)]
        (root / name / f"{name}.chunk.00.jsonl").write_text("\n".join(lines) + "\n")
    args = make_args(root, weights, batch_size=8, seq_len=8, prefetch_size=16)
    loader = PackedBatches(args)
    counts = collections.Counter()
    for window in windows_of(take(loader, 160)):  # 1280 windows
        letters = {t for t in window if t < 256}
        assert len(letters) == 1, "a window mixes sources"
        counts[chr(letters.pop())] += 1
    total = sum(counts.values())
    for name, w in weights.items():
        assert counts[name[0]] / total == pytest.approx(w / sum(weights.values()), abs=0.04), counts


# ---------------------------------------------------------------- exact resume


def multi_source(tmp_path: Path) -> DataArgs:
    write_source(tmp_path, "web", 3, 5, blank_every=3)
    write_source(tmp_path, "code", 1, 4)
    write_source(tmp_path, "books", 2, 3)
    return make_args(tmp_path, {"web": 2.0, "code": 1.0, "books": 0.5}, batch_size=2, seq_len=16, prefetch_size=3)


def run_resume(args: DataArgs, k: int, n: int, rank: int = 0, world_size: int = 1):
    loader = build_data_loader(args, rank, world_size)
    try:
        head = take(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))  # as train_state_*.json holds it
        tail = take(loader, n)
    finally:
        loader.close()
    resumed = build_data_loader(args, rank, world_size, state=state)
    try:
        again = take(resumed, n)
        state_after = json.loads(json.dumps(resumed.state_dict()))
    finally:
        resumed.close()
    return head, tail, again, state_after


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(a, b)):
        assert xa.dtype == xb.dtype and xa.shape == xb.shape, i
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb), f"batch {i} differs"


# prefetch_size=3: k=3 and k=6 sit on buffer boundaries, the others inside a buffer.
@pytest.mark.parametrize("k", [0, 1, 3, 4, 6, 8])
def test_exact_resume_sync(tmp_path: Path, k: int) -> None:
    args = multi_source(tmp_path)
    n = 10  # spans several buffers and wraps the small sources' epochs
    head, tail, again, _ = run_resume(args, k, n)
    assert_same_batches(again, tail)
    # Also equal to an uninterrupted run.
    full = take(PackedBatches(args), k + n)
    assert_same_batches(full[:k], head)
    assert_same_batches(full[k:], tail)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_exact_resume_async(tmp_path: Path, k: int) -> None:
    args = multi_source(tmp_path)
    args.load_async = True
    n = 8
    head, tail, again, state_after = run_resume(args, k, n)
    assert_same_batches(again, tail)
    # The child runs the same pipeline: async batches equal the sync ones.
    sync = PackedBatches(multi_source(tmp_path))
    full = take(sync, k + n)
    assert_same_batches(full[:k], head)
    assert_same_batches(full[k:], tail)
    # And the async state after the resumed batches is the sync state at the same point.
    assert state_after == json.loads(json.dumps(sync.state_dict()))


def test_async_state_before_any_batch_resumes_from_start(tmp_path: Path) -> None:
    args = multi_source(tmp_path)
    args.load_async = True
    loader = build_data_loader(args)
    try:
        state = json.loads(json.dumps(loader.state_dict()))
        first = take(loader, 4)
    finally:
        loader.close()
    resumed = build_data_loader(args, state=state)
    try:
        assert_same_batches(take(resumed, 4), first)
    finally:
        resumed.close()


def test_exact_resume_other_rank(tmp_path: Path) -> None:
    args = multi_source(tmp_path)
    _, tail, again, _ = run_resume(args, 4, 6, rank=1, world_size=2)
    assert_same_batches(again, tail)
    rank0 = take(PackedBatches(args, 0, 2), 10)
    rank1 = take(PackedBatches(args, 1, 2), 10)
    assert windows_of(rank0) != windows_of(rank1)


def test_resume_rejects_state_with_other_sources(tmp_path: Path) -> None:
    args = multi_source(tmp_path)
    loader = PackedBatches(args)
    take(loader, 2)
    state = loader.state_dict()
    del args.sources["books"]
    with pytest.raises(DataError, match="sources"):
        build_data_loader(args, state=state)


# ---------------------------------------------------------------- bad lines


def write_bad_source(root: Path) -> tuple[Path, Path]:
    """web/00: malformed JSON on line 3; web/01: no `text` on line 2 (1-based)."""
    d = root / "web"
    d.mkdir(parents=True)
    f0 = d / "web.chunk.00.jsonl"
    f0.write_text(
        "\n".join([json.dumps({"text": "good zero " * 3}), json.dumps({"text": "good one"}), '{"text": "broken',
                   json.dumps({"text": "good three"})]) + "\n"
    )
    f1 = d / "web.chunk.01.jsonl"
    f1.write_text(
        "\n".join([json.dumps({"text": "good four"}), json.dumps({"content": "no text field"}),
                   json.dumps({"text": "good six"})]) + "\n"
    )
    return f0, f1


def drain_until_error(loader, limit: int = 200) -> str:
    with pytest.raises(DataError) as info:
        for _ in range(limit):
            next(loader)
    return str(info.value)


@pytest.mark.parametrize("load_async", [False, True])
def test_malformed_json_names_file_and_line(tmp_path: Path, load_async: bool) -> None:
    f0, _ = write_bad_source(tmp_path)
    args = make_args(tmp_path, {"web": 1.0}, batch_size=1, seq_len=4, prefetch_size=1, load_async=load_async)
    loader = build_data_loader(args)
    try:
        msg = drain_until_error(loader)
    finally:
        loader.close()
    assert f"{f0}:3" in msg and "JSON" in msg


@pytest.mark.parametrize("load_async", [False, True])
def test_line_without_text_names_file_and_line(tmp_path: Path, load_async: bool) -> None:
    _, f1 = write_bad_source(tmp_path)
    # Give web/00 its own rank (2 files, 2 ranks): rank 1 reads only web/01.
    args = make_args(tmp_path, {"web": 1.0}, batch_size=1, seq_len=4, prefetch_size=1, load_async=load_async)
    loader = build_data_loader(args, rank=1, world_size=2)
    try:
        msg = drain_until_error(loader)
    finally:
        loader.close()
    assert f"{f1}:2" in msg and "'text'" in msg


@pytest.mark.parametrize("line", ['{"text": 5}', "[1, 2]", '"just a string"', "not json at all"])
def test_other_bad_lines_name_line(tmp_path: Path, line: str) -> None:
    d = tmp_path / "web"
    d.mkdir()
    f = d / "web.chunk.00.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n\n" + line + "\n")
    reader = JSONLReader(assign_files([f], 0, 1))
    assert next(reader) == [("ok", True)]
    with pytest.raises(DataError, match=f"{f}:3"):
        next(reader)


def test_skip_bad_lines_continues_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f0, f1 = write_bad_source(tmp_path)
    reader = JSONLReader(assign_files([f0, f1], 0, 1), skip_bad_lines=True)
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        docs = read_one_epoch(reader)
    assert docs == ["good zero " * 3, "good one", "good three", "good four", "good six"]
    assert reader.skipped == 2
    assert any("skipped" in r.getMessage() and "on_bad_line" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("load_async", [False, True])
def test_on_bad_line_skip_in_loader(tmp_path: Path, load_async: bool) -> None:
    write_bad_source(tmp_path)
    args = make_args(tmp_path, {"web": 1.0}, batch_size=2, seq_len=32, prefetch_size=2,
                     load_async=load_async, on_bad_line="skip")
    loader = build_data_loader(args)
    try:
        batches = take(loader, 30)  # several epochs over the good lines
    finally:
        loader.close()
    windows = [bytes(t for t in w if t < 256) for w in windows_of(batches)]  # each one contiguous text
    for good in (b"good one", b"good three", b"good four", b"good six"):
        assert any(good in w for w in windows), good
    assert not any(b"broken" in w or b"no text" in w or b"content" in w for w in windows)


def test_source_of_only_blank_or_bad_lines_errors(tmp_path: Path) -> None:
    d = tmp_path / "web"
    d.mkdir()
    f = d / "web.chunk.00.jsonl"
    f.write_text('\n{"bad": 1}\n\n')
    reader = JSONLReader(assign_files([f], 0, 1), skip_bad_lines=True)
    with pytest.raises(DataError, match="no documents"):
        next(reader)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_async_loader_child_exits_when_the_trainer_is_killed(tmp_path: Path, method: str) -> None:
    """A SIGKILLed trainer cannot stop its loader; the child must notice and exit."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    root = tmp_path / "data"
    (root / "s").mkdir(parents=True)
    with open(root / "s" / "s.chunk.00.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"document {i} " * 20}) + "\n")
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from lingua.data import AsyncBatches, DataArgs, build_data_loader
        args = DataArgs(root_dir={str(root)!r}, sources={{"s": 1.0}}, batch_size=2, seq_len=16, prefetch_size=2,
                        load_async=True)
        method = {method!r}
        loader = build_data_loader(args) if method == "fork" else AsyncBatches(args, 0, 1, None, start_method=method)
        next(loader)
        print(loader.process.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:  # gone, or a zombie nobody reaps (state Z): either way it stopped running
            if Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the data loader process outlived its killed trainer")


# ---------------------------------------------------------------- signals reach the loader child too

SIGNAL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from lingua.data import AsyncBatches, DataArgs, build_data_loader
from lingua.distributed import PreemptionSignal
from lingua.tokenizer import TokenizerArgs

args = DataArgs(root_dir={root!r}, sources={{"s": 1.0}}, batch_size=2, seq_len=16, prefetch_size=2,
                load_async=True, tokenizer=TokenizerArgs(name="bytes"))
method = {method!r}
loader = build_data_loader(args) if method == "fork" else AsyncBatches(args, 0, 1, None, start_method=method)
next(loader)
# As in the training loop: the handler is installed after the loader's child exists.
caught = PreemptionSignal(signal.{signal})
os.killpg(os.getpgid(0), signal.{signal})  # SLURM signals every process of the step
batches = [next(loader) for _ in range(3 * 8)]  # far more than the child's queue holds (8)
assert all(x.shape == (2, 16) and y.shape == (2, 16) for x, y in batches)
assert caught.requested and loader.process.is_alive()
loader.close()
print("batches after the signal:", len(batches))
"""


@pytest.mark.parametrize("signal_name, method", [("SIGUSR2", "fork"), ("SIGINT", "fork"), ("SIGUSR2", "spawn")])
def test_async_loader_child_survives_a_signal_to_the_process_group(
    tmp_path: Path, signal_name: str, method: str
) -> None:
    """SLURM sends USR2 to every process of the step before a preemption; the trainer saves and
    requeues, so the loader child must keep producing batches rather than die."""
    import subprocess
    import sys

    root = tmp_path / "data"
    (root / "s").mkdir(parents=True)
    (root / "s" / "s.chunk.00.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(20)))
    script = SIGNAL_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1]), root=str(root), method=method,
                                  signal=signal_name)
    # Its own process group, so the signal reaches the script and its children but not pytest.
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    assert res.returncode == 0, failure_report(res)
    assert "batches after the signal: 24" in res.stdout
    assert "died unexpectedly" not in res.stderr  # nor did spawn's resource tracker


def test_async_loader_refuses_forkserver(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 1, 3)
    with pytest.raises(ValueError, match="forkserver"):
        AsyncBatches(make_args(tmp_path, {"web": 1.0}, load_async=True), 0, 1, None, start_method="forkserver")


# ---------------------------------------------------------------- assign_files: equal visit rates


def write_numbered_chunks(root: Path, lengths: list[int]) -> list[Path]:
    """One chunk per length; document `c/j` is line j of chunk c."""
    (root / "web").mkdir(parents=True, exist_ok=True)
    for c, n in enumerate(lengths):
        text = "".join(json.dumps({"text": f"{c}/{j}"}) + "\n" for j in range(n))
        (root / "web" / f"web.chunk.{c:02d}.jsonl").write_text(text)
    return sorted((root / "web").glob(CHUNK_GLOB))


def visits_per_document(files: list[Path], world_size: int, epochs: int) -> collections.Counter:
    """Every rank reads the same number of documents (ranks consume at one rate), enough for
    `epochs` passes over an equal share; counts how often each document was read."""
    n_lines = sum(sum(1 for _ in open(f, "rb")) for f in files)
    per_rank = epochs * -(-n_lines // world_size)
    visits: collections.Counter = collections.Counter()
    for rank in range(world_size):
        reader = JSONLReader(assign_files(files, rank, world_size))
        for _ in range(per_rank):
            [(text, _)] = next(reader)
            visits[text] += 1
    return visits


UNEQUAL = [150, 90, 210, 120, 180, 60, 135]


@pytest.mark.parametrize("lengths, world_size", [
    pytest.param([30] * 32, 12, id="32x30-12ranks"),  # neither divides the other
    pytest.param([30] * 32, 24, id="32x30-24ranks"),
    pytest.param([30] * 32, 48, id="32x30-48ranks"),
    pytest.param([31] * 32, 12, id="32x31-12ranks"),  # lines not a multiple of the ranks sharing a chunk
    pytest.param([30] * 32, 8, id="32x30-8ranks"),  # one divides the other
    pytest.param([30] * 4, 12, id="4x30-12ranks"),
    pytest.param(UNEQUAL, 3, id="unequal7-3ranks"),  # unequal chunks, count coprime with the world size
    pytest.param(UNEQUAL, 12, id="unequal7-12ranks"),
])
def test_every_document_is_visited_at_the_same_rate(tmp_path: Path, lengths: list[int], world_size: int) -> None:
    files = write_numbered_chunks(tmp_path, lengths)
    # 40 epochs: a partial last epoch then shifts the measured rates by at most 1/40.
    visits = visits_per_document(files, world_size, epochs=40)
    assert len(visits) == sum(lengths)  # every document read
    rate = max(visits.values()) / min(visits.values())
    assert rate <= 1.1, f"max/min visits {rate:.2f}: {max(visits.values())} vs {min(visits.values())}"


def test_unequal_shares_are_warned_about_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whole chunks per rank with chunks of unequal size: shares differ, and the run says so."""
    write_numbered_chunks(tmp_path, [10, 30])
    args = make_args(tmp_path, {"web": 1.0})
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        build_data_loader(args, 1, 2)
        assert not caplog.records  # rank 0 speaks for all ranks
        build_data_loader(args, 0, 2)
    [msg] = [r.getMessage() for r in caplog.records]
    assert "data.sources.web" in msg and "2 ranks" in msg and "2 chunks" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        build_data_loader(args, 0, 3)  # coprime: every rank reads a third of each chunk
    assert not caplog.records


def test_strided_reader_resumes_identically(tmp_path: Path) -> None:
    files = write_numbered_chunks(tmp_path, [31] * 32)
    a = JSONLReader(assign_files(files, 5, 12))
    [next(a) for _ in range(50)]
    state = json.loads(json.dumps(a.state()))
    rest = [next(a) for _ in range(300)]  # several epochs of this rank's ~83 documents
    b = JSONLReader(assign_files(files, 5, 12))
    b.load(state)
    assert [next(b) for _ in range(300)] == rest


def test_reader_state_of_another_share_is_refused(tmp_path: Path) -> None:
    files = write_numbered_chunks(tmp_path, [10] * 6)
    a = JSONLReader(assign_files(files, 0, 4))
    next(a)
    state = a.state()
    with pytest.raises(DataError, match="chunk"):
        JSONLReader(assign_files(files[:5], 0, 4)).load(state)  # a chunk file went away


# ---------------------------------------------------------------- resume with another buffer geometry


def stream_windows(per_file: list[list[str]], seq_len: int, n: int) -> list[tuple[int, ...]]:
    """The first n windows of n+1 tokens that one rank's single source yields, in stream order."""
    tokens = expected_stream(per_file, True, True, epochs=1 + n * seq_len // len(expected_stream(per_file, True, True, 1)))
    return [tuple(tokens[i * seq_len : i * seq_len + seq_len + 1]) for i in range(n)]


@pytest.mark.parametrize("load_async", [False, True])
@pytest.mark.parametrize("k", [1, 3])  # batches taken from the saved 4-batch buffer
@pytest.mark.parametrize("new_prefetch", [2, 6])
def test_resume_with_other_prefetch_size_continues_the_stream(
    tmp_path: Path, new_prefetch: int, k: int, load_async: bool
) -> None:
    per_file = write_source(tmp_path, "web", 2, 7)
    args = make_args(tmp_path, {"web": 1.0}, batch_size=2, seq_len=12, prefetch_size=4)
    loader = PackedBatches(args)
    head = take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))
    tail = take(loader, 4 - k)
    resumed = build_data_loader(make_args(tmp_path, {"web": 1.0}, batch_size=2, seq_len=12,
                                          prefetch_size=new_prefetch, load_async=load_async), state=state)
    try:
        again = take(resumed, 4 - k + 3 * new_prefetch)  # the saved buffer's rest, then 3 new buffers
    finally:
        resumed.close()
    for x, y in again:
        assert x.shape == y.shape == (2, 12)
    # The saved buffer ends as it would have without the restart...
    assert_same_batches(again[: 4 - k], tail)
    # ...and, over whole buffers, no window is lost or repeated.
    got = windows_of(head + again)
    assert sorted(got) == sorted(stream_windows(per_file, 12, len(got)))


@pytest.mark.parametrize("change, dropped", [({"batch_size": 4}, 2), ({"seq_len": 8}, 6), ({"batch_size": 3}, 0)])
def test_resume_with_other_batch_shape_yields_full_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict, dropped: int
) -> None:
    write_source(tmp_path, "web", 2, 7)
    saved = dict(batch_size=2, seq_len=12, prefetch_size=4)
    loader = PackedBatches(make_args(tmp_path, {"web": 1.0}, **saved))
    take(loader, 1)  # 6 of the buffer's 8 windows are still to come
    state = json.loads(json.dumps(loader.state_dict()))
    rest_of_buffer = windows_of(take(loader, 3))
    args = make_args(tmp_path, {"web": 1.0}, **{**saved, **change})
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        resumed = build_data_loader(args, state=state)
        batches = take(resumed, 10)
    for x, y in batches:
        assert x.shape == y.shape == (args.batch_size, args.seq_len)
        assert np.array_equal(y[:, :-1], x[:, 1:])
    if args.seq_len == saved["seq_len"]:  # the saved buffer's windows come first, in its order
        kept = len(rest_of_buffer) - dropped
        assert windows_of(batches)[:kept] == rest_of_buffer[:kept]
    warnings = [r.getMessage() for r in caplog.records if "data.batch_size" in r.getMessage()]
    if dropped:
        assert len(warnings) == 1 and f"{dropped} windows" in warnings[0], warnings
    else:
        assert not warnings


def test_state_without_geometry_past_a_smaller_buffer_is_refused(tmp_path: Path) -> None:
    """A state of the older format saved 3 batches into a 4-batch buffer: a 2-batch buffer cannot
    hold its position, and nothing says what it held, so the resume stops naming the setting."""
    write_source(tmp_path, "web", 2, 7)
    loader = PackedBatches(make_args(tmp_path, {"web": 1.0}, batch_size=2, seq_len=12, prefetch_size=4))
    take(loader, 3)
    legacy = {"start": loader.state_dict()["start"], "emitted": 3}
    with pytest.raises(DataError, match=r"data\.prefetch_size"):
        build_data_loader(make_args(tmp_path, {"web": 1.0}, batch_size=2, seq_len=12, prefetch_size=2), state=legacy)


def test_resume_from_a_state_without_geometry(tmp_path: Path) -> None:
    """States written before the geometry was saved: {start, emitted batches of this config}."""
    args = multi_source(tmp_path)
    loader = PackedBatches(args)
    take(loader, 4)
    state = loader.state_dict()
    legacy = {"start": state["start"], "emitted": 1}  # prefetch_size=3: batch 4 is the 2nd buffer's 1st
    tail = take(loader, 5)
    resumed = PackedBatches(args)
    resumed.load_state_dict(json.loads(json.dumps(legacy)))
    assert_same_batches(take(resumed, 5), tail)


# ---------------------------------------------------------------- data.text_field


ALPACA = [{"instruction": f"Do {i}", "input": "x" * (i % 3), "output": f"done {i} " * (1 + i % 4), "id": i}
          for i in range(12)]


def write_records(root: Path, name: str, records: list) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    f = root / name / f"{name}.chunk.00.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f


@pytest.mark.parametrize("fields, separator", [(["instruction", "input", "output"], "\n"), (["output"], "\n"),
                                               (["output", "instruction"], " ## ")])
def test_text_field_joins_the_listed_fields_as_pretraining_text(tmp_path: Path, fields, separator) -> None:
    write_records(tmp_path, "sft", ALPACA)  # input/output records: without text_field a supervised mode
    args = make_args(tmp_path, {"sft": 1.0}, text_field=fields, text_field_separator=separator)
    stream = PackedBatches(args).streams["sft"]
    expected = [t for r in ALPACA for t in TOK.encode(separator.join(r[f] for f in fields), True, True)]
    windows = [stream.window(8) for _ in range((len(expected) - 1) // 8)]
    assert all(mask.all() for _, mask in windows)  # every token trained, as pretraining text
    assert [t for w, _ in windows for t in w[:-1].tolist()] == expected[: len(windows) * 8]


def test_text_field_text_reads_what_the_default_reads(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 2, 6, blank_every=3)
    default, named = (PackedBatches(make_args(tmp_path, {"web": 1.0}, text_field=tf)) for tf in (None, ["text"]))
    assert_same_batches(take(named, 8), take(default, 8))


@pytest.mark.parametrize("load_async", [False, True])
def test_text_field_missing_names_field_file_and_line(tmp_path: Path, load_async: bool) -> None:
    f = write_records(tmp_path, "sft", [ALPACA[0], {"instruction": "I", "output": "O"}, ALPACA[1]])
    args = make_args(tmp_path, {"sft": 1.0}, batch_size=1, seq_len=4, prefetch_size=1, load_async=load_async,
                     text_field=["instruction", "input", "output"])
    loader = build_data_loader(args)
    try:
        msg = drain_until_error(loader)
    finally:
        loader.close()
    assert f"{f}:2: no field 'input'" in msg and "data.text_field" in msg


def test_text_field_bad_records_follow_on_bad_line(tmp_path: Path) -> None:
    f = write_records(tmp_path, "sft", [ALPACA[0], {"instruction": "I", "output": "O"}, '"a string"',
                                        {"instruction": "I", "input": 3, "output": "O"}, ALPACA[1]])
    fields = ["instruction", "input", "output"]
    reader = JSONLReader(assign_files([f], 0, 1), skip_bad_lines=True, text_field=fields)
    assert read_one_epoch(reader) == ["\n".join(r[k] for k in fields) for r in ALPACA[:2]]
    assert reader.skipped == 3
    strict = JSONLReader(assign_files([f], 0, 1), text_field=fields)
    next(strict)
    for line, needle in ((2, "no field 'input'"), (3, "expected a JSON object"),
                         (4, "field 'input' (data.text_field) must be a string")):
        with pytest.raises(DataError, match=re.escape(f"{f}:{line}: {needle}")):
            next(strict)


@pytest.mark.parametrize("override, expected", [
    ("data.text_field=text", ["text"]),
    ("data.text_field=[instruction, input, output]", ["instruction", "input", "output"]),
    ("data.text_field=null", None),
])
def test_text_field_from_the_command_line(override: str, expected) -> None:
    from lingua.args import load_config
    from apps.main.train import TrainArgs

    assert load_config(TrainArgs, [override]).data.text_field == expected


def test_empty_text_field_is_refused(tmp_path: Path) -> None:
    write_source(tmp_path, "web", 1, 2)
    with pytest.raises(DataError, match="data.text_field"):
        source_files(make_args(tmp_path, {"web": 1.0}, text_field=[]))


# ---------------------------------------------------------------- data.num_samples


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_num_samples_reads_that_many_documents_split_over_the_ranks(tmp_path: Path, world_size: int) -> None:
    write_source(tmp_path, "web", 3, 5, blank_every=2)
    files = sorted((tmp_path / "web").glob(CHUNK_GLOB))
    seen = []
    for rank in range(world_size):
        reader = PackedBatches(make_args(tmp_path, {"web": 1.0}, num_samples=6), rank, world_size).streams["web"].reader
        docs = [text for [(text, _)] in (next(reader) for _ in range(3 * 6 // world_size))]
        first = read_one_epoch(JSONLReader(assign_files(files, rank, world_size)))[: 6 // world_size]
        assert docs == 3 * first  # the first documents of this rank's own share, epoch after epoch
        assert reader.epoch == 2
        seen += first
    assert len(seen) == len(set(seen)) == 6


@pytest.mark.parametrize("k", [1, 4, 6])
@pytest.mark.parametrize("load_async", [False, True])
def test_num_samples_resumes_exactly(tmp_path: Path, k: int, load_async: bool) -> None:
    args = multi_source(tmp_path)
    args.num_samples, args.load_async = 5, load_async  # each epoch ends mid-file, inside a buffer
    head, tail, again, _ = run_resume(args, k, 8)
    assert_same_batches(again, tail)
    sync_args = multi_source(tmp_path)
    sync_args.num_samples = 5
    assert_same_batches(head + tail, take(PackedBatches(sync_args), k + 8))


@pytest.mark.parametrize("num_samples", [4, 8, 20])  # inside the first file, the second, more than there are
def test_num_samples_stream_repeats_the_first_documents(tmp_path: Path, num_samples: int) -> None:
    per_file = write_source(tmp_path, "web", 2, 6, blank_every=3)
    stream = PackedBatches(make_args(tmp_path, {"web": 1.0}, num_samples=num_samples)).streams["web"]
    expected = expected_stream([[d for docs in per_file for d in docs][:num_samples]], True, True, epochs=5)
    windows = [stream.window(8) for _ in range((len(expected) - 1) // 8)]
    assert [t for w, _ in windows for t in w[:-1].tolist()] == expected[: len(windows) * 8]


def test_num_samples_errors_and_warning_name_the_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_source(tmp_path, "web", 2, 4)
    for bad in (0, -3):
        with pytest.raises(DataError, match=f"data.num_samples={bad}: must be at least 1"):
            build_data_loader(make_args(tmp_path, {"web": 1.0}, num_samples=bad))
    with pytest.raises(DataError, match="data.num_samples=2 is fewer than the 3 data-parallel ranks"):
        build_data_loader(make_args(tmp_path, {"web": 1.0}, num_samples=2), 1, 3)
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        build_data_loader(make_args(tmp_path, {"web": 1.0}, num_samples=5), 0, 2)
    assert any("data.num_samples=5 over 2 ranks" in r.getMessage() and "4 in all" in r.getMessage()
               for r in caplog.records)
