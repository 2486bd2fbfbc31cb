"""HMT's data (apps/hmt/data.py): local datasets through `datasets` (json, parquet, text and our
prepared layout), windows that hold one document each, exact resume, and the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apps.hmt.data import DocumentBatches, document_windows, load_texts
from lingua.args import ConfigError
from lingua.data import IGNORE_INDEX

pytest.importorskip("datasets")

DOCS = {split: [f"{split} document {i}: " + "words " * (5 + i) for i in range(4)] for split in
        ("train", "validation", "test")}


def go_offline(monkeypatch) -> None:
    """No hub access, also where datasets / huggingface_hub were imported before (they read the
    variables at import): a hub name then fails at once instead of after network timeouts."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module, name in ((datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    go_offline(monkeypatch)


def write_json(d, docs=DOCS):
    d.mkdir(parents=True, exist_ok=True)
    for split, texts in docs.items():
        with open(d / f"{split}.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"id": 1, "text": t}) + "\n")
    return d


@pytest.mark.parametrize("fmt", ["json", "parquet", "text"])
def test_local_datasets_load_by_split(tmp_path, fmt):
    d = tmp_path / fmt
    if fmt == "json":
        write_json(d)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        d.mkdir()
        for split, texts in DOCS.items():
            pq.write_table(pa.table({"text": texts}), d / f"{split}.parquet")
    else:
        d.mkdir()
        for split, texts in DOCS.items():
            (d / f"{split}.txt").write_text("\n".join(texts) + "\n")
    for split in DOCS:
        assert load_texts(fmt, split, data_dir=str(d), cache_dir=str(tmp_path / "cache")) == DOCS[split]
    assert load_texts(fmt, "train", data_dir=str(d), cache_dir=str(tmp_path / "cache"), train_set_split="2") == \
        DOCS["train"][:2]


def test_our_prepared_layout_is_a_json_dataset(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "src.chunk.00.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS["train"]))
    (d / "src.val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS["test"]))
    assert load_texts("json", "train", data_dir=str(d), cache_dir=str(tmp_path / "c")) == DOCS["train"]
    assert load_texts("json", "test", data_dir=str(d), cache_dir=str(tmp_path / "c")) == DOCS["test"]


@pytest.mark.parametrize("case, message", [
    ("no_dir", "is not a directory"), ("empty_dir", "has no train"), ("no_split", "has no validation files"),
    ("hub_missing", "--task_name nobody/no_such_dataset"), ("bad_split", "--train_set_split"),
])
def test_missing_datasets_and_bad_flags_name_the_flag(tmp_path, case, message):
    kwargs = dict(cache_dir=str(tmp_path / "cache"))
    if case == "no_dir":
        call = ("json", "train", dict(data_dir=str(tmp_path / "nope")))
    elif case == "empty_dir":
        (tmp_path / "e").mkdir()
        call = ("json", "train", dict(data_dir=str(tmp_path / "e")))
    elif case == "no_split":
        call = ("json", "validation", dict(data_dir=str(write_json(tmp_path / "d", {"train": ["a b"]}))))
    elif case == "hub_missing":
        call = ("nobody/no_such_dataset", "train", {})
    else:
        call = ("json", "train", dict(data_dir=str(write_json(tmp_path / "d")), train_set_split="half"))
    with pytest.raises(ConfigError, match=message):
        load_texts(call[0], call[1], **call[2], **kwargs)


def test_windows_hold_one_document_and_every_prediction_once():
    docs = [list(range(1, 12)), list(range(100, 104)), [7]]
    rows = document_windows(docs, window=4)
    assert len(rows) == 3 + 1  # 10 predictions -> 4 + 4 + 2; 3 predictions -> one row; 1 token -> none
    predictions = [(int(a), int(b)) for x, y in rows for a, b in zip(x, y) if b != IGNORE_INDEX]
    expected = [(d[i], d[i + 1]) for d in docs for i in range(len(d) - 1)]
    assert predictions == expected
    assert all(set(x[y != IGNORE_INDEX]) <= set(d) for (x, y), d in zip(rows, [docs[0]] * 3 + [docs[1]]))


def test_batches_resume_exactly_and_shuffle_per_epoch():
    rows = document_windows([list(range(i * 10, i * 10 + 9)) for i in range(7)], window=4)
    run = DocumentBatches(rows, batch_size=3, seed=1, shuffle=True)
    seen = [next(run)[0].tolist() for _ in range(5)]
    resumed = DocumentBatches(rows, batch_size=3, seed=1, shuffle=True)
    for i in range(2):
        next(resumed)
    state = resumed.state_dict()
    again = DocumentBatches(rows, batch_size=3, seed=1, shuffle=True)
    again.load_state_dict(state)
    assert [next(again)[0].tolist() for _ in range(3)] == seen[2:]
    fresh = DocumentBatches(rows, batch_size=3, seed=1, shuffle=True)
    epoch0 = fresh.order()
    assert run.epoch == 1  # 14 rows: the fifth batch of 3 began the second epoch
    epoch1 = run.order()
    assert sorted(epoch0) == sorted(epoch1) == list(range(14)) and list(epoch0) != list(epoch1)
    with pytest.raises(ConfigError, match="--batch_size 30"):
        DocumentBatches(rows, batch_size=30)


def test_streaming_reads_the_first_documents_of_a_stream(tmp_path):
    d = write_json(tmp_path / "d")
    assert load_texts("json", "train", data_dir=str(d), cache_dir=str(tmp_path / "c"), limit=2, streaming=True) == \
        DOCS["train"][:2]


def test_dilate_and_interleave():
    from apps.hmt.data import dilated, interleaved

    assert dilated("abcdef", 3, "$") == "abc$$$def"
    a, b = [256, 1, 2, 3, 4, 5], [256, 11, 12, 13, 14, 15]
    (mixed, odd) = interleaved([a, b, [256, 7]], length=2)
    assert mixed == [256, 1, 11, 12, 2, 3, 13, 14, 4, 5, 15]  # two of a, two of b, ...; one BOS
    assert odd == [256, 7]
