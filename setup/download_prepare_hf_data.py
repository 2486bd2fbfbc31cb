"""Download a pretraining corpus and prepare it as shuffled JSONL chunks plus a validation file.

    python setup/download_prepare_hf_data.py fineweb_edu <MEMORY> --data_dir ./data --seed 42
    python setup/download_prepare_hf_data.py fineweb_edu_10bt 8 --data_dir ./data --nchunks 32
    python setup/download_prepare_hf_data.py dclm_baseline_1.0 8 --src_dir /datasets/dclm   # downloaded elsewhere
    python setup/download_prepare_hf_data.py HuggingFaceTB/smollm-corpus 8 --allow_patterns 'fineweb-edu-dedup/*'
    python setup/download_prepare_hf_data.py my_corpus 4 --src_dir ./my_files   # parquet/jsonl/jsonl.zst/txt
    python setup/download_prepare_hf_data.py stdlib 2 --data_dir ./data          # this Python's stdlib, offline

Output: DATA_DIR/<name>_shuffled/<name>.chunk.XX.jsonl (XX = 00..NCHUNKS-1) and <name>.val.jsonl,
one ensure_ascii JSON object per line, and a `.done` marker (files, docs, bytes, sha256, and a digest
of the source files' (path, size, mtime)) written last: `.done` present <=> the output is complete.
A re-run whose source files have changed since (added, removed, resized or touched) prepares again;
the old output stays in place until the new chunks are renamed over it.

Pipeline:
  1. download  huggingface_hub.snapshot_download into DATA_DIR/<name>, with retries (skipped with
               --src_dir, for local datasets and once recorded as finished).
  2. pass 1    stream every document of the sorted source files (parquet rows via pyarrow batches,
               JSONL lines, zstd-compressed JSONL, whole .txt files), validate it with the trainer's
               own parser (lingua.data.document_segments; a record it rejects stops the run, naming
               the file and line or row), and append its JSON line to one of K bucket files chosen by
               a RNG seeded with (seed, file index). K comes from the estimated data size and MEMORY
               so that a bucket fits in memory. The state (bucket sizes, counts, fingerprints of the
               files read) is saved after every source file, so a killed run resumes; a finished
               pass 1 is reused only over the same files.
  3. pass 2    for each bucket in order: load it (or, if it would not fit in MEMORY after all, split
               it on disk into sub-buckets, recursively), shuffle it with a RNG seeded with (seed,
               bucket) and deal its lines round-robin over the chunks with a global counter. The
               first lines of every chunk go to the val file. A random bucket per document followed
               by a uniform shuffle of each bucket is a uniform permutation of the whole corpus, and
               only one bucket is in memory at a time, so corpora larger than RAM shuffle correctly.
  4. commit    chunks are written as hidden temp files, fsynced, renamed into place together, then
               `.done` is written and the work directory (our own temp data) is removed.

The output is a function of the source files, --seed, --nchunks and the bucket plan (K and the
memory budget, recorded in `.done`), so the same command on the same files gives identical files.
Disk: the buckets need about as much space as the JSONL output, until the end of the run.
"""

import argparse
import fnmatch
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Optional

from tqdm import tqdm

# Run as `python setup/download_prepare_hf_data.py`: make the repository's lingua package importable,
# so that records are checked by the very parser the trainer will read them with.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua.data import DataError, document_segments  # noqa: E402

# Fraction of documents moved out of the chunks into <name>.val.jsonl, taken as the first lines
# of every chunk so that each chunk contributes equally; capped like Meta Lingua's k_validation.
VAL_FRACTION = 0.02
VAL_MAX_PER_CHUNK = 10_000
NEXT_COMMAND = "python -m apps.main.train config=apps/main/configs/debug.yaml"
MARKER = ".done"
WORK_DIR = ".prep-work"  # hidden and not *.jsonl, so no reader takes it for data
DOWNLOAD_MARKER = ".prep-download.json"
GB = 1e9
DEFAULT_NCHUNKS = 32
# One file descriptor per bucket is open during pass 1; beyond this, pass 2 splits instead.
MAX_BUCKETS = 256
# Python's per-line cost of a loaded bucket: a bytes object (33 B header) plus its list slot,
# rounded up. Used to decide whether a bucket fits in the memory budget.
LINE_OVERHEAD = 64
MAX_SPLIT_DEPTH = 32
DOWNLOAD_ATTEMPTS = 5
RETRY_BASE_DELAY_S = 2.0  # doubled after every failed attempt

PARQUET, JSONL, JSONL_ZST, TXT = ".parquet", ".jsonl", ".jsonl.zst", ".txt"
DATA_SUFFIXES = (PARQUET, JSONL_ZST, JSONL, TXT)
# What a hub id downloads by default: the data files, not READMEs or licence .txt files.
HUB_DATA_PATTERNS = ("*.parquet", "*.jsonl", "*.jsonl.zst")
# The record shapes the trainer reads: {"text"}, {"input","output"}, {"prompt","response"}, chats.
RECORD_SHAPES = "a string 'text', strings 'input'+'output' or 'prompt'+'response', or a list 'messages'/'conversations'"


class PrepError(Exception):
    """A failure the user can act on; printed without a traceback, exit code 1."""


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class HubDataset:
    """A hub dataset by short name, as Meta Lingua names them."""

    repo_id: str
    # Files to download, and to read from a --src_dir, as hub allow_patterns (fnmatch on the
    # path relative to the repo root; `*` crosses `/`).
    patterns: tuple[str, ...]
    description: str


