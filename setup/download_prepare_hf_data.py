"""Prepare a pretraining corpus as shuffled JSONL chunks plus a validation file.

Owns the data-prep command: a source yields documents, then one shared path
shuffles them (seeded), deals them into chunks, moves a validation slice out and
writes everything atomically with a `.done` marker. Sources now: `stdlib` (this
Python's own standard-library sources, no network); hub datasets come later as
further sources feeding the same steps.

    python setup/download_prepare_hf_data.py stdlib <MEMORY> --data_dir ./data --seed 42
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Optional

# Fraction of documents moved out of the chunks into <name>.val.jsonl, taken as the
# first lines of every chunk so that each chunk contributes equally.
VAL_FRACTION = 0.02
NEXT_COMMAND = "python -m apps.main.train config=apps/main/configs/debug.yaml"
MARKER = ".done"
GB = 1e9


class PrepError(Exception):
    """A failure the user can act on; printed without a traceback, exit code 1."""


@dataclass
class SourceStats:
    """What a source reports besides its documents."""

    root: str = ""
    n_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """A named corpus: how to produce its documents and how many chunks suit it."""

    name: str
    description: str
    default_nchunks: int
    # Yields {"text": ..., ...} dicts in a fixed order (the shuffle supplies randomness).
    iter_documents: Callable[[SourceStats], Iterator[dict]]


def iter_stdlib_documents(stats: SourceStats) -> Iterator[dict]:
    """This interpreter's standard-library .py files, one document each, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    stats.root = str(root)
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed third-party packages live under the stdlib dir but are not the stdlib,
        # and would make the corpus depend on what happens to be pip-installed.
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    rel_paths = sorted(p.relative_to(root).as_posix() for p in paths)
    for rel in rel_paths:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            # The stdlib ships deliberately mis-encoded test files; they are not text.
            stats.n_skipped += 1
            if len(stats.skipped_examples) < 3:
                stats.skipped_examples.append(rel)
            continue
        yield {"text": text, "src": rel}


# Read-only so that no code path can register a source at run time.
SOURCES: Mapping[str, Source] = MappingProxyType(
    {
        "stdlib": Source(
            name="stdlib",
            description="the .py files of this Python's standard library (~1.8k docs, ~30 MB)",
            default_nchunks=8,
            iter_documents=iter_stdlib_documents,
        ),
    }
)


@dataclass
class PrepArgs:
    dataset: str
    memory_gb: float
    data_dir: str
    seed: int
    nchunks: int


def parse_args(argv: Optional[list[str]]) -> PrepArgs:
    known = ", ".join(SOURCES)
    parser = argparse.ArgumentParser(
        description="Download/prepare a dataset into shuffled JSONL chunks for training.",
        epilog=(
            f"Output: DATA_DIR/<dataset>_shuffled/<dataset>.chunk.XX.jsonl (XX = 00..NCHUNKS-1) "
            f"and <dataset>.val.jsonl. Documents are shuffled with --seed, dealt round-robin to "
            f"the chunks, and the first ceil({VAL_FRACTION:.0%} of documents / NCHUNKS) lines of "
            f"every chunk are moved to the val file. Known datasets: "
            + "; ".join(f"{s.name}: {s.description}" for s in SOURCES.values())
        ),
    )
    parser.add_argument("dataset", help=f"dataset name; known: {known}")
    parser.add_argument("memory", type=float, help="GB (1e9 bytes) of RAM the in-memory shuffle may use")
    parser.add_argument("--data_dir", default="./data", help="where <dataset>_shuffled/ is written")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed; same seed -> identical files")
    parser.add_argument(
        "--nchunks",
        type=int,
        default=None,
        help="number of chunk files (default per dataset: "
        + ", ".join(f"{s.name} {s.default_nchunks}" for s in SOURCES.values())
        + "; hub datasets will default to 32)",
    )
    ns = parser.parse_args(argv)
    # Validate everything before any file is touched; parser.error exits with code 2.
    if ns.dataset not in SOURCES:
        parser.error(f"unknown dataset {ns.dataset!r}; known datasets: {known}")
    if not (ns.memory > 0 and math.isfinite(ns.memory)):
        parser.error(f"MEMORY must be a positive number of GB, got {ns.memory}")
    nchunks = SOURCES[ns.dataset].default_nchunks if ns.nchunks is None else ns.nchunks
    if nchunks < 1:
        parser.error(f"--nchunks must be >= 1, got {nchunks}")
    return PrepArgs(ns.dataset, ns.memory, ns.data_dir, ns.seed, nchunks)


def load_documents(source: Source, memory_gb: float) -> tuple[list[str], int, SourceStats]:
    """All documents as JSON lines, plus their UTF-8 text size; stops early past MEMORY."""
    stats = SourceStats()
    lines: list[str] = []
    held = 0
    text_bytes = 0
    limit = memory_gb * GB
    for doc in source.iter_documents(stats):
        # ensure_ascii: the lines are pure ASCII, so no reader can split a document on
        # a Unicode line separator (U+2028, U+0085) inside its text.
        line = json.dumps(doc, ensure_ascii=True)
        lines.append(line)
        text_bytes += len(doc["text"].encode("utf-8"))
        held += sys.getsizeof(line) + 8  # the string plus its list slot
        if held > limit:
            raise PrepError(
                f"the in-memory shuffle of {source.name!r} needs more than MEMORY={memory_gb:g} GB "
                f"(passed {held / GB:.3f} GB after {len(lines)} documents); raise MEMORY "
                f"(a disk-based shuffle for larger corpora comes later)"
            )
    return lines, text_bytes, stats


