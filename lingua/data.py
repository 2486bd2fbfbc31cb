"""Training data: JSONL chunks -> documents -> tokens -> packed windows -> shuffled batches.

A JSONL line is one document in one of these modes (see `document_segments`):
- pretraining `{"text": ...}`: every token is a label;
- input/output pairs `{"input", "output"}` or `{"prompt", "response"}`: the two texts are
  concatenated as they are (put any separator in the input), and only the output's tokens
  and the final eos are labels;
- chat `{"messages": [{"role", "content"}, ...]}` or ShareGPT-style
  `{"conversations": [{"from", "value"}, ...]}` (human -> user, gpt -> assistant), rendered
  with `CHAT_TEMPLATE`: every message is `<|{role}|>\n{content}<|end|>\n`; only assistant
  contents with their `<|end|>\n` and the final eos are labels, so a generator stops at `<|end|>`.
Labels outside the trained part are IGNORE_INDEX, and packing carries the mask with the tokens,
so windows that cut a document keep it aligned; a document longer than a window is split over
several windows, never dropped.

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
# Label of a position that is not trained on (PyTorch's cross_entropy default ignore_index).
IGNORE_INDEX = -100

CHAT_TEMPLATE = "<|{role}|>\n{content}<|end|>\n"
END_OF_TURN = "<|end|>"
# Accepted role names, mapped to the rendered role: OpenAI-style and ShareGPT-style.
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
              "human": "user", "gpt": "assistant"}
PAIR_FIELDS = (("input", "output"), ("prompt", "response"))
CHAT_FIELDS = ("messages", "conversations")

# A document as consecutive (text, trained) pieces.
Segments = list[tuple[str, bool]]


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


def _render_chat(messages: Any, where: str) -> Segments:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where} must be a non-empty list of messages")
    segments: Segments = []
    n_answers = 0
    for i, m in enumerate(messages):
        role = m.get("role", m.get("from")) if isinstance(m, dict) else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}[{i}]: a message needs 'role' (or 'from') in {sorted(CHAT_ROLES)} and a string "
                f"'content' (or 'value'); got {m!r:.120}"
            )
        role = CHAT_ROLES[role]
        if role == "assistant":
            n_answers += 1
            segments += [(f"<|{role}|>\n", False), (f"{content}{END_OF_TURN}\n", True)]
        else:
            segments.append((CHAT_TEMPLATE.format(role=role, content=content), False))
    if not n_answers:
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return segments


def document_segments(doc: Any, where: str) -> Segments:
    """The (text, trained) pieces of one parsed JSONL record; DataError naming `where` if it
    fits no data mode."""
    if isinstance(doc, dict):
        if isinstance(doc.get("text"), str):
            return [(doc["text"], True)]
        for prompt_key, answer_key in PAIR_FIELDS:
            if prompt_key in doc or answer_key in doc:
                if not (isinstance(doc.get(prompt_key), str) and isinstance(doc.get(answer_key), str)):
                    raise DataError(f"{where}: '{prompt_key}' and '{answer_key}' must both be strings")
                return [(doc[prompt_key], False), (doc[answer_key], True)]
        for key in CHAT_FIELDS:
            if key in doc:
                return _render_chat(doc[key], f"{where}: '{key}'")
    found = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
    raise DataError(
        f"{where}: no data field: expected a string 'text', 'input'+'output', 'prompt'+'response', "
        f"or a 'messages'/'conversations' list (found {found})"
    )


def parse_document(line: bytes, path: str, line_no: int) -> Segments:
    """The segments of one JSONL line, or DataError naming file and line (1-based)."""
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}:{line_no + 1}: malformed JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    return document_segments(doc, f"{path}:{line_no + 1}")


def encode_document(
    tokenizer: Tokenizer, segments: Segments, add_bos: bool, add_eos: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, label mask): mask[i] says whether token i is trained on as a label.

    A pretraining document trains every token, bos included (it follows the previous
    document's eos in the packed stream, as in Meta Lingua). A supervised document trains
    only its answer pieces and its eos, which teaches the model to stop."""
    pretraining = len(segments) == 1 and segments[0][1]
    if pretraining:
        tokens = np.asarray(tokenizer.encode(segments[0][0], add_bos=add_bos, add_eos=add_eos), dtype=np.int64)
        return tokens, np.ones(len(tokens), dtype=bool)
    ids, mask = [], []
    if add_bos:
        ids.append(np.array([tokenizer.bos_id], dtype=np.int64))
        mask.append(np.zeros(1, dtype=bool))
    for text, trained in segments:
        piece = np.asarray(tokenizer.encode(text, add_bos=False, add_eos=False), dtype=np.int64)
        ids.append(piece)
        mask.append(np.full(len(piece), trained))
    if add_eos:
        ids.append(np.array([tokenizer.eos_id], dtype=np.int64))
        mask.append(np.ones(1, dtype=bool))
    return np.concatenate(ids), np.concatenate(mask)


