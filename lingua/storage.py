"""Where a run writes: a plain path or any fsspec URL (`s3://`, `gs://`, `file://`, `memory://`).

`resolve(url)` gives a `pathlib.Path` for the local filesystem (a plain path or `file://`), so
local runs behave exactly as before, and a `RemotePath` for every other filesystem: the small
part of the pathlib interface the checkpoint, metrics and config code use, over fsspec.

Object stores differ from a disk in two ways this code relies on being handled here:
- there is no atomic rename of a directory: a remote checkpoint is written in place and is
  complete once its commit marker exists (`checkpoint.py`), and `move_dir` copies the marker
  last and deletes it first, so a half-moved directory is never taken for a complete one;
- there is no append: files written line by line (metrics.jsonl, train.log) are `StagedFile`s,
  appended to a local copy and uploaded whole by `sync()` (a single PUT replaces an object
  atomically), at every checkpoint, validation and at the end of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from lingua.args import ConfigError


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is an fsspec URL (`proto://...`, or a chain `a::proto://...`)."""
    return "://" in str(path)


def _url_to_fs(url: str):
    import fsspec  # only URLs need it

    return fsspec.core.url_to_fs(url)


@dataclass(frozen=True, order=True)
class RemotePath:
    """A file or directory on a non-local fsspec filesystem; `str()` is its URL."""

    path: str  # the filesystem's own path (no protocol)
    fs: Any = field(compare=False, repr=False)

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(f"{self.path.rstrip('/')}/{name}", self.fs)

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.path.rstrip("/").rsplit("/", 1)[0] or "/", self.fs)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def iterdir(self) -> Iterator["RemotePath"]:
        for child in self.fs.ls(self.path, detail=False):
            yield RemotePath(child.rstrip("/"), self.fs)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.exists() and not exist_ok:
            raise FileExistsError(str(self))
        self.fs.makedirs(self.path, exist_ok=True)

    def open(self, mode: str = "r", **kwargs: Any):
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.rm_file(self.path)

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        for match in self.fs.glob(f"{self.path.rstrip('/')}/{pattern}"):
            yield RemotePath(match, self.fs)

    def files(self) -> list["RemotePath"]:
        """Every file below this directory."""
        return [RemotePath(p, self.fs) for p in sorted(self.fs.find(self.path))]


StoragePath = Union[Path, RemotePath]


def resolve(url: str | os.PathLike) -> StoragePath:
    """A Path for a plain path or `file://` URL, a RemotePath for any other fsspec URL."""
    if isinstance(url, (Path, RemotePath)):
        return url
    if not is_url(url):
        return Path(url)
    fs, path = _url_to_fs(str(url))
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return Path(path)
    return RemotePath(path.rstrip("/") or "/", fs)


def is_remote(path: StoragePath) -> bool:
    return isinstance(path, RemotePath)


def in_process_only(url: str | os.PathLike) -> bool:
    """Whether `url` lives in this process's memory (`memory://`): another process, even a
    spawned child, sees that filesystem empty, and a forked one a copy frozen at the fork."""
    if not is_url(url):
        return False
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(_url_to_fs(str(url))[0], MemoryFileSystem)


def check_reachable(key: str, url: Optional[str]) -> None:
    """ConfigError naming `key` when the URL's protocol is unknown, its filesystem package is
    missing, or the filesystem cannot be reached; creates nothing. Plain paths pass as before."""
    if not url or not is_url(url):
        return
    try:
        fs, path = _url_to_fs(url)
        fs.exists(path)  # a first request: credentials, network, bucket
    except ImportError as e:  # fsspec names the package to install: "Install s3fs to access S3"
        raise ConfigError(f"{key}='{url}': {e}") from None
    except ValueError as e:  # "Protocol not known: foo"
        raise ConfigError(f"{key}='{url}': {e} (a plain path, file://, memory://, or a protocol of an installed "
                          "fsspec filesystem such as s3:// with s3fs, gs:// with gcsfs)") from None
    except Exception as e:  # noqa: BLE001 - any failure to reach it is the user's to see, before work starts
        raise ConfigError(f"{key}='{url}' cannot be reached: {type(e).__name__}: {e}") from None


