"""HMT's data: documents by dataset name through Hugging Face `datasets`, or from local files,
cut into windows that each hold one document's stretch.

    --task_name wikitext --task_config wikitext-103-raw-v1     a hub dataset (downloaded into --cache_dir)
    --task_name json|parquet|text --data_dir DIR                 local train / validation / test files
    --task_name json --data_dir DIR/<source>                     our prepared layout (*.chunk.*.jsonl, *.val.jsonl)

A row never holds two documents: HMT's memory starts afresh at every window (nothing is carried
across windows or training steps) and never mixes documents. A window is `window` tokens (the
training window: bptt_depth segments); a document longer than that gives several rows, the last
one padded, its padding unscored (IGNORE_INDEX labels).
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import numpy as np

from lingua.args import ConfigError
from lingua.data import IGNORE_INDEX

SPLITS = ("train", "validation", "test")
LOCAL = {"json": ("jsonl", "json"), "parquet": ("parquet",), "text": ("txt", "text")}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


def local_files(task_name: str, data_dir: str) -> dict[str, list[str]]:
    """{split: files} of a local dataset: files named <split>*.<ext> (validation also valid* /
    val*), or our prepared layout (chunks train; the .val.jsonl file validates and tests)."""
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir '{data_dir}' is not a directory")
    chunks = sorted(glob.glob(os.path.join(data_dir, "*.chunk.*.jsonl")))
    if chunks and task_name == "json":
        val = sorted(glob.glob(os.path.join(data_dir, "*.val.jsonl")))
        return {"train": chunks, "validation": val, "test": val}
    files = {}
    for split, names in SPLIT_NAMES.items():
        # a set: "val*" also matches "validation*"
        files[split] = sorted({f for name in names for ext in LOCAL[task_name]
                               for f in glob.glob(os.path.join(data_dir, f"{name}*.{ext}"))})
    if not files["train"] and not files["test"]:
        exts = "/".join(LOCAL[task_name])
        raise ConfigError(f"--data_dir '{data_dir}' has no train*.{exts} or test*.{exts} files for --task_name "
                          f"{task_name}")
    return files


def split_spec(split: str, train_set_split: Optional[str]) -> str:
    """datasets' split string: the head of the training split with --train_set_split (2% or 1000)."""
    if split != "train" or not train_set_split:
        return split
    head = train_set_split.strip()
    if not (head.rstrip("%").isdigit()):
        raise ConfigError(f"--train_set_split '{train_set_split}' must be a percentage (2%) or a count (1000)")
    return f"train[:{head}]"


def load_texts(task_name: str, split: str, task_config: Optional[str] = None, data_dir: Optional[str] = None,
               cache_dir: Optional[str] = None, train_set_split: Optional[str] = None,
               limit: Optional[int] = None, streaming: bool = False) -> list[str]:
    """The documents of one split (their `text` field, else the first text field); the first
    `limit` of them. streaming: read them as a stream (datasets' IterableDataset: nothing is
    downloaded or prepared whole), which needs a limit."""
    import datasets

    if streaming and limit is None:
        raise ValueError("streaming reads the first `limit` documents: give a limit")

    if task_name in LOCAL:
        files = local_files(task_name, data_dir or "")
        if not files.get(split):
            raise ConfigError(f"--data_dir '{data_dir}' has no {split} files")
        source = dict(path=task_name, data_files={split: files[split]})
    else:
        source = dict(path=task_name, name=task_config)
    try:
        ds = datasets.load_dataset(**source, split=split if streaming else split_spec(split, train_set_split),
                                   cache_dir=cache_dir, streaming=streaming)
        records = list(ds.take(limit)) if streaming else None  # a stream: its first `limit` records only
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:  # missing, offline, bad config
        raise ConfigError(f"--task_name {task_name}" + (f" --task_config {task_config}" if task_config else "")
                          + f": cannot load its {split} split ({type(e).__name__}: {e})") from None
    if streaming:
        columns = list(records[0]) if records else []
        is_text = lambda c: isinstance(records[0][c], str)  # noqa: E731
    else:
        columns = ds.column_names
        is_text = lambda c: ds.features[c].dtype == "string"  # noqa: E731
    field = "text" if "text" in columns else next((c for c in columns if is_text(c)), None)
    if field is None:
        raise ConfigError(f"--task_name {task_name}: no text column in {columns}")
    column = [r[field] for r in records] if streaming else ds[field][: limit if limit is not None else None]
    texts = [t for t in column if t and t.strip()]
    if not texts:
        raise ConfigError(f"--task_name {task_name}: the {split} split has no text")
    return texts


