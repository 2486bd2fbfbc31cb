"""`accelerate launch -m apps.main.train config=...` under the real accelerate CLI: one
process (accelerate sets no rank: a plain single-process run), several processes with
--multi_gpu (accelerate runs torchrun in-process: gloo on a CPU), and --cpu with several
processes, where accelerate starts only one (its multi-CPU mode needs mpirun) and the run
says so. No accelerate config file is read or written (HF_HOME points into tmp_path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import failure_report, read_losses, ROOT, run_module, tiny_overrides

# Every value accelerate would otherwise default (and warn about) is given.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def accelerate_launch(flags: list[str], argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [*ACCELERATE, *flags, "-m", "apps.main.train", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def free_port() -> int:
    # accelerate's default rendezvous port (29500) may be taken by another run on this machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_under_accelerate_launch_is_a_plain_run(corpus, tmp_path):
    argv = lambda d: tiny_overrides(corpus, d, steps=4, **{"data.load_async": "false"})  # noqa: E731
    proc = accelerate_launch(["--cpu", "--num_processes", "1"], argv(tmp_path / "acc"), tmp_path)
    assert proc.returncode == 0, failure_report(proc)
    assert "1 process(es) via single" in proc.stdout + proc.stderr
    assert "accelerate launch started this one process" not in proc.stderr  # one asked, one started
    assert (tmp_path / "acc/checkpoints/0000000004/train_state_00000.json").exists()
    # The same run as `python -m apps.main.train`: nothing accelerate sets changes training.
    plain = run_module("apps.main.train", argv(tmp_path / "plain"))
    assert plain.returncode == 0, failure_report(plain)
    assert read_losses(tmp_path / "acc") == read_losses(tmp_path / "plain")
    assert sorted(read_losses(tmp_path / "acc")) == [1, 2, 3, 4]


@pytest.mark.distributed
def test_two_processes_under_accelerate_launch_multi_gpu(corpus, tmp_path):
    """--multi_gpu is accelerate's torchrun path, also on a machine without GPUs (then gloo)."""
    argv = tiny_overrides(corpus, tmp_path / "d", steps=4, **{"data.load_async": "false", "distributed.dp_shard": 2})
    proc = accelerate_launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())],
                             argv, tmp_path)
    assert proc.returncode == 0, failure_report(proc)
    assert "2 process(es) via torchrun: dp_replicate=1 dp_shard=2" in proc.stdout + proc.stderr
    ckpt = tmp_path / "d/checkpoints/0000000004"
    assert sorted(p.name for p in ckpt.glob("train_state_*.json")) == ["train_state_00000.json",
                                                                        "train_state_00001.json"]
    assert sorted(read_losses(tmp_path / "d")) == [1, 2, 3, 4]


def test_accelerate_cpu_with_two_processes_starts_one_and_says_so(corpus, tmp_path):
    """accelerate 1.15 starts one process for `--cpu --num_processes 2` (no mpirun hostfile):
    MASTER_ADDR set, no RANK. The run must be one process, not rank 0 waiting for a peer."""
    argv = tiny_overrides(corpus, tmp_path / "d", steps=2, **{"data.load_async": "false"})
    proc = accelerate_launch(["--cpu", "--num_processes", "2"], argv, tmp_path)
    assert proc.returncode == 0, failure_report(proc)
    assert "1 process(es) via single" in proc.stdout + proc.stderr
    assert "accelerate launch started this one process" in proc.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in proc.stderr
    assert sorted(read_losses(tmp_path / "d")) == [1, 2]
