"""Training data: JSONL chunks -> documents -> tokens -> packed windows -> shuffled batches.

A JSONL line is one document in one of these modes (see `document_segments`):
- pretraining `{"text": ...}`: every token is a label; with `data.text_field` set, the named
  field or fields (joined by `data.text_field_separator`) are the text instead, whatever the mode;
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
the reader saves (epoch, file, byte offset, line, documents read this epoch); a token stream
saves the reader state at its current document plus the offset in it; the shuffle buffer saves
the stage states and RNG at the buffer's start, the buffer's geometry and how many of its
windows it has emitted.
`load_async` runs the same pipeline in a child process that sends (batch, state after batch) pairs.

`data.root_dir` is a local path or any fsspec URL (`s3://`, `gs://`, `memory://`, ...); URLs are
listed and read through fsspec with the same state, plain paths with the standard library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from lingua.args import choice
from lingua.storage import in_process_only, is_url
from lingua.tokenizer import Tokenizer, TokenizerArgs, build_tokenizer

logger = logging.getLogger(__name__)

CHUNK_GLOB = "*.chunk.*.jsonl"
PREPARE = "setup/download_prepare_hf_data.py"  # named in errors: it writes data.root_dir's layout
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

# Signals a launcher sends to the whole process group that the trainer handles itself: SLURM's
# USR2 before a preemption (save, requeue) and Ctrl-C's SIGINT (close the loader, exit). Left at
# their defaults, they would kill the loader child before the trainer can act on them.
LOADER_IGNORED_SIGNALS = (signal.SIGUSR2, signal.SIGINT)
# Ranks whose shares of a source differ more than this in bytes get a warning: ranks read at one
# rate, so the documents of a smaller share are seen more often.
SHARE_IMBALANCE_WARN = 1.1


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
    # Not in Meta Lingua. The fields whose text, joined by the separator, is a pretraining document;
    # None reads the modes of `document_segments`. A list, so `text` and `[a, b]` both load.
    text_field: Optional[list[str]] = None
    text_field_separator: str = "\n"
    # Not in Meta Lingua: at most this many documents of each source per epoch, over all ranks.
    num_samples: Optional[int] = None


def open_binary(path: str | os.PathLike) -> Any:
    """`path` opened for binary reading: a URL through fsspec, a plain path with open()."""
    if is_url(path):
        import fsspec  # only URLs need it

        return fsspec.open(str(path), "rb").open()
    return open(path, "rb")


def _url_lister(root: str) -> Callable[[str, str], list[str]]:
    """For a URL root_dir: a function from a source name and pattern to its matching file URLs.
    DataError naming data.root_dir for an unknown protocol, a missing package or a missing root."""
    import fsspec

    try:
        fs, root_path = fsspec.core.url_to_fs(root)
        exists = fs.isdir(root_path)
    except Exception as e:  # unknown protocol, filesystem package not installed, no access
        raise DataError(f"data.root_dir '{root}' cannot be opened through fsspec: {type(e).__name__}: {e}") from None
    if not exists:
        raise DataError(f"data.root_dir '{root}' does not exist (prepare it with {PREPARE})")
    # Files keep the URL as written (its protocol chain and spelling), with the listed tail appended.
    base, prefix = root if root.endswith("/") else root + "/", root_path.rstrip("/") + "/"
    return lambda name, pattern: sorted(base + p[len(prefix):] for p in fs.glob(f"{prefix}{name}/{pattern}"))


def source_files(args: DataArgs, pattern: str = CHUNK_GLOB) -> dict[str, list[Path | str]]:
    """Files of every source (Paths under a plain root_dir, URLs under an fsspec one), checked
    before any training work starts."""
    if not args.root_dir:
        raise DataError("data.root_dir is not set")
    if is_url(args.root_dir):
        listing = _url_lister(args.root_dir)
        where = lambda name: f"{args.root_dir.rstrip('/')}/{name}"  # noqa: E731
    else:
        root = Path(args.root_dir)
        if not root.is_dir():
            raise DataError(f"data.root_dir '{root}' does not exist (prepare it with {PREPARE})")
        listing = lambda name, pattern: sorted((root / name).glob(pattern))  # noqa: E731
        where = lambda name: root / name  # noqa: E731
    if args.text_field is not None and not args.text_field:
        raise DataError("data.text_field is an empty list: name at least one field, or null for the default modes")
    if args.num_samples is not None and args.num_samples < 1:
        raise DataError(f"data.num_samples={args.num_samples}: must be at least 1 (or null to read everything)")
    if not args.sources:
        raise DataError("data.sources is empty: give at least one {name: weight}")
    if args.n_views != 2:
        raise DataError(f"data.n_views={args.n_views}: only 2 (input, label) is supported")
    out = {}
    for name, weight in args.sources.items():
        if not weight > 0:
            raise DataError(f"data.sources.{name} has weight {weight}; weights must be > 0")
        files = listing(name, pattern)
        if not files:
            raise DataError(f"data.sources.{name}: no files matching {pattern} in '{where(name)}'")
        out[name] = files
    return out


def assign_files(files: list[Path | str], rank: int, world_size: int) -> list[tuple[str, int, int]]:
    """This rank's share as (path, stride, offset) triples: it reads the lines of `path` with
    line % stride == offset. Every line is read by exactly one rank.

    Ranks consume at one rate, so their shares must be equal or the documents of a smaller share
    are seen more often. With g = gcd(files, ranks), ranks r = j (mod g) split the lines of every
    file c = j (mod g) among themselves: whole files round-robin when the ranks divide the files,
    files shared by a fixed set of ranks when the files divide the ranks, and otherwise each rank
    reads a strided slice of files/g files. Each rank so gets files/ranks files' worth of lines,
    which is the same share when the files are of equal length (setup/download_prepare_hf_data.py
    deals lines round-robin) or when g = 1; `share_imbalance` measures the rest.
    """
    n = len(files)
    groups = math.gcd(n, world_size)
    stride = world_size // groups
    k = rank // groups
    # A file's first (lines % stride) offsets get one line more; rotating the offset per file
    # spreads those extra lines over the group's ranks instead of always giving them to k = 0.
    return [(str(files[c]), stride, (k + t) % stride) for t, c in enumerate(range(rank % groups, n, groups))]


def _file_sizes(files: list[Path | str]) -> dict[str, int]:
    if files and is_url(files[0]):
        import fsspec

        fs = fsspec.core.url_to_fs(str(files[0]))[0]
        return dict(zip(map(str, files), fs.sizes([fsspec.core.url_to_fs(str(f))[1] for f in files])))
    return {str(f): os.path.getsize(f) for f in files}


def share_imbalance(files: list[Path | str], world_size: int) -> float:
    """Largest over smallest rank share of `files`, estimated from file sizes in bytes."""
    sizes = _file_sizes(files)
    shares = [sum(sizes[p] / stride for p, stride, _ in assign_files(files, r, world_size)) for r in range(world_size)]
    return max(shares) / max(min(shares), 1.0)


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


def _joined_fields(doc: Any, fields: list[str], separator: str, where: str) -> str:
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object with the data.text_field fields {fields}, "
                        f"got {type(doc).__name__}")
    for name in fields:
        if name not in doc:
            raise DataError(f"{where}: no field '{name}' (data.text_field={fields}; found {sorted(doc)[:8]})")
        if not isinstance(doc[name], str):
            raise DataError(f"{where}: field '{name}' (data.text_field) must be a string, "
                            f"got {type(doc[name]).__name__}")
    return separator.join(doc[name] for name in fields)


def document_segments(doc: Any, where: str, text_field: Optional[list[str]] = None,
                      separator: str = "\n") -> Segments:
    """The (text, trained) pieces of one parsed JSONL record; DataError naming `where` if it
    fits no data mode. With `text_field`, the record is one pretraining text: those fields
    joined by `separator`."""
    if text_field is not None:
        return [(_joined_fields(doc, text_field, separator, where), True)]
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


def parse_document(line: bytes, path: str, line_no: int, text_field: Optional[list[str]] = None,
                   separator: str = "\n") -> Segments:
    """The segments of one JSONL line, or DataError naming file and line (1-based)."""
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}:{line_no + 1}: malformed JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    return document_segments(doc, f"{path}:{line_no + 1}", text_field, separator)


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
    """Endless reader over (path, stride, offset) assignments; one epoch = every assigned line
    once, or only the first `max_docs` documents of them. `text_field` and `separator` are those
    of `parse_document`."""

    def __init__(self, assignments: list[tuple[str, int, int]], skip_bad_lines: bool = False,
                 text_field: Optional[list[str]] = None, separator: str = "\n", max_docs: Optional[int] = None):
        self.assignments = assignments
        self.skip_bad_lines = skip_bad_lines
        self.text_field, self.separator, self.max_docs = text_field, separator, max_docs
        # A position means nothing in another share (file_idx and byte index its own files), so
        # the state names the share; file names only, so a moved data.root_dir still resumes.
        names = [(Path(p).name, stride, offset) for p, stride, offset in assignments]
        self.share = hashlib.sha1(json.dumps(names).encode()).hexdigest()[:16]
        self.epoch, self.file_idx, self.byte, self.line = 0, 0, 0, 0
        self.docs = 0  # documents returned in this epoch (max_docs ends it)
        self.skipped = 0
        self._file = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "file_idx": self.file_idx, "byte": self.byte, "line": self.line,
                "docs": self.docs, "share": self.share}

    def load(self, state: dict) -> None:
        # States written before the share was saved have none: accepted as before.
        if state.get("share", self.share) != self.share or not 0 <= state["file_idx"] < len(self.assignments):
            where = os.path.dirname(self.assignments[0][0]) if self.assignments else "?"
            raise DataError(
                f"the data state was saved for another share of the chunks in '{where}': the chunk files "
                f"under data.root_dir or their assignment to ranks changed since the checkpoint, so its "
                f"position cannot be resumed"
            )
        self.close()
        self.epoch, self.file_idx, self.byte, self.line = (state[k] for k in ("epoch", "file_idx", "byte", "line"))
        self.docs = state.get("docs", 0)  # older states have none; they only matter with max_docs

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __next__(self) -> Segments:
        empty_passes = 0
        while True:
            if self.max_docs is not None and self.docs >= self.max_docs:
                self.close()
                self.epoch, self.file_idx, self.byte, self.line, self.docs = self.epoch + 1, 0, 0, 0, 0
            path, stride, offset = self.assignments[self.file_idx]
            if self._file is None:
                self._file = open_binary(path)
                self._file.seek(self.byte)
            raw = self._file.readline()
            if not raw:
                self.close()
                self.file_idx, self.byte, self.line = self.file_idx + 1, 0, 0
                if self.file_idx == len(self.assignments):
                    self.file_idx, self.epoch, self.docs = 0, self.epoch + 1, 0
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
                doc = parse_document(raw, path, line_no, self.text_field, self.separator)
                self.docs += 1
                return doc
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


def docs_per_rank(num_samples: Optional[int], world_size: int) -> Optional[int]:
    """Documents of each source that one rank reads per epoch under data.num_samples (None: all):
    an equal part, rounded down, since ranks consume at one rate and equal parts keep every
    document's visit rate equal. Each rank takes the first ones of its own share of the lines."""
    if num_samples is None:
        return None
    if num_samples < world_size:
        raise DataError(f"data.num_samples={num_samples} is fewer than the {world_size} data-parallel ranks: "
                        f"each rank reads num_samples / ranks documents of each source, so each needs one")
    return num_samples // world_size


