"""Shared fixtures: a small real-text corpus in the hub layout and a tiny model config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(root: Path, name: str = "src", n_chunks: int = 2, n_docs: int = 60, n_val: int = 6) -> Path:
    """Python stdlib files as documents: real text, no network, same layout as prepared data."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))[: n_docs + n_val]
    docs = [p.read_text(encoding="utf-8", errors="replace")[:4000] for p in files]
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    for c in range(n_chunks):
        with open(out / f"{name}.chunk.{c:02d}.jsonl", "w") as f:
            for d in docs[n_val:][c::n_chunks]:
                f.write(json.dumps({"text": d}) + "\n")
    with open(out / f"{name}.val.jsonl", "w") as f:
        for d in docs[:n_val]:
            f.write(json.dumps({"text": d}) + "\n")
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


def tiny_overrides(data_root: Path, dump_dir: Path, **extra) -> list[str]:
    """A model small enough that a step takes milliseconds on 2 cores."""
    args = {
        "config": str(ROOT / "apps/main/configs/debug.yaml"),
        "dump_dir": str(dump_dir),
        "data.root_dir": str(data_root),
        "data.sources": "{src: 1.0}",
        "data.batch_size": 4,
        "data.seq_len": 32,
        "data.prefetch_size": 4,
        "model.dim": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.max_seqlen": 32,
        "steps": 12,
        "optim.warmup": 2,
        "logging.freq": 1,
        "checkpoint.dump.every": 4,
        "checkpoint.dump.keep": 0,
        "checkpoint.eval.every": 1000,
        "eval.validation.max_steps": 2,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run_module(module: str, argv: list[str], timeout: int = 300, env: dict | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """`python -m module argv` from the project root; `env`: variables added to this one's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )


def read_losses(dump_dir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in open(dump_dir / "metrics.jsonl") if l.strip()]
    return {r["global_step"]: r["loss/out"] for r in rows}


def train_killed_after_first_save_then_resumed(monkeypatch, args, **parts) -> None:
    """train(args(), **parts) interrupted right after its first checkpoint save (a
    KeyboardInterrupt, as a Ctrl-C there would), then run again on fresh args to the end: it
    resumes. `parts`: an app's build_model_fn / build_loader_fn / tokenizer_fn."""
    from apps.main.train import train
    from lingua.checkpoint import CheckpointManager

    real_save = CheckpointManager.save

    def save_then_die(self, *a, **k):
        real_save(self, *a, **k)
        raise KeyboardInterrupt("killed after the first save")

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointManager, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(args(), **parts)
    train(args(), **parts)


def decode_step_by_step(model, x, prefix: int, cache_len: int):
    """Logits for tokens x [1, T] from a forward over x[:, :prefix] followed by one KV-cached
    forward per remaining token, for comparison with the full forward."""
    import torch

    with torch.no_grad():
        caches = model.new_kv_caches(1, cache_len)
        parts = [model(x[:, :prefix], kv_caches=caches, start=0)]
        for t in range(prefix, x.shape[1]):
            parts.append(model(x[:, t : t + 1], kv_caches=caches, start=t))
    return torch.cat(parts, dim=1)


def failure_report(proc: subprocess.CompletedProcess, limit: int = 3000) -> str:
    """What a failed (multi-process) run printed that explains it: the first error of each rank
    and any C++ terminate message, then the tail. A plain tail of a torchrun run shows only
    the rank that failed last (typically a peer's "Connection closed"), not the root cause."""
    lines = proc.stderr.splitlines()
    firsts, seen = [], set()
    for i, line in enumerate(lines):
        rank = line.split("]:", 1)[0] + "]" if line.startswith("[rank") else None
        if rank and "Traceback" in line and rank not in seen:
            seen.add(rank)
            block = [l for l in lines[i:] if l.startswith(rank)][:60]
            firsts.append("\n".join(block)[-limit:])
        elif "terminate called" in line or "Fatal Python error" in line:
            firsts.append("\n".join(lines[max(0, i - 5) : i + 15]))
    return "\n...\n".join([*firsts, (proc.stdout + proc.stderr)[-limit:]])