def document_windows(docs: list[list[int]], window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input, labels) rows of `window` tokens, each within one document; every next-token
    prediction of a document is in exactly one row, padding is IGNORE_INDEX."""
    rows = []
    for tokens in docs:
        for start in range(0, max(1, len(tokens) - 1), window):
            piece = np.asarray(tokens[start : start + window + 1], dtype=np.int64)
            if len(piece) < 2:
                continue
            x = np.zeros(window, dtype=np.int64)
            y = np.full(window, IGNORE_INDEX, dtype=np.int64)
            x[: len(piece) - 1], y[: len(piece) - 1] = piece[:-1], piece[1:]
            rows.append((x, y))
    return rows


class DocumentBatches:
    """Batches (inputs, labels) [batch_size, window] of this rank's rows, epoch after epoch (in
    order, or shuffled per epoch from `seed`); the position is its state, so a resumed run reads
    exactly the batches it would have read. The shared loop's loader interface."""

    def __init__(self, rows: list[tuple[np.ndarray, np.ndarray]], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = False):
        self.rows = rows[rank::world_size]
        if len(self.rows) < batch_size:
            raise ConfigError(f"--batch_size {batch_size} is more than the {len(self.rows)} windows this rank's "
                              "share of the training split holds")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def order(self) -> np.ndarray:
        n = len(self.rows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> "DocumentBatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position + self.batch_size > len(self.rows):  # the tail that fills no batch waits for the next epoch
            self.epoch, self.position = self.epoch + 1, 0
        picked = self.order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return np.stack([self.rows[i][0] for i in picked]), np.stack([self.rows[i][1] for i in picked])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        pass


def dilated(text: str, length: int, filler: str) -> str:
    """`text` with `length` copies of `filler` in its middle (--dilate_dataset: the answer
    moves that much further from its context)."""
    middle = len(text) // 2
    return text[:middle] + filler * length + text[middle:]


def interleaved(docs: list[list[int]], length: int) -> list[list[int]]:
    """Every two documents mixed into one, `length` tokens of the first, then of the second, and
    so on (--interleave_dataset: context switches); the second's leading BOS is dropped."""
    out = []
    for a, b in zip(docs[0::2], docs[1::2]):
        b = b[1:] if len(b) and len(a) and b[0] == a[0] else b
        mixed = []
        for start in range(0, max(len(a), len(b)), length):
            mixed += a[start : start + length] + b[start : start + length]
        out.append(mixed)
    if len(docs) % 2:
        out.append(docs[-1])
    return out


def split_documents(task, split: str, tokenizer, limit: Optional[int] = None) -> list[list[int]]:
    """The token ids of a split's documents (`task`: apps.hmt.train's HMTTaskArgs), BOS/EOS
    framed, dilated and interleaved as the task says; the first `limit` documents."""
    texts = load_texts(task.task_name, split, task.task_config, task.data_dir, task.cache_dir,
                       task.train_set_split if split == "train" else None, limit=limit, streaming=task.streaming)
    texts = texts[:limit] if limit is not None else texts
    if task.dilate_dataset:
        texts = [dilated(t, task.dilate_len, task.dilate_str) for t in texts]
    docs = [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
    return interleaved(docs, task.interleave_len) if task.interleave_dataset else docs
