"""Training metrics: flattened JSON rows in metrics.jsonl (+ wandb when configured), and the
peak FLOP/s that MFU is measured against (a table for known GPUs, a measured matmul rate
on CPU)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class LoggingArgs:
    freq: int = 10  # log every `freq` steps
    acc_freq: Optional[int] = None  # accepted for Meta Lingua configs; we log per optimizer step
    wandb: Optional[dict[str, Any]] = None  # passed to wandb.init(**wandb) when wandb is installed


# Dense bf16 tensor-core peaks (FLOP/s), no sparsity; matched by substring of the device name.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def gpu_peak_flops(device_name: str) -> Optional[float]:
    for key, peak in GPU_PEAK_BF16.items():
        if key in device_name:
            return peak
    return None


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 50, dtype=torch.float32) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul with the current torch thread count.

    Many repeats (~0.5 s): the first few often catch the CPU before it is up to speed, and a
    low peak would flatter every MFU figure measured against it."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"{name} bf16 dense peak"
        logger.warning("no peak FLOP/s known for %s: MFU uses the measured matmul rate", name)
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
    """Appends one flattened JSON row per call; mirrors to wandb when configured."""

    def __init__(self, path: str | os.PathLike, wandb_kwargs: Optional[dict] = None, config: Optional[dict] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        self.wandb = None
        if wandb_kwargs is not None:
            try:
                import wandb
            except ImportError:
                logger.warning("logging.wandb is set but wandb is not installed: logging to %s only", self.path)
            else:
                self.wandb = wandb.init(config=config, **wandb_kwargs)

    def log(self, metrics: dict) -> None:
        row = flatten(metrics)
        row.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("global_step"))

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
