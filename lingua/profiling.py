"""torch.profiler windows: a trace of `profile_steps` steps after `profile_warmup` steps,
written to dump_dir/<trace_folder>; CUDA memory snapshots around `mem_warmup`."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class ProfilerArgs:
    run: bool = False
    trace_folder: str = "profiling"
    mem_warmup: int = 100
    mem_steps: int = 2
    profile_warmup: int = 102
    profile_steps: int = 2


class StepProfiler:
    """Call .step() once per training step."""

    def __init__(self, args: ProfilerArgs, dump_dir: str, rank: int):
        self.args, self.rank = args, rank
        self.folder = Path(dump_dir) / args.trace_folder
        self.step_count = 0
        self.profiler: Optional[torch.profiler.profile] = None
        self.cuda_mem = torch.cuda.is_available()
        if args.run:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=args.profile_warmup, warmup=0, active=args.profile_steps, repeat=1),
                on_trace_ready=self._save_trace,
                record_shapes=True,
            )
            self.profiler.start()
            if not self.cuda_mem:
                logger.info("profiling: memory snapshots need CUDA; writing the op trace only")

    def _save_trace(self, prof: torch.profiler.profile) -> None:
        path = self.folder / f"trace_rank{self.rank}_step{self.step_count}.json"
        prof.export_chrome_trace(str(path))
        logger.info("profiler trace written to %s", path)

    def step(self) -> None:
        if self.profiler is None:
            return
        self.step_count += 1
        self.profiler.step()
        if self.cuda_mem and self.step_count == self.args.mem_warmup:
            torch.cuda.memory._record_memory_history()
        if self.cuda_mem and self.step_count == self.args.mem_warmup + self.args.mem_steps:
            path = self.folder / f"memory_rank{self.rank}_step{self.step_count}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None


@contextlib.contextmanager
def maybe_profile(args: ProfilerArgs, dump_dir: str, rank: int = 0) -> Iterator[StepProfiler]:
    prof = StepProfiler(args, dump_dir, rank)
    try:
        yield prof
    finally:
        prof.close()
