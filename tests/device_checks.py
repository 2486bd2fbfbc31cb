"""What a GPU run would receive, checked on a CPU: reusable modes for tests.

NCCL serves only CUDA tensors, so a collective on a tensor the code made without a device (on
the CPU) crashes a GPU run at once, while gloo on a CPU machine takes it without complaint.
`CollectiveLog` records every collective's tensors as they enter the backend (device, dtype)
and whether they were made by a factory call that named no device (`DevicelessFactories`
marks those, and what is computed from them alone): on a GPU those would be CPU tensors.

    with DevicelessFactories() as made, CollectiveLog(made) as log:
        train(args)
    assert not log.deviceless(), log.deviceless()

`LiveStorages` counts the bytes a forward leaves alive for backward, exactly, per storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def _has_storage(t: torch.Tensor) -> bool:
    """Plain tensors with data (not meta, not wrapper subclasses such as DTensor)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta


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
        if inputs and all(self.made.marked(t) for t in inputs):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.made.mark(t)
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