def plan_split(n_docs: int, nchunks: int, name: str) -> int:
    """Documents per chunk moved into the val file; every chunk keeps at least one."""
    val_per_chunk = max(1, math.ceil(VAL_FRACTION * n_docs / nchunks))
    smallest_chunk = n_docs // nchunks
    if smallest_chunk < val_per_chunk + 1:
        raise PrepError(
            f"{name}: {n_docs} documents cannot fill {nchunks} chunks plus {val_per_chunk} val "
            f"documents each; use a smaller --nchunks (at most {max(1, n_docs // (val_per_chunk + 1))})"
        )
    return val_per_chunk


def chunk_name(name: str, i: int) -> str:
    return f"{name}.chunk.{i:02d}.jsonl"


def tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def is_our_tmp(filename: str, name: str) -> bool:
    return re.fullmatch(
        rf"\.({re.escape(name)}\.(chunk\.\d+|val)\.jsonl|{re.escape(MARKER)})\.tmp-\d+", filename
    ) is not None


def write_atomic(final: Path, data: bytes) -> None:
    """Write `data` to `final` so that a reader sees either nothing or the whole file."""
    tmp = tmp_name(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_existing(out_dir: Path, args: PrepArgs, planned: set[str]) -> Optional[dict]:
    """The marker if the output is already finished; refuses to mix runs."""
    marker = out_dir / MARKER
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PrepError(f"{marker}: unreadable marker ({e}); remove {out_dir} to prepare again")
        return done
    if out_dir.exists():
        # Chunks that this run will not write (left by an interrupted run with other
        # arguments, or the user's own) would be read as training data; refuse.
        name = args.dataset
        strays = sorted(
            p.name
            for p in out_dir.iterdir()
            if p.name.startswith(f"{name}.") and p.name.endswith(".jsonl") and p.name not in planned
        )
        if strays:
            raise PrepError(
                f"{out_dir} holds {', '.join(strays[:5])}{' ...' if len(strays) > 5 else ''} that this "
                f"run would not overwrite and that training would read; remove them or use another --data_dir"
            )
    return None


def prepare(args: PrepArgs) -> int:
    source = SOURCES[args.dataset]
    out_dir = Path(args.data_dir) / f"{source.name}_shuffled"
    planned = {chunk_name(source.name, i) for i in range(args.nchunks)} | {f"{source.name}.val.jsonl"}

    # Fast path before reading the corpus: a finished output with the same arguments.
    done = check_existing(out_dir, args, planned)
    if done is not None:
        # MEMORY only bounds RAM and data_dir is where we are; the rest defines the output.
        wanted = {"dataset": args.dataset, "seed": args.seed, "nchunks": args.nchunks}
        found = {k: done.get(k) for k in wanted}
        if found != wanted:
            raise PrepError(
                f"{out_dir} already holds a finished preparation with {found}, not {wanted}; "
                f"use another --data_dir or remove {out_dir} first"
            )
        print(f"already prepared: {out_dir} ({done.get('n_docs')} documents; marker {out_dir / MARKER})")
        print(f"next: {NEXT_COMMAND}")
        return 0

    t0 = time.perf_counter()
    lines, text_bytes, stats = load_documents(source, args.memory_gb)
    if not lines:
        raise PrepError(f"{source.name}: the source yielded no documents (root {stats.root or '?'})")
    t_read = time.perf_counter() - t0

    # Sorted input + seeded shuffle: the output depends on the seed and the corpus only.
    random.Random(args.seed).shuffle(lines)
    val_per_chunk = plan_split(len(lines), args.nchunks, source.name)
    chunks = [lines[i :: args.nchunks] for i in range(args.nchunks)]
    val = [line for c in chunks for line in c[:val_per_chunk]]
    chunks = [c[val_per_chunk:] for c in chunks]

    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.iterdir():
        if is_our_tmp(p.name, source.name):  # debris of a killed earlier run of this script
            p.unlink()
    files: dict[str, dict] = {}
    for fname, docs in [(chunk_name(source.name, i), c) for i, c in enumerate(chunks)] + [
        (f"{source.name}.val.jsonl", val)
    ]:
        data = ("\n".join(docs) + "\n").encode("ascii")
        write_atomic(out_dir / fname, data)
        files[fname] = {"docs": len(docs), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    out_bytes = sum(f["bytes"] for f in files.values())
    marker = {
        "dataset": source.name,
        "seed": args.seed,
        "nchunks": args.nchunks,
        "val_docs_per_chunk": val_per_chunk,
        "n_docs": len(lines),
        "n_val": len(val),
        "n_skipped": stats.n_skipped,
        "text_bytes": text_bytes,
        "source_root": stats.root,
        "python": sys.version.split()[0],
        "args": asdict(args),
        "files": files,
    }
    write_atomic(out_dir / MARKER, (json.dumps(marker, indent=2) + "\n").encode("utf-8"))
    elapsed = time.perf_counter() - t0

    print(f"source: {source.description}; root {stats.root}")
    if stats.n_skipped:
        print(
            f"skipped {stats.n_skipped} files not readable as UTF-8 "
            f"(e.g. {', '.join(stats.skipped_examples)})"
        )
    print(
        f"prepared {len(lines)} documents ({text_bytes / 1e6:.1f} MB of text) into {out_dir}: "
        f"{args.nchunks} chunks {chunk_name(source.name, 0)} .. {chunk_name(source.name, args.nchunks - 1)} "
        f"({len(lines) - len(val)} docs) + {source.name}.val.jsonl ({len(val)} docs)"
    )
    print(
        f"wrote {out_bytes / 1e6:.1f} MB in {elapsed:.2f} s ({out_bytes / 1e6 / elapsed:.1f} MB/s; "
        f"reading took {t_read:.2f} s); seed {args.seed}; marker {out_dir / MARKER}"
    )
    print(f"next: {NEXT_COMMAND}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return prepare(args)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