class PackedBatches:
    """The whole pipeline of one rank: weighted sources, packed windows, a shuffle buffer of
    prefetch_size batches, (input, label) int64 batches of [batch_size, seq_len]; labels are
    IGNORE_INDEX where the document's mask says untrained."""

    def __init__(self, args: DataArgs, rank: int = 0, world_size: int = 1, tokenizer: Optional[Tokenizer] = None):
        self.args = args
        files = source_files(args)
        self.tokenizer = tokenizer or build_tokenizer(args.tokenizer.name, args.tokenizer.path)
        max_docs = docs_per_rank(args.num_samples, world_size)
        self.streams = {
            name: TokenStream(
                JSONLReader(assign_files(fs, rank, world_size), args.on_bad_line == "skip", args.text_field,
                            args.text_field_separator, max_docs),
                self.tokenizer, args.add_bos, args.add_eos,
            )
            for name, fs in files.items()
        }
        weights = np.array([args.sources[n] for n in self.streams], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.rng = np.random.default_rng([args.seed, rank])
        self.buffer: Optional[tuple[np.ndarray, np.ndarray]] = None  # (tokens, masks) of whole windows
        # The buffer's shape, which differs from the config's after a resume with another one.
        self.geometry = self._config_geometry()
        self.rows = 0  # windows of the buffer emitted so far
        self.start = self._snapshot()

    def _config_geometry(self) -> dict:
        return {"prefetch_size": self.n_batches_per_buffer, "batch_size": self.args.batch_size,
                "seq_len": self.args.seq_len}

    def _snapshot(self) -> dict:
        return {"streams": {n: s.state() for n, s in self.streams.items()}, "rng": self.rng.bit_generator.state}

    def state_dict(self) -> dict:
        return {"start": self.start, "geometry": dict(self.geometry), "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`. A buffer saved with another data.prefetch_size, batch_size or seq_len
        is rebuilt with its own geometry (so it holds the same windows) and its rest is emitted in
        batches of the config's shape; what cannot fill a whole batch is dropped with a warning."""
        start = state["start"]
        if set(start["streams"]) != set(self.streams):
            raise DataError(
                f"checkpoint data state has sources {sorted(start['streams'])}, config has {sorted(self.streams)}"
            )
        for name, stream in self.streams.items():
            stream.load(start["streams"][name])
        self.rng.bit_generator.state = start["rng"]
        # States written before the geometry was saved counted batches of the config's shape.
        geometry = state.get("geometry") or self._config_geometry()
        rows = state["rows"] if "rows" in state else state["emitted"] * geometry["batch_size"]
        if rows >= geometry["prefetch_size"] * geometry["batch_size"]:
            hint = "" if "geometry" in state else (
                "; it was saved without its geometry, so resume with the data.prefetch_size and data.batch_size "
                f"it was saved with (this run has {self.n_batches_per_buffer} and {self.args.batch_size})")
            raise DataError(
                f"the data state points past the end of its shuffle buffer ({rows} windows emitted of "
                f"{geometry['prefetch_size']} x {geometry['batch_size']}){hint}"
            )
        self.start, self.buffer, self.rows = start, None, 0
        self.geometry = self._config_geometry()
        if rows:
            self._fill(geometry)
            self.rows = rows
            self._end_buffer_if_spent()

    @property
    def n_batches_per_buffer(self) -> int:
        return max(1, self.args.prefetch_size)

    def _fill(self, geometry: dict) -> None:
        names = list(self.streams)
        n_windows = geometry["prefetch_size"] * geometry["batch_size"]
        picks = self.rng.choice(len(names), size=n_windows, p=self.weights)
        windows = [self.streams[names[i]].window(geometry["seq_len"]) for i in picks]
        order = self.rng.permutation(n_windows)
        self.buffer = np.stack([w[0] for w in windows])[order], np.stack([w[1] for w in windows])[order]
        self.geometry = dict(geometry)

    def _end_buffer_if_spent(self) -> None:
        """Start the next buffer once this one cannot give a whole batch of the config's shape."""
        left = len(self.buffer[0]) - self.rows
        if left >= self.args.batch_size and self.geometry["seq_len"] == self.args.seq_len:
            return
        if left:  # only after a resume with another geometry: a buffer of the config's is spent exactly
            logger.warning(
                "the data state was saved with data.batch_size=%d, data.seq_len=%d, data.prefetch_size=%d and "
                "this run has data.batch_size=%d, data.seq_len=%d, data.prefetch_size=%d: %d windows (%d tokens) "
                "of the saved shuffle buffer fit no whole batch and are dropped",
                self.geometry["batch_size"], self.geometry["seq_len"], self.geometry["prefetch_size"],
                self.args.batch_size, self.args.seq_len, self.n_batches_per_buffer, left,
                left * self.geometry["seq_len"])
        self.buffer, self.rows = None, 0
        self.geometry = self._config_geometry()
        self.start = self._snapshot()

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.buffer is None:
            self._fill(self._config_geometry())
        rows = slice(self.rows, self.rows + self.args.batch_size)
        tokens, mask = self.buffer[0][rows], self.buffer[1][rows]
        self.rows += self.args.batch_size
        self._end_buffer_if_spent()
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
    # Here rather than in the parent, so it holds whichever way the child was started; the signals
    # were blocked since before the start, so one sent meanwhile is discarded, not fatal.
    for signum in LOADER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LOADER_IGNORED_SIGNALS)
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
    """PackedBatches in a child process; state_dict() is the state after the last batch taken.

    The child is forked by default: it needs no torch, and fork avoids re-importing the trainer.
    `start_method="spawn"` also works. "forkserver" is refused: its server is a helper process in
    the trainer's process group that a group signal such as SLURM's USR2 kills, after which the
    trainer can no longer tell whether the loader child lives. A `memory://` data.root_dir is not
    visible to a child: build_data_loader reads it in-process instead."""

    def __init__(
        self, args: DataArgs, rank: int, world_size: int, state: Optional[dict], queue_size: int = 8,
        start_method: str = "fork",
    ):
        if start_method not in ("fork", "spawn"):
            raise ValueError(f"start_method={start_method!r}: the data loader child is started by 'fork' or 'spawn'")
        self.state = state if state is not None else PackedBatches(args, rank, world_size).state_dict()
        ctx = mp.get_context(start_method)
        # Blocked until the child has ignored them (fork and exec keep the mask), so a signal to the
        # process group during the start cannot kill it; the trainer gets its copy on unblocking.
        # The queue is made inside too: under spawn it starts the stdlib resource tracker, which
        # then keeps USR2 blocked instead of dying of it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, LOADER_IGNORED_SIGNALS)
        try:
            self.queue = ctx.Queue(maxsize=queue_size)
            self.stop = ctx.Event()
            self.process = ctx.Process(
                target=_produce, args=(args, rank, world_size, state, self.queue, self.stop, os.getpid()), daemon=True
            )
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

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


def warn_unequal_shares(files: dict[str, list[Path | str]], world_size: int) -> None:
    """One warning per source whose chunks give the ranks shares of unequal size."""
    for name, fs in files.items():
        imbalance = share_imbalance(fs, world_size)
        if imbalance > SHARE_IMBALANCE_WARN:
            logger.warning(
                "data.sources.%s: the %d ranks' shares of its %d chunks differ in size up to %.2fx, so the "
                "documents of the smaller shares are seen up to %.2fx as often; chunks of equal size (as "
                "setup/download_prepare_hf_data.py writes them) or a chunk count coprime with the world size "
                "give equal shares", name, world_size, len(fs), imbalance, imbalance)


def build_data_loader(args: DataArgs, rank: int = 0, world_size: int = 1, state: Optional[dict] = None,
                      start_method: str = "fork"):
    """Batches of this rank, resumed from `state` if given; call .close() when done.
    `start_method` starts the async loader's child (distributed.spawn_method)."""
    files = source_files(args)  # fails here, before any child process starts
    per_rank = docs_per_rank(args.num_samples, world_size)
    if rank == 0:  # one warning per run, not one per rank
        warn_unequal_shares(files, world_size)
        if per_rank is not None and per_rank * world_size != args.num_samples:
            logger.warning("data.num_samples=%d over %d ranks: each rank reads %d documents of each source, "
                           "%d in all", args.num_samples, world_size, per_rank, per_rank * world_size)
    if args.load_async and in_process_only(args.root_dir):
        logger.warning("data.root_dir '%s' lives in this process's memory, which a loader child process cannot "
                       "read: data.load_async is ignored and batches are made in this process", args.root_dir)
    elif args.load_async:
        return AsyncBatches(args, rank, world_size, state, start_method=start_method)
    batches = PackedBatches(args, rank, world_size)
    if state is not None:
        batches.load_state_dict(state)
    return batches


def read_documents(path: str | os.PathLike, skip_bad_lines: bool = False, text_field: Optional[list[str]] = None,
                   separator: str = "\n") -> Iterator[Segments]:
    """Every document of one JSONL file (a path or an fsspec URL) once, in order (validation
    sets), as segments; `text_field` and `separator` are those of `parse_document`."""
    with open_binary(path) as f:
        for line_no, raw in enumerate(iter(f.readline, b"")):
            if not raw.strip():
                continue
            try:
                yield parse_document(raw, str(path), line_no, text_field, separator)
            except DataError:
                if not skip_bad_lines:
                    raise