def labels_from(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Next-token labels of windows of n+1 tokens: IGNORE_INDEX where the mask says untrained."""
    labels = tokens[..., 1:]
    trained = mask[..., 1:]
    return labels if trained.all() else np.where(trained, labels, IGNORE_INDEX)


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

    def __next__(self) -> Segments:
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
    so every token is a label exactly once. Each token carries its label mask. State: the
    reader state before the current document and the offset of the next token in it."""

    def __init__(self, reader: JSONLReader, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
        self.reader, self.tokenizer = reader, tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.docs: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (tokens, mask)
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
        tokens, mask = encode_document(self.tokenizer, next(self.reader), self.add_bos, self.add_eos)
        self.n_tokens_read += len(tokens)
        self.docs.append((tokens, mask))
        self.doc_states.append(before)

    def window(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n+1 tokens and their label mask; advances by n."""
        available = sum(len(t) for t, _ in self.docs) - self.offset
        while available < n + 1:
            self._read_doc()
            available += len(self.docs[-1][0])
        tokens, masks, need, start = [], [], n + 1, self.offset
        for doc_tokens, doc_mask in self.docs:
            tokens.append(doc_tokens[start : start + need])
            masks.append(doc_mask[start : start + need])
            need -= len(tokens[-1])
            start = 0
            if need == 0:
                break
        self.offset += n
        while self.docs and self.offset >= len(self.docs[0][0]):
            self.offset -= len(self.docs[0][0])
            self.docs.popleft()
            self.doc_states.popleft()
        return np.concatenate(tokens), np.concatenate(masks)


class PackedBatches:
    """The whole pipeline of one rank: weighted sources, packed windows, a shuffle buffer of
    prefetch_size batches, (input, label) int64 batches of [batch_size, seq_len]; labels are
    IGNORE_INDEX where the document's mask says untrained."""

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
        self.buffer: Optional[tuple[np.ndarray, np.ndarray]] = None  # (tokens, masks) of whole windows
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
        windows = [self.streams[names[i]].window(self.args.seq_len) for i in picks]
        order = self.rng.permutation(n_windows)
        self.buffer = np.stack([w[0] for w in windows])[order], np.stack([w[1] for w in windows])[order]

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.buffer is None:
            self._fill()
        rows = slice(self.emitted * self.args.batch_size, (self.emitted + 1) * self.args.batch_size)
        tokens, mask = self.buffer[0][rows], self.buffer[1][rows]
        self.emitted += 1
        if self.emitted == self.n_batches_per_buffer:
            self.buffer, self.emitted = None, 0
            self.start = self._snapshot()
        return tokens[:, :-1], labels_from(tokens, mask)

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


def read_documents(path: str | os.PathLike, skip_bad_lines: bool = False) -> Iterator[Segments]:
    """Every document of one JSONL file once, in order (validation sets), as segments."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                yield parse_document(raw, str(path), line_no)
            except DataError:
                if not skip_bad_lines:
                    raise
