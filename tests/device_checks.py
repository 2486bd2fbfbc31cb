"""What a GPU run would receive, checked on a CPU: reusable modes for tests.

NCCL serves only CUDA tensors, so a collective on a tensor the code made without a device (on
the CPU) crashes a GPU run at once, while gloo on a CPU machine takes it without complaint.
`CollectiveLog` records every collective's tensors as they enter the backend (device, dtype)
and whether they were made by a factory call that named no device (lingua.profiling's
`DevicelessFactories` marks those, and what is computed from them alone): on a GPU those would
be CPU tensors.

    with DevicelessFactories() as made, CollectiveLog(made) as log:
        train(args)
    assert not log.deviceless(), log.deviceless()

lingua.profiling's `HostSyncs` counts the ops that make the host wait for a GPU (a scalar read
back, or an output whose size depends on the data): each drains the GPU's queue of kernels.

`LiveStorages` counts the bytes a forward leaves alive for backward, exactly, per storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lingua.profiling import DevicelessFactories

@dataclass
class Collective:
    op: str
    device: str
    dtype: str
    deviceless: bool


def _is_collective(func) -> bool:
    return func.namespace in ("c10d", "_c10d_functional", "_c10d_functional_autograd") and "wait" not in func.__name__


class CollectiveLog(TorchDispatchMode):
    """Every collective op's tensor arguments, in order. Ops computed only from marked tensors
    give marked tensors (a clone or a division of a deviceless flag is still on the CPU)."""

    def __init__(self, made: DevicelessFactories):
        super().__init__()
        self.made = made
        self.calls: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if _is_collective(func):
            for t in inputs:
                self.calls.append(Collective(str(func), str(t.device), str(t.dtype), self.made.marked(t)))
        out = func(*args, **kwargs)
        self.made.propagate(args, kwargs, out)
        return out

    def deviceless(self) -> list[Collective]:
        return [c for c in self.calls if c.deviceless]


class LiveStorages(TorchDispatchMode):
    """Records the storage of every tensor an op creates; `bytes()` sums those still alive."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                # Keyed by address: a new storage at a freed one's address replaces it.
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


class InFlightCollectives(TorchDispatchMode):
    """The most functional collectives ever in flight at once (`peak`), read from c10d's
    registry of unwaited works as each collective is issued (eager funcol waits inside c10d,
    where a dispatch mode does not see it)."""

    def __init__(self):
        super().__init__()
        self.peak = 0
        self.issued = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "_c10d_functional" and "wait" not in func.__name__ and "wrap" not in func.__name__:
            self.issued += 1
            self.peak = max(self.peak, torch._C._distributed_c10d._get_work_registry_size())
        return out