HUB_DATASETS: Mapping[str, HubDataset] = MappingProxyType(
    {
        "fineweb_edu": HubDataset("HuggingFaceFW/fineweb-edu", ("data/*.parquet",), "FineWeb-Edu, all dumps"),
        "fineweb_edu_10bt": HubDataset("HuggingFaceFW/fineweb-edu", ("sample/10BT/*",), "FineWeb-Edu 10BT sample"),
        "dclm_baseline_1.0": HubDataset("mlfoundations/dclm-baseline-1.0", ("*.jsonl.zst",), "DCLM baseline 1.0"),
        "dclm_baseline_1.0_10prct": HubDataset(
            "mlfoundations/dclm-baseline-1.0", ("global-shard_01_of_10/*.jsonl.zst",), "DCLM baseline 1.0, first 10%"
        ),
    }
)
STDLIB = "stdlib"
KNOWN = (STDLIB, *HUB_DATASETS)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
LOCAL_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


@dataclass
class PrepArgs:
    dataset: str
    memory_gb: float
    data_dir: str
    seed: int
    nchunks: int
    src_dir: Optional[str] = None
    allow_patterns: Optional[list[str]] = None
    api_key: Optional[str] = None


@dataclass(frozen=True)
class Job:
    """What one run prepares, resolved from the arguments."""

    name: str  # output name: DATA_DIR/<name>_shuffled/<name>.chunk.XX.jsonl
    label: str  # for messages
    root: Optional[Path]  # where the source files are (None: the stdlib corpus)
    patterns: Optional[tuple[str, ...]]  # which files under root to read (None: all data files)
    repo_id: Optional[str] = None  # download into root first


def resolve_job(args: PrepArgs) -> Job:
    data_dir = Path(args.data_dir)
    src = Path(args.src_dir) if args.src_dir else None
    override = tuple(args.allow_patterns) if args.allow_patterns else None
    if args.dataset == STDLIB:
        return Job(STDLIB, "the .py files of this Python's standard library", None, None)
    if args.dataset in HUB_DATASETS:
        hub = HUB_DATASETS[args.dataset]
        patterns = override or hub.patterns
        if src is not None:
            return Job(args.dataset, f"{args.dataset} ({hub.repo_id}) from {src}", src, patterns)
        return Job(args.dataset, f"{args.dataset} ({hub.repo_id})", data_dir / args.dataset, patterns, hub.repo_id)
    if "/" in args.dataset:
        name = args.dataset.replace("/", "_")
        patterns = override or HUB_DATA_PATTERNS
        if src is not None:
            return Job(name, f"{args.dataset} from {src}", src, patterns)
        return Job(name, args.dataset, data_dir / name, patterns, args.dataset)
    assert src is not None, "parse_args guarantees --src_dir for local datasets"
    return Job(args.dataset, f"local dataset {args.dataset} from {src}", src, override)


def parse_args(argv: Optional[list[str]]) -> PrepArgs:
    known = ", ".join(KNOWN)
    parser = argparse.ArgumentParser(
        description="Download/prepare a dataset into shuffled JSONL chunks for training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Output: DATA_DIR/<name>_shuffled/<name>.chunk.XX.jsonl and <name>.val.jsonl; the first "
            f"ceil({VAL_FRACTION:.0%} of documents / NCHUNKS) lines (at most {VAL_MAX_PER_CHUNK}) of every chunk "
            f"go to the val file.\nKnown datasets:\n  {STDLIB}: this Python's standard library (offline)\n"
            + "\n".join(f"  {k}: {d.description} ({d.repo_id}, {' '.join(d.patterns)})"
                        for k, d in HUB_DATASETS.items())
            + "\nAny hub dataset id owner/name works too; any other name needs --src_dir."
        ),
    )
    parser.add_argument("dataset", help=f"{known}, a hub dataset id owner/name, or a name for --src_dir")
    parser.add_argument("memory", type=float,
                        help="GB (1e9 bytes) of RAM the shuffle may use; bigger data spills to disk")
    parser.add_argument("--data_dir", default="./data",
                        help="downloads go to DATA_DIR/<name>, output to DATA_DIR/<name>_shuffled/")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed; same seed and files -> identical output")
    parser.add_argument("--nchunks", type=int, default=None,
                        help=f"number of chunk files (default {DEFAULT_NCHUNKS}; {STDLIB}: 8)")
    parser.add_argument("--src_dir", default=None,
                        help="read the dataset's files from this directory instead of downloading")
    parser.add_argument("--allow_patterns", nargs="+", default=None,
                        help="hub-style patterns of the files to download/read (default: per dataset)")
    parser.add_argument("--api_key", default=None, help="hub token for gated datasets (default: $HF_TOKEN)")
    ns = parser.parse_args(argv)
    # Validate everything before any file is touched; parser.error exits with code 2.
    if ns.dataset == STDLIB and (ns.src_dir or ns.allow_patterns):
        parser.error(f"{STDLIB} is built in; it takes no --src_dir or --allow_patterns")
    if ns.dataset not in KNOWN:
        if "/" in ns.dataset:
            if not HUB_ID.fullmatch(ns.dataset):
                parser.error(f"{ns.dataset!r} is not a hub dataset id of the form owner/name")
        elif ns.src_dir is None:
            parser.error(f"unknown dataset {ns.dataset!r}; known datasets: {known}. For other data pass "
                         f"--src_dir DIR (a directory of parquet/jsonl/jsonl.zst/txt files) or a hub id owner/name")
        elif not LOCAL_NAME.fullmatch(ns.dataset):
            parser.error(f"dataset name {ns.dataset!r}: use letters, digits, '_', '-', '.' (it names the output files)")
    if not (ns.memory > 0 and math.isfinite(ns.memory)):
        parser.error(f"MEMORY must be a positive number of GB, got {ns.memory}")
    nchunks = (8 if ns.dataset == STDLIB else DEFAULT_NCHUNKS) if ns.nchunks is None else ns.nchunks
    if nchunks < 1:
        parser.error(f"--nchunks must be >= 1, got {nchunks}")
    api_key = ns.api_key or os.environ.get("HF_TOKEN") or None
    return PrepArgs(ns.dataset, ns.memory, ns.data_dir, ns.seed, nchunks, ns.src_dir, ns.allow_patterns, api_key)


