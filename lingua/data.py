"""Training data: JSONL chunks -> documents -> tokens -> packed windows -> shuffled batches.

Each stage has a small JSON state, so a checkpoint resumes the exact batch sequence:
the reader saves (epoch, file, byte offset, line); a token stream saves the reader state at
its current document plus the offset in it; the shuffle buffer saves the stage states and
RNG at the buffer's start plus how many batches it has emitted. `load_async` runs the same
pipeline in a child process that sends (batch, state after batch) pairs.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from lingua.args import choice
from lingua.tokenizer import Tokenizer, TokenizerArgs, build_tokenizer

logger = logging.getLogger(__name__)

CHUNK_GLOB = "*.chunk.*.jsonl"
VAL_GLOB = "*.val.jsonl"


class DataError(ValueError):
    """Bad data or data config; the message names the file and line, or the config key."""


@dataclass
class DataArgs:
    root_dir: Optional[str] = None
    sources: dict[str, float] = field(default_factory=dict)
    batch_size: int = 2
    seq_len: int = 2048
    n_views: int = 2
    seed: int = 42
    add_bos: bool = True
    add_eos: bool = True
    load_async: bool = True
    prefetch_size: int = 64
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    # Not in Meta Lingua: what a malformed line does ("skip" counts and warns).
    on_bad_line: str = choice("error", ("error", "skip"))


def source_files(args: DataArgs, pattern: str = CHUNK_GLOB) -> dict[str, list[Path]]:
    """Files of every source, checked before any training work starts."""
    if not args.root_dir:
        raise DataError("data.root_dir is not set")
    root = Path(args.root_dir)
    if not root.is_dir():
        raise DataError(f"data.root_dir '{root}' does not exist (prepare it with setup/download_prepare_hf_data.py)")
    if not args.sources:
        raise DataError("data.sources is empty: give at least one {name: weight}")
    if args.n_views != 2:
        raise DataError(f"data.n_views={args.n_views}: only 2 (input, label) is supported")
    out = {}
    for name, weight in args.sources.items():
        if not weight > 0:
            raise DataError(f"data.sources.{name} has weight {weight}; weights must be > 0")
        files = sorted((root / name).glob(pattern))
        if not files:
            raise DataError(f"data.sources.{name}: no files matching {pattern} in '{root / name}'")
        out[name] = files
    return out


def assign_files(files: list[Path], rank: int, world_size: int) -> list[tuple[str, int, int]]:
    """This rank's share as (path, stride, offset): it reads lines with line % stride == offset.

    With at least as many files as ranks, files are dealt round-robin (every file read by one
    rank, none dropped). With fewer, the ranks sharing a file split its lines.
    """
    n = len(files)
    if n >= world_size:
        return [(str(f), 1, 0) for i, f in enumerate(files) if i % world_size == rank]
    sharing = [r for r in range(world_size) if r % n == rank % n]
    return [(str(files[rank % n]), len(sharing), sharing.index(rank))]


def parse_document(line: bytes, path: str, line_no: int) -> str:
    """The `text` of one JSONL line, or DataError naming file and line (1-based)."""
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}:{line_no + 1}: malformed JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise DataError(f"{path}:{line_no + 1}: no string field 'text'")
    return doc["text"]


class JSONLReader:
    """Endless reader over (path, stride, offset) assignments; one epoch = every assigned line once."""

    def __init__(self, assignments: list[tuple[str, int, int]], skip_bad_lines: bool = False):
        self.assignments = assignments
        self.skip_bad_lines = skip_bad_lines
        self.epoch, self.file_idx, self.byte, self.line = 0, 0, 0, 0
        self.skipped = 0
        self._file = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "file_idx": self.file_idx, "byte": self.byte, "line": self.line}

    def load(self, state: dict) -> None:
        self.close()
        self.epoch, self.file_idx, self.byte, self.line = (state[k] for k in ("epoch", "file_idx", "byte", "line"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __next__(self) -> str:
        empty_passes = 0
        while True:
            path, stride, offset = self.assignments[self.file_idx]
            if self._file is None:
                self._file = open(path, "rb")
                self._file.seek(self.byte)
            raw = self._file.readline()
            if not raw:
                self.close()
                self.file_idx, self.byte, self.line = self.file_idx + 1, 0, 0
                if self.file_idx == len(self.assignments):
                    self.file_idx, self.epoch = 0, self.epoch + 1
                    empty_passes += 1
                    if empty_passes > 1:
                        raise DataError(f"no documents to read in {[a[0] for a in self.assignments]}")
                continue
            line_no = self.line
            self.byte += len(raw)
            self.line += 1
            if line_no % stride != offset or not raw.strip():
                continue
            try:
                return parse_document(raw, path, line_no)
            except DataError as e:
                if not self.skip_bad_lines:
                    raise
                self.skipped += 1
                if self.skipped == 1 or self.skipped % 1000 == 0:
                    logger.warning("skipped %d bad lines so far (data.on_bad_line=skip); latest: %s", self.skipped, e)


class TokenStream:
    """A source's endless token stream, cut into windows of n+1 tokens that overlap by one,
    so every token is a label exactly once. State: the reader state before the current
    document and the offset of the next token in it."""

    def __init__(self, reader: JSONLReader, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
        self.reader, self.tokenizer = reader, tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.docs: deque[np.ndarray] = deque()
        self.doc_states: deque[dict] = deque()
        self.offset = 0
        self.n_tokens_read = 0

    def state(self) -> dict:
        if self.docs:
            return {"reader": self.doc_states[0], "offset": self.offset}
        return {"reader": self.reader.state(), "offset": 0}

    def load(self, state: dict) -> None:
        self.reader.load(state["reader"])
        self.docs.clear()
        self.doc_states.clear()
        self.offset = 0
        if state["offset"]:
            self._read_doc()
            self.offset = state["offset"]

    def _read_doc(self) -> None:
        before = self.reader.state()
        text = next(self.reader)
        tokens = np.asarray(self.tokenizer.encode(text, add_bos=self.add_bos, add_eos=self.add_eos), dtype=np.int64)
        self.n_tokens_read += len(tokens)
        self.docs.append(tokens)
        self.doc_states.append(before)

    def window(self, n: int) -> np.ndarray:
        """The next n+1 tokens; advances by n."""
        available = sum(len(d) for d in self.docs) - self.offset
        while available < n + 1:
            self._read_doc()
            available += len(self.docs[-1])
        parts, need, start = [], n + 1, self.offset
        for doc in self.docs:
            take = doc[start : start + need]
            parts.append(take)
            need -= len(take)
            start = 0
            if need == 0:
                break
        self.offset += n
        while self.docs and self.offset >= len(self.docs[0]):
            self.offset -= len(self.docs[0])
            self.docs.popleft()
            self.doc_states.popleft()
        return np.concatenate(parts)


class PackedBatches:
    """The whole pipeline of one rank: weighted sources, packed windows, a shuffle buffer of
    prefetch_size batches, (input, label) int64 batches of [batch_size, seq_len]."""

    def __init__(self, args: DataArgs, rank: int = 0, world_size: int = 1, tokenizer: Optional[Tokenizer] = None):
        self.args = args
        files = source_files(args)
        self.tokenizer = tokenizer or build_tokenizer(args.tokenizer.name, args.tokenizer.path)
        skip = args.on_bad_line == "skip"
        self.streams = {
            name: TokenStream(
                JSONLReader(assign_files(fs, rank, world_size), skip), self.tokenizer, args.add_bos, args.add_eos
            )
            for name, fs in files.items()
        }
        weights = np.array([args.sources[n] for n in self.streams], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.rng = np.random.default_rng([args.seed, rank])
        self.buffer: Optional[np.ndarray] = None
        self.emitted = 0
        self.start = self._snapshot()

    def _snapshot(self) -> dict:
        return {"streams": {n: s.state() for n, s in self.streams.items()}, "rng": self.rng.bit_generator.state}

    def state_dict(self) -> dict:
        return {"start": self.start, "emitted": self.emitted}

    def load_state_dict(self, state: dict) -> None:
        start = state["start"]
        if set(start["streams"]) != set(self.streams):
            raise DataError(
                f"checkpoint data state has sources {sorted(start['streams'])}, config has {sorted(self.streams)}"
            )
        for name, stream in self.streams.items():
            stream.load(start["streams"][name])
        self.rng.bit_generator.state = start["rng"]
        self.start, self.buffer, self.emitted = start, None, 0
        if state["emitted"]:
            self._fill()
            self.emitted = state["emitted"]

    @property
    def n_batches_per_buffer(self) -> int:
        return max(1, self.args.prefetch_size)

    def _fill(self) -> None:
        names = list(self.streams)
        n_windows = self.n_batches_per_buffer * self.args.batch_size
        picks = self.rng.choice(len(names), size=n_windows, p=self.weights)
        windows = np.stack([self.streams[names[i]].window(self.args.seq_len) for i in picks])
        self.buffer = windows[self.rng.permutation(n_windows)]

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.buffer is None:
            self._fill()
        b = self.args.batch_size
        batch = self.buffer[self.emitted * b : (self.emitted + 1) * b]
        self.emitted += 1
        if self.emitted == self.n_batches_per_buffer:
            self.buffer, self.emitted = None, 0
            self.start = self._snapshot()
        return batch[:, :-1], batch[:, 1:]

    def n_tokens_read(self) -> int:
        return sum(s.n_tokens_read for s in self.streams.values())

    def close(self) -> None:
        for s in self.streams.values():
            s.reader.close()


def _produce(
    args: DataArgs, rank: int, world_size: int, state: Optional[dict], out: Any, stop: Any, parent: int
) -> None:
    """Child process body: send (input, label, state after batch), or ("error", message).
    Exits when told to or when the trainer is gone (a SIGKILLed parent cannot tell it)."""
    try:
        batches = PackedBatches(args, rank, world_size)
        if state is not None:
            batches.load_state_dict(state)
        while not stop.is_set() and os.getppid() == parent:
            x, y = next(batches)
            item = (x, y, batches.state_dict())
            while not stop.is_set() and os.getppid() == parent:
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except Exception as e:  # surfaced in the parent with the original message
        out.put(("error", f"{type(e).__name__}: {e}", None))


class AsyncBatches:
    """PackedBatches in a child process; state_dict() is the state after the last batch taken."""

    def __init__(self, args: DataArgs, rank: int, world_size: int, state: Optional[dict], queue_size: int = 8):
        ctx = mp.get_context("fork")  # the child needs no torch; fork avoids re-importing the trainer
        self.queue = ctx.Queue(maxsize=queue_size)
        self.stop = ctx.Event()
        self.state = state if state is not None else PackedBatches(args, rank, world_size).state_dict()
        self.process = ctx.Process(
            target=_produce, args=(args, rank, world_size, state, self.queue, self.stop, os.getpid()), daemon=True
        )
        self.process.start()

    def state_dict(self) -> dict:
        return self.state

    def __iter__(self) -> "AsyncBatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        while True:
            try:
                x, y, state = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise DataError(f"data loader process died (exit code {self.process.exitcode})") from None
        if isinstance(x, str) and x == "error":
            raise DataError(y)
        self.state = state
        return x, y

    def close(self) -> None:
        self.stop.set()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
        self.queue.close()


def build_data_loader(args: DataArgs, rank: int = 0, world_size: int = 1, state: Optional[dict] = None):
    """Batches of this rank, resumed from `state` if given; call .close() when done."""
    if args.load_async:
        source_files(args)  # fail in the parent, before the child starts
        return AsyncBatches(args, rank, world_size, state)
    batches = PackedBatches(args, rank, world_size)
    if state is not None:
        batches.load_state_dict(state)
    return batches


def read_documents(path: str | os.PathLike, skip_bad_lines: bool = False) -> Iterator[str]:
    """Every document of one JSONL file once, in order (validation sets)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                yield parse_document(raw, str(path), line_no)
            except DataError:
                if not skip_bad_lines:
                    raise
