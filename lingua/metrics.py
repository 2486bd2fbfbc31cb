"""Training metrics: flattened JSON rows in metrics.jsonl (+ wandb when configured), and the
peak FLOP/s that MFU is measured against (a table for known GPUs, a measured matmul rate on
the device otherwise)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lingua.storage import StagedFile, resolve

logger = logging.getLogger(__name__)


@dataclass
class LoggingArgs:
    freq: int = 10  # log every `freq` steps
    acc_freq: Optional[int] = None  # accepted for Meta Lingua configs; we log per optimizer step
    wandb: Optional[dict[str, Any]] = None  # passed to wandb.init(**wandb) when wandb is installed


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by model, from the vendors' data sheets.
# Variants differ (an H100 PCIe is not an SXM), so a name matches the most specific pattern that
# it contains as whole words; a GPU missing here is measured, never given another's peak. V100
# has no bf16 tensor cores: it is measured too.
GPU_PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,  # SXM and PCIe alike
    "A800": 312e12,
    "L40S": 362e12,
}


def gpu_peak_flops(device_name: str) -> Optional[float]:
    """The table's peak for a device name such as "NVIDIA H100 PCIe", or None."""
    words = device_name.replace("-", " ").split()
    for key in sorted(GPU_PEAK_BF16, key=lambda k: -len(k.split())):
        parts = key.split()
        if any(words[i : i + len(parts)] == parts for i in range(len(words))):
            return GPU_PEAK_BF16[key]
    return None


def measure_matmul_flops(device: torch.device = torch.device("cpu"), dtype=torch.float32, n: int = 1024,
                         repeats: int = 50) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul on `device`, synchronised on accelerators.

    Many repeats (~0.5 s on a CPU): the first few often catch the device before it is up to
    speed, and a low peak would flatter every MFU figure measured against it."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 50, dtype=torch.float32) -> float:
    return measure_matmul_flops(torch.device("cpu"), dtype, n, repeats)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU: the data-sheet bf16 peak of a known GPU training
    in bf16; otherwise a measured matmul rate in the training dtype on the device itself."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name) if dtype == torch.bfloat16 else None
        if peak is not None:
            return peak, f"{name} bf16 dense peak"
        logger.warning("no %s peak FLOP/s known for %s: MFU uses a measured matmul rate", dtype, name)
        rate = measure_matmul_flops(device, dtype, n=8192, repeats=20)
        return rate, f"measured {dtype} 8192x8192 matmul rate on {name} (best of 20)"
    return measure_cpu_matmul_flops(), (f"measured fp32 1024x1024 matmul rate on {device.type} "
                                        f"({torch.get_num_threads()} threads, best of 50)")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class MetricLogger:
    """Appends one flattened JSON row per call; mirrors to wandb when configured. `path` may be
    an fsspec URL: rows then reach it at each `sync()` and at close (lingua.storage.StagedFile)."""

    def __init__(self, path: Any, wandb_kwargs: Optional[dict] = None, config: Optional[dict] = None):
        self.staged = StagedFile(resolve(path))
        self.path = self.staged.path
        self.file = open(self.staged.local, "a")
        self.wandb = None
        if wandb_kwargs is not None:
            try:
                import wandb
            except ImportError:
                logger.warning("logging.wandb is set but wandb is not installed: logging to %s only", self.path)
            else:
                self.wandb = wandb.init(config=config, **wandb_kwargs)

    def log(self, metrics: dict, nested: bool = False) -> None:
        """nested: keep the dicts as they are (Meta Lingua's metrics.eval.jsonl rows); wandb still
        gets the flattened row."""
        row = dict(metrics) if nested else flatten(metrics)
        row.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(flatten(row), step=row.get("global_step"))

    def sync(self) -> None:
        self.staged.sync()

    def close(self) -> None:
        self.file.close()
        self.staged.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
