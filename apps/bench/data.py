"""Data-pipeline headroom: how much faster batches are made than the training step eats them.

`python -m apps.bench.data [--corpus_mb 20] [--seconds 5]` builds a local JSONL corpus (this
Python's stdlib sources, no network), prepares it with setup/download_prepare_hf_data.py
(prep MB/s), trains a SentencePiece model on it with setup/download_tokenizer.py, then times,
in the same run:
- the data pipeline exactly as training runs it (read JSONL, tokenize, pack, shuffle buffer,
  prefetched by the background loader process) with the bytes tokenizer and with the
  SentencePiece model, in tokens/s;
- the debug config's training step (apps/main/configs/debug.yaml: model, batch, optimizer,
  eager, fp32), in tokens/s: the baseline.
`headroom` = the slower tokenizer's pipeline tokens/s / the step's tokens/s (target >= 20).
The pipeline runs alone here; in training it shares the CPU with the step, so the ratio is an
upper bound of what a 2-core machine sees at once. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from apps.bench.common import machine_info, stderr_logging
from apps.main.train import TrainArgs, train_step
from apps.main.transformer import build_model
from lingua.args import load_config
from lingua.data import DataArgs, build_data_loader
from lingua.optim import build_optimizer
from lingua.tokenizer import TokenizerArgs

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = ROOT / "apps/main/configs/debug.yaml"
TARGET_HEADROOM = 20.0
DATASET = "benchcorpus"


def write_corpus(src: Path, max_mb: float, n_files: int = 4) -> int:
    """Stdlib .py files as JSONL documents, dealt over n_files; returns the bytes written."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    src.mkdir(parents=True, exist_ok=True)
    outs = [open(src / f"part-{i:02d}.jsonl", "w") for i in range(n_files)]
    written, i = 0, 0
    try:
        for p in paths:
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            line = json.dumps({"text": text, "src": p.relative_to(stdlib).as_posix()}) + "\n"
            outs[i % n_files].write(line)
            written += len(line)
            i += 1
            if written >= max_mb * 1e6:
                break
    finally:
        for f in outs:
            f.close()
    return written


def run_prep(src: Path, data_dir: Path, nchunks: int) -> dict:
    """The real prep command on a local source, timed from outside (includes its start-up)."""
    cmd = [sys.executable, str(ROOT / "setup/download_prepare_hf_data.py"), DATASET, "1",
           "--data_dir", str(data_dir), "--seed", "42", "--nchunks", str(nchunks), "--src_dir", str(src)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"prep failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    src_bytes = sum(f.stat().st_size for f in src.iterdir())
    return {"source_mb": src_bytes / 1e6, "seconds": elapsed, "mb_per_s": src_bytes / 1e6 / elapsed}


def train_sp(data: Path, out: Path, vocab_size: int, max_mb: float) -> float:
    """A SentencePiece model trained by the real tokenizer script; returns seconds taken."""
    t0 = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "setup/download_tokenizer.py"), "train", "--kind", "sp",
           "--vocab_size", str(vocab_size), "--data", str(data), "--max_mb", str(max_mb), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"tokenizer training failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def pipeline_tokens_per_s(data: DataArgs, seconds: float) -> dict:
    """Tokens/s of the background loader, timed after its first batch (fork, first buffer)."""
    loader = build_data_loader(data)
    try:
        next(loader)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            next(loader)
            n += 1
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    tokens = n * data.batch_size * data.seq_len
    return {"tokens_per_s": tokens / elapsed, "batches": n, "seconds": elapsed}


def step_tokens_per_s(args: TrainArgs, steps: int, warmup: int) -> dict:
    """The debug config's training step on random tokens (data cost excluded on purpose)."""
    torch.manual_seed(0)
    model = build_model(args.model)
    optimizer, scheduler = build_optimizer(model, args.optim, steps + warmup)
    shape = (args.data.batch_size, args.data.seq_len + 1)
    batches = []
    for _ in range(steps + warmup):
        tokens = torch.randint(0, args.model.vocab_size, shape)
        batches.append([(tokens[:, :-1], tokens[:, 1:])] * args.grad_acc_steps)
    for b in batches[:warmup]:
        train_step(model, optimizer, scheduler, b, args.optim.clip)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        train_step(model, optimizer, scheduler, b, args.optim.clip)
    elapsed = time.perf_counter() - t0
    tokens = steps * args.grad_acc_steps * args.data.batch_size * args.data.seq_len
    return {"tokens_per_s": tokens / elapsed, "steps": steps, "seconds": elapsed}


