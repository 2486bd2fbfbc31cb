"""The peak FLOP/s that MFU is measured against: the right data-sheet peak for each GPU
variant, and a measured rate on the device for any GPU the table does not know."""

from __future__ import annotations

import pytest
import torch

import lingua.metrics as metrics
from lingua.metrics import gpu_peak_flops, peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA B200", None),
    ("NVIDIA L4", None),  # not the L40S
    ("NVIDIA RTX 6000 Ada Generation", None),
    ("AMD Instinct MI300X", None),
    ("Tesla V100-SXM2-32GB", None),  # no bf16 tensor cores
])
def test_gpu_peak_matches_the_exact_variant(name, peak):
    assert gpu_peak_flops(name) == peak


def _as_gpu(monkeypatch, name: str) -> list:
    """peak_flops on a pretend CUDA device of this name; returns the recorded measurements."""
    measured = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    def fake_measure(device, dtype, n=1024, repeats=50):
        measured.append((device.type, dtype))
        return 123e12

    monkeypatch.setattr(metrics, "measure_matmul_flops", fake_measure)
    return measured


@pytest.mark.parametrize("name", ["NVIDIA B200", "NVIDIA L4", "AMD Instinct MI300X", "Tesla V100-SXM2-32GB"])
def test_unknown_gpu_is_measured_on_the_device_in_bf16(monkeypatch, name):
    """It used to fall back to a CPU matmul rate labelled "on cuda" (MFU ~1000x too high)."""
    measured = _as_gpu(monkeypatch, name)
    peak, source = peak_flops(torch.device("cuda", 0), torch.bfloat16)
    assert measured == [("cuda", torch.bfloat16)]
    assert peak == 123e12 and "measured" in source and name in source


def test_known_gpu_training_in_fp32_is_measured_in_fp32(monkeypatch):
    measured = _as_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16)[0] == 989e12 and not measured
    assert peak_flops(torch.device("cuda", 0), torch.float32)[0] == 123e12
    assert measured == [("cuda", torch.float32)]


def test_cpu_peak_is_a_positive_measured_rate():
    peak, source = peak_flops(torch.device("cpu"))
    assert peak > 1e8 and "measured" in source