# ----------------------------------------------------------------------------- download


def download(repo_id: str, local_dir: Path, patterns: tuple[str, ...], token: Optional[str],
             sleep: Callable[[float], None] = time.sleep) -> None:
    """snapshot_download into local_dir, retried with exponential backoff; recorded when finished."""
    record = {"repo_id": repo_id, "allow_patterns": list(patterns)}
    marker = local_dir / DOWNLOAD_MARKER
    if marker.exists() and read_json(marker) == record:
        print(f"download: {repo_id} already in {local_dir}")
        return
    from huggingface_hub import errors, snapshot_download  # lazy: only hub runs need it

    # Retrying cannot fix a wrong name, a wrong revision or a missing permission.
    permanent = tuple(getattr(errors, n) for n in ("RepositoryNotFoundError", "RevisionNotFoundError",
                                                   "HFValidationError") if hasattr(errors, n))
    print(f"download: {repo_id} ({' '.join(patterns)}) -> {local_dir}")
    local_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            snapshot_download(repo_id, repo_type="dataset", local_dir=str(local_dir),
                              allow_patterns=list(patterns), token=token)
            break
        except permanent as e:
            raise PrepError(f"download of {repo_id} failed: {e} (gated or private datasets need --api_key "
                            f"or HF_TOKEN)") from None
        except Exception as e:  # network errors come in many types; all are worth a retry
            if attempt == DOWNLOAD_ATTEMPTS:
                raise PrepError(f"download of {repo_id} failed {attempt} times, last: {type(e).__name__}: {e}; "
                                f"re-run to continue (finished files are kept)") from None
            delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
            print(f"download attempt {attempt}/{DOWNLOAD_ATTEMPTS} failed ({type(e).__name__}: {e}); "
                  f"retrying in {delay:g} s", file=sys.stderr)
            sleep(delay)
    write_atomic(marker, json.dumps(record).encode())


# ----------------------------------------------------------------------------- source files


@dataclass(frozen=True)
class SourceFile:
    """One unit of pass 1 (a data file, or the whole stdlib corpus) and what is known before reading it."""

    rel: str
    path: Optional[Path]
    size: int  # bytes on disk: the progress bar's unit
    est_bytes: int  # estimated in-memory size of its JSON lines: chooses K
    # (rel, size, mtime_ns): a resumed pass 1 checks that the files it read did not change since, and
    # `.done` records the digest of all of them, so that a re-run sees added or edited sources.
    fingerprint: tuple
    rows: int = 0  # parquet only


def data_suffix(name: str) -> Optional[str]:
    return next((s for s in DATA_SUFFIXES if name.endswith(s)), None)


def list_source_files(job: Job) -> list[SourceFile]:
    """The data files under job.root matching its patterns, sorted by relative path, checked."""
    return [inspect_file(job.root, rel) for rel in list_source_rels(job)]