def run_bench(corpus_mb: float, seconds: float, steps: int, sp_vocab: int, workdir: Path) -> dict:
    debug = load_config(TrainArgs, [f"config={DEBUG_CONFIG}"])
    src, data_dir = workdir / "src", workdir / "data"
    logger.info("writing a %.0f MB JSONL corpus in %s", corpus_mb, src)
    write_corpus(src, corpus_mb)
    prep = run_prep(src, data_dir, nchunks=8)
    logger.info("prep: %.1f MB in %.1f s (%.1f MB/s)", prep["source_mb"], prep["seconds"], prep["mb_per_s"])
    prepared = data_dir / f"{DATASET}_shuffled"
    sp_seconds = train_sp(prepared, workdir / "sp", sp_vocab, max_mb=min(corpus_mb, 8.0))
    logger.info("SentencePiece (vocab %d) trained in %.1f s", sp_vocab, sp_seconds)

    pipeline = {}
    for name, tok in (("bytes", TokenizerArgs("bytes")),
                      ("sp", TokenizerArgs("sp", str(workdir / "sp" / "tokenizer.model")))):
        data = DataArgs(**{**vars(debug.data), "root_dir": str(data_dir),
                           "sources": {prepared.name: 1.0}, "tokenizer": tok, "load_async": True})
        pipeline[name] = pipeline_tokens_per_s(data, seconds)
        logger.info("pipeline with %s: %.0f tokens/s", name, pipeline[name]["tokens_per_s"])

    debug.model.vocab_size = 258  # the debug config's bytes tokenizer
    step = step_tokens_per_s(debug, steps=steps, warmup=2)
    logger.info("debug training step: %.0f tokens/s", step["tokens_per_s"])
    slower = min(pipeline, key=lambda k: pipeline[k]["tokens_per_s"])
    headroom = pipeline[slower]["tokens_per_s"] / step["tokens_per_s"]
    return {
        "bench": "data",
        "headroom": headroom,
        "headroom_tokenizer": slower,
        "headroom_by_tokenizer": {k: v["tokens_per_s"] / step["tokens_per_s"] for k, v in pipeline.items()},
        "pipeline_tokens_per_s": {k: v["tokens_per_s"] for k, v in pipeline.items()},
        "step_tokens_per_s": step["tokens_per_s"],
        "prep_mb_per_s": prep["mb_per_s"],
        "details": {"pipeline": pipeline, "step": step, "prep": prep, "sp_train_seconds": sp_seconds,
                    "sp_vocab_size": sp_vocab},
        "config": {"debug_config": str(DEBUG_CONFIG.relative_to(ROOT)), "batch_size": debug.data.batch_size,
                   "seq_len": debug.data.seq_len, "prefetch_size": debug.data.prefetch_size,
                   "model_dim": debug.model.dim, "n_layers": debug.model.n_layers, "corpus_mb": corpus_mb,
                   "pipeline_seconds": seconds,
                   "timing": "pipeline: background loader alone after its first batch; "
                             "step: eager fp32 debug model, AdamW, random tokens"},
        "threads": torch.get_num_threads(),
        "machine": machine_info(torch.device("cpu")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "targets": {"headroom": {"target": TARGET_HEADROOM, "value": headroom, "met": headroom >= TARGET_HEADROOM}},
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m apps.bench.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus_mb", type=float, default=20.0, help="size of the generated JSONL corpus")
    p.add_argument("--seconds", type=float, default=5.0, help="time each pipeline this long")
    p.add_argument("--steps", type=int, default=8, help="timed debug training steps")
    p.add_argument("--sp_vocab", type=int, default=4000, help="vocabulary of the trained SentencePiece model")
    p.add_argument("--workdir", default=None, help="keep the corpus and tokenizer here (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        if args.workdir and any(workdir.iterdir() if workdir.exists() else ()):
            raise SystemExit(f"--workdir {workdir} is not empty; give a new or empty directory")
        workdir.mkdir(parents=True, exist_ok=True)
        result = run_bench(args.corpus_mb, args.seconds, args.steps, args.sp_vocab, workdir)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    stderr_logging(logger)
    main()
