"""Rank-aware logging: rank 0 logs at INFO, other ranks only warnings, each line tagged with
the rank and the time since start; optionally also to a file in dump_dir."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.start = time.time()

    def format(self, record: logging.LogRecord) -> str:
        elapsed = time.strftime("%H:%M:%S", time.gmtime(record.created - self.start))
        msg = super().format(record)
        return f"{record.levelname[0]} rank{self.rank} {elapsed} {record.name}: {msg}"


def init_logger(rank: int = 0, log_file: Optional[str] = None, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(_RankFormatter(rank))
        root.addHandler(h)
    root.setLevel(level if rank == 0 else logging.WARNING)