def list_source_rels(job: Job) -> list[str]:
    """Relative paths of the data files under job.root matching its patterns, sorted."""
    root = job.root
    assert root is not None
    if not root.is_dir():
        what = "--src_dir" if job.repo_id is None else "download directory"
        raise PrepError(f"{what} {root} does not exist or is not a directory")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden entries are tooling (the hub's .cache/, our markers), never data.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            rel = (Path(dirpath) / f).relative_to(root).as_posix()
            if f.startswith(".") or data_suffix(f) is None:
                continue
            if job.patterns is None or any(fnmatch.fnmatchcase(rel, p) for p in job.patterns):
                rels.append(rel)
    if not rels:
        pats = " ".join(job.patterns) if job.patterns else "*"
        raise PrepError(f"{root}: no data files ({', '.join('*' + s for s in DATA_SUFFIXES)}) "
                        f"matching {pats}")
    return sorted(rels)


def file_fingerprint(rel: str, st: os.stat_result) -> tuple:
    return rel, st.st_size, st.st_mtime_ns


def current_fingerprints(job: Job) -> list[list]:
    """The fingerprints of the job's sources as they are now, from stat() alone (no file is read)."""
    if job.root is None:
        return [list(stdlib_unit().fingerprint)]
    return [list(file_fingerprint(rel, (job.root / rel).stat())) for rel in list_source_rels(job)]


def sources_digest(fingerprints: list[list]) -> str:
    return hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()


def inspect_file(root: Path, rel: str) -> SourceFile:
    """Size, fingerprint and size estimate; parquet and zstd files are checked here, before any output."""
    path = root / rel
    st = path.stat()
    fp = file_fingerprint(rel, st)
    suffix = data_suffix(rel)
    if suffix == PARQUET:
        meta = parquet_metadata(path)
        # Uncompressed column bytes are close to the JSON size; plus the per-line overhead.
        est = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return SourceFile(rel, path, st.st_size, est + LINE_OVERHEAD * meta.num_rows, fp, meta.num_rows)
    if suffix == JSONL_ZST:
        with open(path, "rb") as f:
            if st.st_size and f.read(4) != b"\x28\xb5\x2f\xfd":
                raise PrepError(f"{path}: not a zstandard file (bad magic number)")
        return SourceFile(rel, path, st.st_size, 5 * st.st_size, fp)  # text compresses ~4-5x
    if suffix == TXT:
        return SourceFile(rel, path, st.st_size, st.st_size * 11 // 10 + LINE_OVERHEAD, fp)
    return SourceFile(rel, path, st.st_size, st.st_size, fp)


def parquet_metadata(path: Path):
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean unreadable
        raise PrepError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    names = set(meta.schema.to_arrow_schema().names)  # top-level columns (schema.names lists leaves)
    if not any(cols <= names for cols in ({"text"}, {"input", "output"}, {"prompt", "response"},
                                          {"messages"}, {"conversations"})):
        raise PrepError(f"{path}: row 1: no column for {RECORD_SHAPES} (columns: {', '.join(sorted(names))})")
    return meta


def stdlib_unit() -> SourceFile:
    root = Path(sysconfig.get_paths()["stdlib"])
    stats = [p.stat() for p in stdlib_paths(root)]
    size = sum(st.st_size for st in stats)
    # Another Python (or an edited stdlib) is another corpus: file count, bytes and newest mtime.
    fp = (STDLIB, len(stats), size, max((st.st_mtime_ns for st in stats), default=0))
    return SourceFile(STDLIB, None, size, size + LINE_OVERHEAD * 2000, fp)


def stdlib_paths(root: Path) -> list[Path]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed third-party packages live under the stdlib dir but are not the stdlib,
        # and would make the corpus depend on what happens to be pip-installed.
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


# ----------------------------------------------------------------------------- readers


class ByteProgress:
    """Feeds a tqdm bar in steps of ~1 MB, so per-line reads do not pay for bar updates."""

    def __init__(self, bar: tqdm):
        self.bar, self.pending = bar, 0

    def add(self, n: float) -> None:
        self.pending += n
        if self.pending >= 1 << 20:
            self.bar.update(int(self.pending))
            self.pending -= int(self.pending)

    def set_total_done(self, done: int) -> None:
        self.pending = 0
        self.bar.update(done - self.bar.n)


@dataclass
class ReadStats:
    n_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def check_record(doc: object, where: Callable[[], str]) -> None:
    """PrepError naming where() (the source file and line or row) unless the trainer accepts `doc`.

    The trainer's own parser decides: a record it would reject (an empty chat, no assistant turn,
    an unknown role, a half pair) would otherwise stop a training run hours in, at a chunk line
    that no longer says which source line it came from.
    """
    try:
        document_segments(doc, "")
    except DataError:
        # Parsed again, for the message only: naming the place of every good line would cost
        # about as much as the check itself.
        try:
            document_segments(doc, where())
        except DataError as e:
            raise PrepError(str(e)) from None


def to_line(doc: dict) -> bytes:
    # ensure_ascii: the lines are pure ASCII, so no reader can split a document on a Unicode
    # line separator (U+2028, U+0085) inside its text. default=str: parquet timestamps etc.
    return json.dumps(doc, ensure_ascii=True, default=str).encode("ascii") + b"\n"


def jsonl_line(raw: bytes, where: Callable[[], str]) -> Optional[bytes]:
    """The output line for one input JSONL line (None for a blank line), or PrepError."""
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise PrepError(f"{where()}: not valid JSON ({e})") from None
    check_record(doc, where)
    # An ASCII line is already what to_line would write, modulo spacing: keep the user's bytes.
    return raw.strip() + b"\n" if raw.isascii() else to_line(doc)


def read_jsonl(src: SourceFile, progress: ByteProgress, budget: int) -> Iterator[bytes]:
    with open(src.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            progress.add(len(raw))
            line = jsonl_line(raw, lambda: f"{src.path}:{lineno}")
            if line is not None:
                yield line


def read_jsonl_zst(src: SourceFile, progress: ByteProgress, budget: int) -> Iterator[bytes]:
    import zstandard

    with open(src.path, "rb") as raw_file:
        reader = zstandard.ZstdDecompressor().stream_reader(raw_file)
        # newline="\n": split on \n only, as plain JSONL does, and translate nothing.
        text = io.TextIOWrapper(reader, encoding="utf-8", newline="\n")
        lineno, last_pos = 0, 0
        while True:
            try:
                raw = text.readline()
            except UnicodeDecodeError as e:
                raise PrepError(f"{src.path}:{lineno + 1}: not UTF-8 ({e})") from None
            except zstandard.ZstdError as e:
                raise PrepError(f"{src.path}: corrupt zstandard data near line {lineno + 1} ({e})") from None
            if not raw:
                break
            lineno += 1
            pos = raw_file.tell()
            progress.add(pos - last_pos)
            last_pos = pos
            line = jsonl_line(raw.encode("utf-8"), lambda: f"{src.path}:{lineno}")
            if line is not None:
                yield line


def read_parquet(src: SourceFile, progress: ByteProgress, budget: int) -> Iterator[bytes]:
    import pyarrow.parquet as pq

    # Batches of about budget/8 bytes of Python objects (pyarrow itself buffers a row group).
    row_bytes = max(1, src.est_bytes // max(1, src.rows))
    batch_rows = int(min(8192, max(1, budget // 8 // row_bytes)))
    row = 0
    try:
        batches = pq.ParquetFile(src.path).iter_batches(batch_size=batch_rows)
        for batch in batches:
            for doc in batch.to_pylist():
                row += 1
                check_record(doc, lambda: f"{src.path}: row {row}")
                yield to_line(doc)
            progress.add(src.size * batch.num_rows / max(1, src.rows))
    except PrepError:
        raise
    except Exception as e:  # a corrupt page shows up only when read
        raise PrepError(f"{src.path}: unreadable parquet near row {row + 1} ({type(e).__name__}: {e})") from None


def read_txt(src: SourceFile, progress: ByteProgress, budget: int) -> Iterator[bytes]:
    try:
        text = src.path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepError(f"{src.path}: not UTF-8 text ({e})") from None
    progress.add(src.size)
    yield to_line({"text": text})


def read_stdlib(stats: ReadStats) -> Callable[[SourceFile, ByteProgress, int], Iterator[bytes]]:
    def read(src: SourceFile, progress: ByteProgress, budget: int) -> Iterator[bytes]:
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in stdlib_paths(root):
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            progress.add(len(data))
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                # The stdlib ships deliberately mis-encoded test files; they are not text.
                stats.n_skipped += 1
                if len(stats.skipped_examples) < 3:
                    stats.skipped_examples.append(rel)
                continue
            yield to_line({"text": text, "src": rel})

    return read


def reader_for(src: SourceFile, stdlib_stats: ReadStats) -> Callable[[SourceFile, ByteProgress, int], Iterator[bytes]]:
    if src.path is None:
        return read_stdlib(stdlib_stats)
    return {PARQUET: read_parquet, JSONL: read_jsonl, JSONL_ZST: read_jsonl_zst, TXT: read_txt}[data_suffix(src.rel)]


# ----------------------------------------------------------------------------- files on disk


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_dataclass(cls, path: Path):
    """An instance of `cls` from a JSON file we wrote, or None if missing or of another version."""
    d = read_json(path)
    try:
        return cls(**d) if isinstance(d, dict) else None
    except TypeError:
        return None


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BucketWriter:
    """Appends lines to many files through one shared buffer of at most `buffer_bytes`.

    A buffer per file (what open() gives) would cost K x 8 KB however small MEMORY is.
    """

    def __init__(self, paths: list[Path], buffer_bytes: int):
        self.files = [open(p, "ab", buffering=0) for p in paths]
        self.pending: list[list[bytes]] = [[] for _ in paths]
        self.pending_bytes = 0
        self.buffer_bytes = buffer_bytes
        self.lines = [0] * len(paths)

    def add(self, k: int, line: bytes) -> None:
        self.pending[k].append(line)
        self.lines[k] += 1
        self.pending_bytes += len(line)
        if self.pending_bytes >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for f, lines in zip(self.files, self.pending):
            if lines:
                data = memoryview(b"".join(lines))
                while data:  # a raw write may be partial
                    data = data[f.write(data):]
                lines.clear()
        self.pending_bytes = 0

    def sync(self) -> list[int]:
        """Flush and fsync everything; the files' sizes, now durable."""
        self.flush()
        for f in self.files:
            os.fsync(f.fileno())
        return [os.fstat(f.fileno()).st_size for f in self.files]

    def close(self) -> None:
        for f in self.files:
            f.close()


# ----------------------------------------------------------------------------- pass 1


@dataclass
class Plan:
    """Fixed when pass 1 starts; a resumed run reuses it so that the output does not change."""

    name: str
    seed: int
    nbuckets: int
    budget: int  # bytes of memory the shuffle's buffers may use
    memory_gb: float
    files: list[str]  # relative paths of the source files, in reading order


@dataclass
class Pass1State:
    """Saved after every source file: what a resumed pass 1 starts from."""

    files_done: int = 0
    fingerprints: list = field(default_factory=list)
    bucket_bytes: list[int] = field(default_factory=list)
    bucket_lines: list[int] = field(default_factory=list)
    n_docs: int = 0
    json_bytes: int = 0
    source_bytes: int = 0
    n_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def choose_nbuckets(est_bytes: int, budget: int) -> int:
    # A quarter of the budget per bucket leaves room for chance variation in bucket sizes and
    # for the output buffers; a bucket that still ends up too big is split in pass 2.
    return int(min(MAX_BUCKETS, max(1, math.ceil(est_bytes / (budget / 4)))))


def bucket_path(work: Path, k: int) -> Path:
    return work / f"bucket-{k:03d}.lines"


def save_state(work: Path, state: Pass1State) -> None:
    write_atomic(work / "state.json", json.dumps(asdict(state)).encode())


def start_pass1(work: Path, plan: Plan) -> Pass1State:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_atomic(work / "plan.json", json.dumps(asdict(plan)).encode())
    for k in range(plan.nbuckets):
        bucket_path(work, k).touch()
    state = Pass1State(bucket_bytes=[0] * plan.nbuckets, bucket_lines=[0] * plan.nbuckets)
    save_state(work, state)
    return state


def resume_pass1(work: Path, plan: Plan, files: list[SourceFile]) -> Optional[tuple[Plan, Pass1State]]:
    """The saved plan and state of an interrupted pass 1 over the same files, buckets cut back to it."""
    old, state = load_dataclass(Plan, work / "plan.json"), load_dataclass(Pass1State, work / "state.json")
    if old is None or state is None:
        return None
    if (old.name, old.seed, old.files) != (plan.name, plan.seed, plan.files):
        return None
    if [list(f.fingerprint) for f in files[: state.files_done]] != state.fingerprints:
        return None  # a file read before the interruption has changed since
    # Lines of the interrupted file past the saved sizes are dropped; it is read again.
    for k, size in enumerate(state.bucket_bytes):
        p = bucket_path(work, k)
        if not p.exists() or p.stat().st_size < size:
            return None
        os.truncate(p, size)
    return old, state


def run_pass1(work: Path, plan: Plan, state: Pass1State, files: list[SourceFile],
              stdlib_stats: ReadStats) -> Pass1State:
    """Stream the documents into the buckets; saves the state after every file."""
    writer = BucketWriter([bucket_path(work, k) for k in range(plan.nbuckets)], write_buffer(plan.budget))
    writer.lines = list(state.bucket_lines)
    done_bytes = sum(f.size for f in files[: state.files_done])
    bar = progress_bar("pass 1/2 read", sum(f.size for f in files), done_bytes)
    progress = ByteProgress(bar)
    try:
        for i in range(state.files_done, len(files)):
            src = files[i]
            reader = reader_for(src, stdlib_stats)
            # One RNG per file, so a resumed run draws the same buckets for the files it reads.
            rng = random.Random(f"{plan.seed}:pass1:{i}")
            n, nbytes, k_max = 0, 0, plan.nbuckets
            for line in reader(src, progress, plan.budget):
                writer.add(rng.randrange(k_max) if k_max > 1 else 0, line)
                n += 1
                nbytes += len(line)
            state.bucket_bytes = writer.sync()
            state.bucket_lines = list(writer.lines)
            state.files_done = i + 1
            state.fingerprints.append(list(src.fingerprint))
            state.n_docs += n
            state.json_bytes += nbytes
            state.source_bytes += src.size
            state.n_skipped = stdlib_stats.n_skipped
            state.skipped_examples = stdlib_stats.skipped_examples
            save_state(work, state)
            done_bytes += src.size
            progress.set_total_done(done_bytes)
    finally:
        writer.close()
        bar.close()
    return state


def write_buffer(budget: int) -> int:
    return int(min(64 << 20, max(4096, budget // 8)))


def progress_bar(desc: str, total: int, initial: int = 0) -> tqdm:
    # Logs (not a terminal) get a line every 30 s instead of a redraw every 0.1 s.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                file=sys.stderr, mininterval=0.2 if interactive else 30, dynamic_ncols=interactive)


# ----------------------------------------------------------------------------- pass 2


class ChunkWriter:
    """Deals lines round-robin into NCHUNKS hidden temp files, the first positions into val."""

    def __init__(self, out_dir: Path, name: str, nchunks: int, val_per_chunk: int, budget: int):
        self.nchunks, self.val_per_chunk = nchunks, val_per_chunk
        self.finals = [out_dir / chunk_name(name, i) for i in range(nchunks)] + [out_dir / val_name(name)]
        buf = int(min(1 << 20, max(4096, budget // 8 // (nchunks + 1))))
        self.files = [open(tmp_name(p), "wb", buffering=buf) for p in self.finals]
        self.hashes = [hashlib.sha256() for _ in self.finals]
        self.docs = [0] * len(self.finals)
        self.bytes = [0] * len(self.finals)
        self.g = 0  # global document index in the shuffled order

    def deal(self, lines: list[bytes]) -> None:
        n, v = self.nchunks, self.val_per_chunk
        for line in lines:
            pos, c = divmod(self.g, n)
            # Position < v in its chunk: Meta Lingua's "first lines of every chunk" go to val.
            t = n if pos < v else c
            self.files[t].write(line)
            self.hashes[t].update(line)
            self.docs[t] += 1
            self.bytes[t] += len(line)
            self.g += 1

    def commit(self) -> dict[str, dict]:
        """fsync all temp files, then rename them into place together."""
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        # Replacing an older finished output: its marker goes first, so that no moment shows a
        # `.done` beside chunks it does not describe (a crash here leaves no marker: a re-run redoes it).
        out_dir = self.finals[0].parent
        if (out_dir / MARKER).exists():
            (out_dir / MARKER).unlink()
            fsync_dir(out_dir)
        for p in self.finals:
            os.replace(tmp_name(p), p)
        return {p.name: {"docs": d, "bytes": b, "sha256": h.hexdigest()}
                for p, d, b, h in zip(self.finals, self.docs, self.bytes, self.hashes)}

    def abort(self) -> None:
        for f, p in zip(self.files, self.finals):
            f.close()
            tmp_name(p).unlink(missing_ok=True)


def shuffle_bucket(path: Path, n_lines: int, nbytes: int, tag: str, plan: Plan, work: Path,
                   emit: Callable[[list[bytes]], None], depth: int = 0) -> None:
    """Shuffle one bucket in memory and emit it, or split it on disk first if it does not fit."""
    cost = nbytes + LINE_OVERHEAD * n_lines
    if cost <= plan.budget // 2 or n_lines <= 1 or depth >= MAX_SPLIT_DEPTH:
        with open(path, "rb") as f:
            lines = f.readlines()
        random.Random(f"{plan.seed}:bucket:{tag}").shuffle(lines)
        emit(lines)
        return
    # Too big (the size estimate was off, or K hit MAX_BUCKETS): the same random-bucket step
    # again, one level down, with its own seed. Correctness does not depend on the estimate.
    k = int(min(MAX_BUCKETS, max(2, math.ceil(cost / (plan.budget / 4)))))
    subs = [work / f"split-{tag}-{j:03d}.lines" for j in range(k)]
    for p in subs:
        p.unlink(missing_ok=True)
    rng = random.Random(f"{plan.seed}:split:{tag}")
    writer = BucketWriter(subs, write_buffer(plan.budget))
    try:
        with open(path, "rb") as f:
            for line in f:
                writer.add(rng.randrange(k), line)
        sizes = writer.sync()
    finally:
        writer.close()
    for j, p in enumerate(subs):
        shuffle_bucket(p, writer.lines[j], sizes[j], f"{tag}.{j}", plan, work, emit, depth + 1)
        p.unlink()


def run_pass2(work: Path, plan: Plan, state: Pass1State, out_dir: Path, nchunks: int, val_per_chunk: int) -> dict:
    for p in work.glob("split-*"):  # sub-buckets of a killed earlier pass 2
        p.unlink()
    writer = ChunkWriter(out_dir, plan.name, nchunks, val_per_chunk, plan.budget)
    bar = progress_bar("pass 2/2 shuffle", sum(state.bucket_bytes))
    try:
        for k in range(plan.nbuckets):
            shuffle_bucket(bucket_path(work, k), state.bucket_lines[k], state.bucket_bytes[k], str(k), plan, work,
                           writer.deal)
            bar.update(state.bucket_bytes[k])
        assert writer.g == state.n_docs, (writer.g, state.n_docs)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


# ----------------------------------------------------------------------------- output


def chunk_name(name: str, i: int) -> str:
    return f"{name}.chunk.{i:02d}.jsonl"


def val_name(name: str) -> str:
    return f"{name}.val.jsonl"


def plan_split(n_docs: int, nchunks: int, name: str) -> int:
    """Documents per chunk moved into the val file; every chunk keeps at least one."""
    val_per_chunk = min(VAL_MAX_PER_CHUNK, max(1, math.ceil(VAL_FRACTION * n_docs / nchunks)))
    if n_docs // nchunks < val_per_chunk + 1:
        raise PrepError(
            f"{name}: {n_docs} documents cannot fill {nchunks} chunks plus {val_per_chunk} val "
            f"documents each; use a smaller --nchunks (at most {max(1, n_docs // (val_per_chunk + 1))}); "
            f"the shuffle's first pass is kept and will be reused"
        )
    return val_per_chunk


def check_existing(out_dir: Path, name: str, planned: set[str]) -> Optional[dict]:
    """The marker if the output is already finished; refuses to mix runs."""
    marker = out_dir / MARKER
    if marker.exists():
        done = read_json(marker)
        if done is None:
            raise PrepError(f"{marker}: unreadable marker; remove {out_dir} to prepare again")
        return done
    if out_dir.exists():
        # Chunks that this run will not write (left by an interrupted run with other
        # arguments, or the user's own) would be read as training data; refuse.
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


def check_same_args(out_dir: Path, done: dict, job: Job, args: PrepArgs) -> None:
    # MEMORY only bounds RAM and data_dir is where we are; the rest defines the output.
    wanted = {"dataset": job.name, "seed": args.seed, "nchunks": args.nchunks}
    found = {k: done.get(k) for k in wanted}
    if found != wanted:
        raise PrepError(
            f"{out_dir} already holds a finished preparation with {found}, not {wanted}; "
            f"use another --data_dir or remove {out_dir} first"
        )


def sources_changed(out_dir: Path, done: dict, job: Job) -> Optional[str]:
    """Why the finished output no longer matches the sources, or None if it does or cannot be told."""
    marker = out_dir / MARKER
    try:
        now = current_fingerprints(job)
    except PrepError as e:
        # Sources may be gone on purpose (a download deleted to free the disk): the output stands.
        print(f"warning: source files not checked against {marker}: {e}", file=sys.stderr)
        return None
    recorded = done.get("source_fingerprint")
    if recorded is None:
        print(f"warning: source files not checked: {marker} predates source fingerprints "
              f"(remove {out_dir} to prepare again from the current files)", file=sys.stderr)
        return None
    if recorded == sources_digest(now):
        return None
    return (f"the source files changed since {marker} was written ({done.get('source_files')} files then, "
            f"{len(now)} now: added, removed or modified)")


def already_prepared(out_dir: Path, done: dict) -> dict:
    for fname, info in done.get("files", {}).items():
        p = out_dir / fname
        if not p.exists() or p.stat().st_size != info.get("bytes"):
            raise PrepError(f"{p} is missing or changed since {out_dir / MARKER} was written; "
                            f"remove {out_dir} to prepare again")
    work = out_dir / WORK_DIR
    if work.exists():
        # Pass-1 work beside a current output is stale (a redo that failed, then the sources were
        # changed back), and its buckets would keep a corpus' worth of disk.
        shutil.rmtree(work)
        print(f"removed stale pass-1 work {work}")
    print(f"already prepared: {out_dir} ({done.get('n_docs')} documents; marker {out_dir / MARKER})")
    print(f"next: {NEXT_COMMAND}")
    return {"out_dir": str(out_dir), "already_prepared": True, "n_docs": done.get("n_docs"), "mb_per_s": None}


# ----------------------------------------------------------------------------- the run


def missing_dirs(path: Path) -> list[Path]:
    """path and its ancestors that do not exist yet, deepest first."""
    out = []
    while not path.exists():
        out.append(path)
        if path.parent == path:
            break
        path = path.parent
    return out


def load_pass1_done(work: Path, plan: Plan, files: list[SourceFile]) -> Optional[tuple[Plan, Pass1State]]:
    """A finished pass 1 of this dataset and seed over these very files: no reading needed again."""
    old, state = load_dataclass(Plan, work / "plan.json"), load_dataclass(Pass1State, work / "pass1.done")
    if old is None or state is None or (old.name, old.seed, old.files) != (plan.name, plan.seed, plan.files):
        return None
    if state.fingerprints != [list(f.fingerprint) for f in files]:
        return None  # a file was added, removed or edited since: its buckets are stale
    return old, state


def pass1_with_resume(job: Job, args: PrepArgs, out_dir: Path, work: Path) -> tuple[Plan, Pass1State, bool]:
    """Download, list and check the sources, then run (or resume) pass 1; (plan, state, resumed)."""
    if job.repo_id is not None:
        download(job.repo_id, job.root, job.patterns, args.api_key)
    files = [stdlib_unit()] if job.root is None else list_source_files(job)
    budget = int(args.memory_gb * GB)
    est = sum(f.est_bytes for f in files)
    plan = Plan(job.name, args.seed, choose_nbuckets(est, budget), budget, args.memory_gb, [f.rel for f in files])
    finished = load_pass1_done(work, plan, files)
    if finished is not None:
        plan, state = finished
        print(f"pass 1 already done ({state.n_docs} documents in {plan.nbuckets} buckets in {work}); shuffling")
        return plan, state, True
    created = missing_dirs(out_dir)  # removed again if nothing useful gets written
    resumed = resume_pass1(work, plan, files) if work.exists() else None
    if resumed is not None:
        plan, state = resumed
        print(f"resuming after {state.files_done} of {len(files)} files (pass-1 work in {work}; "
              f"{plan.nbuckets} buckets, memory budget {plan.memory_gb:g} GB as first planned)")
    else:
        if work.exists():
            print(f"discarding pass-1 work in {work}: it was for other arguments or files have changed")
        state = start_pass1(work, plan)
        n_files = f"{len(files)} file{'s' if len(files) != 1 else ''}"
        print(f"source: {job.label}: {n_files}, {sum(f.size for f in files) / 1e6:.1f} MB; {plan.nbuckets} "
              f"shuffle buckets for MEMORY={args.memory_gb:g} GB (~{est / 1e6:.1f} MB estimated)")
    stats = ReadStats(state.n_skipped, list(state.skipped_examples))
    try:
        state = run_pass1(work, plan, state, files, stats)
    except PrepError as e:
        if state.files_done == 0:
            # Nothing worth keeping: leave the disk as it was before this run.
            shutil.rmtree(work, ignore_errors=True)
            for d in created:
                if d.exists() and not any(d.iterdir()):
                    d.rmdir()
            raise
        raise PrepError(f"{e}\n(pass-1 progress of {state.files_done} files is kept in {work}; fix the file and "
                        f"re-run to continue)") from None
    if state.n_docs == 0:
        raise PrepError(f"{job.label}: the source files hold no documents ({', '.join(plan.files[:3])}...)")
    write_atomic(work / "pass1.done", json.dumps(asdict(state)).encode())
    return plan, state, resumed is not None


def prepare(args: PrepArgs) -> dict:
    """Run the whole preparation; returns its figures (n_docs, bytes, seconds, mb_per_s, ...)."""
    job = resolve_job(args)
    out_dir = Path(args.data_dir) / f"{job.name}_shuffled"
    work = out_dir / WORK_DIR
    planned = {chunk_name(job.name, i) for i in range(args.nchunks)} | {val_name(job.name)}

    # Fast path before downloading or reading anything: a finished output with the same arguments,
    # of sources whose stat() is unchanged.
    done = check_existing(out_dir, job.name, planned)
    if done is not None:
        check_same_args(out_dir, done, job, args)
        changed = sources_changed(out_dir, done, job)
        if changed is None:
            return already_prepared(out_dir, done)
        print(f"{changed}; preparing again (the finished output stays as it is until the new one replaces it)")

    t0 = time.perf_counter()
    plan, state, resumed = pass1_with_resume(job, args, out_dir, work)
    t1 = time.perf_counter()

    val_per_chunk = plan_split(state.n_docs, args.nchunks, job.name)
    for p in out_dir.iterdir():
        if is_our_tmp(p.name, job.name):  # debris of a killed earlier run of this script
            p.unlink()
    files = run_pass2(work, plan, state, out_dir, args.nchunks, val_per_chunk)
    n_val = files[val_name(job.name)]["docs"]
    marker = {
        "dataset": job.name,
        "seed": args.seed,
        "nchunks": args.nchunks,
        "val_docs_per_chunk": val_per_chunk,
        "n_docs": state.n_docs,
        "n_val": n_val,
        "n_skipped": state.n_skipped,
        "source": job.label,
        "source_files": len(plan.files),
        "source_bytes": state.source_bytes,
        "source_fingerprint": sources_digest(state.fingerprints),
        "json_bytes": state.json_bytes,
        "nbuckets": plan.nbuckets,
        "memory_gb": plan.memory_gb,
        "bucket_budget_bytes": plan.budget,
        "python": sys.version.split()[0],
        "args": {k: v for k, v in asdict(args).items() if k != "api_key"},
        "files": files,
    }
    write_atomic(out_dir / MARKER, (json.dumps(marker, indent=2) + "\n").encode("utf-8"))
    fsync_dir(out_dir)
    shutil.rmtree(work)  # only now: until .done exists, a re-run needs the buckets
    elapsed = time.perf_counter() - t0
    out_bytes = sum(f["bytes"] for f in files.values())

    if state.n_skipped:
        print(f"skipped {state.n_skipped} files not readable as UTF-8 (e.g. {', '.join(state.skipped_examples)})")
    print(
        f"prepared {state.n_docs} documents ({state.json_bytes / 1e6:.1f} MB of JSON) into {out_dir}: "
        f"{args.nchunks} chunks {chunk_name(job.name, 0)} .. {chunk_name(job.name, args.nchunks - 1)} "
        f"({state.n_docs - n_val} docs) + {val_name(job.name)} ({n_val} docs)"
    )
    mb_per_s = out_bytes / 1e6 / elapsed
    print(
        f"wrote {out_bytes / 1e6:.1f} MB in {elapsed:.2f} s ({mb_per_s:.1f} MB/s; pass 1 {t1 - t0:.2f} s"
        f"{' (resumed)' if resumed else ''}, pass 2 {elapsed - (t1 - t0):.2f} s); {plan.nbuckets} buckets; "
        f"seed {args.seed}; marker {out_dir / MARKER}"
    )
    print(f"next: {NEXT_COMMAND}")
    return {"out_dir": str(out_dir), "already_prepared": False, "resumed": resumed, "n_docs": state.n_docs,
            "n_val": n_val, "bytes": out_bytes, "seconds": elapsed, "mb_per_s": mb_per_s,
            "nbuckets": plan.nbuckets}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        prepare(args)
        return 0
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Everything written so far is either committed state or temp data a re-run ignores.
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
