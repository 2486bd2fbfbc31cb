"""data.root_dir as an fsspec URL: the same files read through `memory://` or `file://` give
the same batches and the same state as the plain path, resume exactly mid-stream, and a URL that
cannot be read stops the run naming data.root_dir before any batch.

The chunks are written by tests/test_data.py's helpers into tmp_path, then copied into fsspec's
in-memory filesystem under a name of this test's own (that filesystem is one per process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import fsspec
import pytest

from lingua.data import (
    CHUNK_GLOB,
    VAL_GLOB,
    DataArgs,
    DataError,
    PackedBatches,
    build_data_loader,
    read_documents,
    share_imbalance,
    source_files,
)
from tests.test_data import assert_same_batches, make_args, multi_source, run_resume, take, write_source


@pytest.fixture
def memory_url(tmp_path: Path):
    """A function copying a local directory into memory:// and returning its URL; removed after."""
    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}"

    def copy(local: Path) -> str:
        for f in sorted(local.rglob("*")):
            if f.is_file():
                fs.pipe(f"{root}/{f.relative_to(local).as_posix()}", f.read_bytes())
        return f"memory://{tmp_path.name}"

    yield copy
    if fs.exists(root):
        fs.rm(root, recursive=True)


def with_root(args: DataArgs, root: str) -> DataArgs:
    return dataclasses.replace(args, root_dir=root)


def test_memory_url_lists_the_same_files(tmp_path: Path, memory_url) -> None:
    args = multi_source(tmp_path / "data")
    args.sources["uneven"] = 1.0
    (tmp_path / "data" / "web" / "web.val.jsonl").write_text('{"text": "v"}\n')
    for i, n_docs in enumerate([1, 6]):  # whole chunks of unequal size per rank: unequal shares
        write_source(tmp_path / "data", "uneven", 1, n_docs)
        (tmp_path / "data" / "uneven" / "uneven.chunk.00.jsonl").rename(
            tmp_path / "data" / "uneven" / f"uneven.chunk.1{i}.jsonl")
    url = memory_url(tmp_path / "data")
    plain = source_files(args)
    listed = source_files(with_root(args, url))
    assert {n: [f.rsplit("/", 1)[1] for f in fs] for n, fs in listed.items()} == {
        n: [f.name for f in fs] for n, fs in plain.items()}
    assert listed["web"][0] == f"{url}/web/web.chunk.00.jsonl"  # the URL as written, with the tail appended
    assert all(share_imbalance(listed[n], 2) == share_imbalance(plain[n], 2) for n in plain)
    assert share_imbalance(listed["uneven"], 2) > 3  # sizes really read through the URL


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_memory_url_gives_the_plain_path_batches_and_states(tmp_path: Path, memory_url, world_size, rank) -> None:
    args = multi_source(tmp_path)
    url = memory_url(tmp_path)
    plain = PackedBatches(args, rank, world_size)
    memory = PackedBatches(with_root(args, url), rank, world_size)
    for _ in range(4):  # several buffers, wrapping the small sources' epochs
        assert_same_batches(take(memory, 3), take(plain, 3))
        assert memory.state_dict() == plain.state_dict()


@pytest.mark.parametrize("k", [1, 4])  # inside the first buffer, inside the second (prefetch_size=3)
def test_memory_url_resumes_exactly_mid_stream(tmp_path: Path, memory_url, k: int) -> None:
    plain_args = multi_source(tmp_path)
    args = with_root(plain_args, memory_url(tmp_path))
    head, tail, again, _ = run_resume(args, k, 8)
    assert_same_batches(again, tail)
    uninterrupted = take(PackedBatches(plain_args), k + 8)
    assert_same_batches(head + tail, uninterrupted)
    # The state names files only, so one saved reading the plain path resumes reading the URL.
    loader = PackedBatches(plain_args)
    take(loader, k)
    resumed = build_data_loader(args, state=json.loads(json.dumps(loader.state_dict())))
    assert_same_batches(take(resumed, 8), uninterrupted[k:])


def test_file_url_through_the_async_loader_resumes_exactly(tmp_path: Path) -> None:
    plain_args = multi_source(tmp_path)
    args = with_root(plain_args, f"file://{tmp_path}")
    args.load_async = True  # the child opens the URL itself
    head, tail, again, _ = run_resume(args, 4, 6, rank=1, world_size=2)
    assert_same_batches(again, tail)
    assert_same_batches(head + tail, take(PackedBatches(plain_args, 1, 2), 10))


def test_memory_url_with_load_async_reads_in_this_process(
    tmp_path: Path, memory_url, caplog: pytest.LogCaptureFixture
) -> None:
    """A spawned child would see an empty memory:// filesystem (a forked one a frozen copy)."""
    plain_args = multi_source(tmp_path)
    args = with_root(plain_args, memory_url(tmp_path))
    args.load_async = True
    with caplog.at_level(logging.WARNING, logger="lingua.data"):
        loader = build_data_loader(args, start_method="spawn")
    try:
        assert_same_batches(take(loader, 5), take(PackedBatches(plain_args), 5))
    finally:
        loader.close()
    assert any("data.load_async is ignored" in r.getMessage() for r in caplog.records)


def test_unreadable_urls_name_data_root_dir(tmp_path: Path, memory_url) -> None:
    write_source(tmp_path, "web", 1, 2)
    url = memory_url(tmp_path)

    def error(root: str, sources: dict | None = None) -> str:
        with pytest.raises(DataError) as info:
            build_data_loader(with_root(make_args(tmp_path, sources or {"web": 1.0}), root))
        return str(info.value)

    msg = error("nosuchproto://bucket/data")
    assert "data.root_dir 'nosuchproto://bucket/data'" in msg and "nosuchproto" in msg.split("fsspec:")[1]
    for missing in (f"memory://{tmp_path.name}-missing", f"file://{tmp_path}/missing"):
        msg = error(missing)
        assert f"data.root_dir '{missing}' does not exist" in msg
    msg = error(url, {"web": 1.0, "nosuch": 1.0})
    assert "data.sources.nosuch" in msg and f"{url}/nosuch" in msg and CHUNK_GLOB in msg


def test_validation_documents_read_through_a_url(tmp_path: Path, memory_url) -> None:
    write_source(tmp_path, "web", 1, 2)
    val = tmp_path / "web" / "web.val.jsonl"
    val.write_text('{"text": "first"}\n\n{"title": "T", "body": "B"}\n')
    url = memory_url(tmp_path)
    [listed] = source_files(with_root(make_args(tmp_path, {"web": 1.0}), url), pattern=VAL_GLOB)["web"]
    assert list(read_documents(listed, skip_bad_lines=True)) == list(read_documents(val, skip_bad_lines=True))
    assert list(read_documents(listed, text_field=["title", "body"], separator=" | ", skip_bad_lines=True)) == [
        [("T | B", True)]]
    with pytest.raises(DataError, match=f"{listed}:1: no field 'title'"):
        list(read_documents(listed, text_field=["title"]))
