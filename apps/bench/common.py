"""Helpers every benchmark shares: the machine description in the JSON, logs on stderr."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys

import torch


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_info(device: torch.device) -> dict:
    info = {
        "processor": platform.processor() or _cpu_model(),
        "cpu_model": _cpu_model(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def stderr_logging(logger: logging.Logger) -> None:
    """Bench logs go to stderr so stdout is exactly the JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