def write_bytes_atomic(path: StoragePath, data: bytes) -> None:
    """Replace `path` whole: locally through a synced temporary file and a rename; remotely in one
    upload, which object stores apply atomically."""
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: StoragePath, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json(path: StoragePath, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def rmtree(path: StoragePath, marker: Optional[str] = None) -> None:
    """Remove a directory; `marker` (the file that makes it count as complete) goes first, so
    an interrupted removal leaves something incomplete, never something that looks whole."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    if marker is not None:
        (path / marker).unlink(missing_ok=True)
    if path.exists():
        path.fs.rm(path.path, recursive=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_dir(src: StoragePath, dst: StoragePath, marker: Optional[str] = None) -> None:
    """A full copy of directory `src` at `dst` (absent). Locally of hard links where the
    filesystem has them (callers never rewrite a file in place); remotely file by file, `marker`
    last. Both ends are on the same filesystem."""
    if not is_remote(src):
        shutil.copytree(src, dst, copy_function=_link_or_copy)
        return
    files = src.files()
    files.sort(key=lambda f: f.name == marker)  # the marker last
    prefix = src.path.rstrip("/") + "/"
    for f in files:
        src.fs.copy(f.path, dst.path.rstrip("/") + "/" + f.path[len(prefix):])


def move_dir(src: StoragePath, dst: StoragePath, marker: Optional[str] = None) -> None:
    """Rename a directory: atomic locally; remotely a copy with `marker` last, then a removal
    with `marker` first, so at every moment at most one of the two looks complete."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    copy_dir(src, dst, marker)
    rmtree(src, marker)


def tree_bytes(path: Optional[StoragePath]) -> int:
    if path is None:
        return 0
    if is_remote(path):
        return int(path.fs.du(path.path))
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(path: StoragePath) -> Optional[int]:
    """Free space of the filesystem holding `path`; None where there is no such figure (object stores)."""
    return None if is_remote(path) else shutil.disk_usage(path).free


def dcp_writer(path: StoragePath):
    """DCP's storage writer for a checkpoint directory: its fsspec writer for remote paths."""
    if not is_remote(path):
        return None  # dcp.save picks its filesystem writer from checkpoint_id
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(str(path))


def dcp_reader(path: StoragePath):
    if not is_remote(path):
        return None
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(str(path))


@contextmanager
def local_file(path: StoragePath) -> Iterator[str]:
    """A local file name for a writer that needs one (profiler traces): `path` itself locally;
    remotely a temporary file, uploaded to `path` when the block ends without an error."""
    if not is_remote(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="lingua-upload-") as tmp:
        local = os.path.join(tmp, path.name)
        yield local
        path.write_bytes(Path(local).read_bytes())


class StagedFile:
    """A file written by appending (metrics.jsonl, train.log). `local` is where to append: the
    file itself for a local path; for a remote one a private local copy, started from the remote
    file's content so a resumed run appends, and uploaded whole by `sync()`."""

    def __init__(self, path: StoragePath):
        self.path = path
        self._dir: Optional[str] = None
        if not is_remote(path):
            self.local = Path(path)
            self.local.parent.mkdir(parents=True, exist_ok=True)
            return
        self._dir = tempfile.mkdtemp(prefix="lingua-staged-")
        self.local = Path(self._dir) / path.name
        self.local.write_bytes(path.read_bytes() if path.exists() else b"")
        self._synced: Optional[tuple[int, int]] = self._signature()

    def _signature(self) -> tuple[int, int]:
        stat = self.local.stat()
        return stat.st_size, stat.st_mtime_ns

    def sync(self) -> None:
        """Upload the local copy if it changed since the last upload (remote paths only)."""
        if self._dir is None or not self.local.exists() or self._signature() == self._synced:
            return
        self.path.write_bytes(self.local.read_bytes())
        self._synced = self._signature()

    def close(self) -> None:
        self.sync()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
