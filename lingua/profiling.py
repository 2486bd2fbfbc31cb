"""torch.profiler windows: a trace of `profile_steps` steps after `profile_warmup` steps,
written to dump_dir/<trace_folder>; CUDA memory snapshots around `mem_warmup`. `HostSyncs`
counts the ops of a step that would make the host wait for a GPU (the tests' budget and
apps.bench.train_step's syncs per step)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lingua.storage import local_file, resolve

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

    def __init__(self, args: ProfilerArgs, dump_dir: Any, rank: int):
        self.args, self.rank = args, rank
        self.folder = resolve(dump_dir) / args.trace_folder
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
        with local_file(path) as name:
            prof.export_chrome_trace(name)
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
            with local_file(path) as name:
                torch.cuda.memory._dump_snapshot(name)
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


# Factories that put their result on the default device unless told otherwise.
FACTORIES = {
    torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.arange, torch.linspace, torch.rand, torch.randn, torch.randint, torch.eye,
}


class DevicelessFactories(TorchFunctionMode):
    """Marks the storages of tensors made by a factory without `device=` (a default-device
    context counts as naming one: it adds the argument before this mode sees the call)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, StorageWeakRef] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            self.mark(out)
        return out

    def mark(self, t: torch.Tensor) -> None:
        if _has_storage(t):
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = StorageWeakRef(storage)

    def marked(self, t: torch.Tensor) -> bool:
        if not self.storages or not _has_storage(t):
            return False
        ref = self.storages.get(t.untyped_storage().data_ptr())
        # Keyed by address: a dead marked storage whose address was reused is not a match.
        return ref is not None and not ref.expired()

    def propagate(self, args, kwargs: dict, out) -> None:
        """Marks `out` when every tensor input was marked: a clone or a division of a
        deviceless flag is on the host too. Called by dispatch modes for each op."""
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(self.marked(t) for t in inputs):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark(t)


def _has_storage(t: torch.Tensor) -> bool:
    """Plain tensors with data (not meta, not wrapper subclasses such as DTensor)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta


# Ops after which the host must wait for the GPU: a scalar read (item, float, bool, int), or an
# output whose shape depends on the values. Each drains the GPU's queue of kernels.
SYNCING_OPS = frozenset({
    "aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default",
    "aten.nonzero.default", "aten.masked_select.default", "aten.bincount.default",
    "aten.repeat_interleave.Tensor", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default",
})


class HostSyncs(TorchDispatchMode):
    """Records every op in SYNCING_OPS with the innermost lingua/apps frame that issued it.
    Counted by op, so a CPU run shows what a GPU run would wait for. Not counted: reads of
    tensors made without a device (with `made` active around the same code: on a GPU run they
    live on the host), and reads inside torch.optim, whose non-fused optimizers keep their step
    counters on the host precisely so that reading them waits for nothing."""

    def __init__(self, made: Optional[DevicelessFactories] = None):
        super().__init__()
        self.made = made
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING_OPS and not (self.made is not None and args and self.made.marked(args[0])):
            caller = _project_caller()
            if caller is not None:
                self.calls.append((str(func), caller))
        out = func(*args, **(kwargs or {}))
        if self.made is not None:
            self.made.propagate(args, kwargs or {}, out)
        return out


def _project_caller() -> Optional[str]:
    """'lingua/x.py:N' of the innermost project frame, '?' without one, None inside torch.optim."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        if frame.filename == __file__:  # the modes' own frames
            continue
        if "/torch/optim/" in frame.filename:
            return None
        if "/lingua/" in frame.filename or "/apps/" in frame.filename or "/tests/" in frame.filename:
            return f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno}"
    return "?"
