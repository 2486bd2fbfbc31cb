"""How fast the memories are: FAISS search of the LongMem bank against an exact torch top-k, and
the training step of hybrid_debug's memories against the same segment model without memory.

`python -m apps.bench.memory_bank [--sizes 4096,65536,1048576] [--rounds 10] [key=value ...]`
prints one JSON object:
- `faiss_vs_torch`, per bank size in tokens (heads 4, head dim 64, chunks of 4 tokens keyed by
  their mean, 16 chunks retrieved per query, as retrieval_k=64): microseconds per query token
  of faiss IndexFlatIP (exact, one index per head, as the model searches) and of torch's
  matmul + topk, their ratio, and whether both found the same chunks;
- `step_overhead`, per memory kind (slots, bank, hybrid): step time / the no-memory step time
  - 1, the median of per-round ratios of full training steps (forward, backward, clipping,
  AdamW) run in alternating rounds on the same batches, eager (the segment loop is Python).
The DESIGN.md goals: at most 0.15 for slots and 0.3 for the bank at the debug shape. Logs go
to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import torch

from apps.bench.common import machine_info, stderr_logging
from apps.bench.mhc import Runner
from apps.main.train import TrainArgs
from lingua.args import load_config
from lingua.memory_bank import faiss_module

logger = logging.getLogger(__name__)

CONFIG = "apps/main/configs/hybrid_debug.yaml"
VOCAB, BOS = 258, 256  # the debug configs' bytes tokenizer
HEADS, HEAD_DIM, CHUNK, TOP_CHUNKS, QUERIES = 4, 64, 4, 16, 256
TARGETS = {"slots": 0.15, "bank": 0.3}
KINDS = {
    "none": ["model.use_internal_memory=false", "model.use_external_memory=false"],
    "slots": ["model.use_internal_memory=true", "model.use_external_memory=false"],
    "bank": ["model.use_internal_memory=false", "model.use_external_memory=true"],
    "hybrid": ["model.use_internal_memory=true", "model.use_external_memory=true"],
}


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def search_speed(n_tokens: int, repeats: int, seed: int = 0) -> dict:
    """Per-query-token search time of both engines over a bank of n_tokens per head."""
    faiss = faiss_module()
    rng = np.random.default_rng(seed)
    n_chunks = n_tokens // CHUNK
    keys = rng.standard_normal((HEADS, n_chunks, HEAD_DIM), dtype=np.float32)
    queries = rng.standard_normal((HEADS, QUERIES, HEAD_DIM), dtype=np.float32)
    indexes = []
    for h in range(HEADS):
        index = faiss.IndexFlatIP(HEAD_DIM)
        index.add(keys[h])
        indexes.append(index)
    keys_t, queries_t = torch.from_numpy(keys), torch.from_numpy(queries)
    found = {}

    def with_faiss():
        found["faiss"] = np.stack([indexes[h].search(queries[h], TOP_CHUNKS)[1] for h in range(HEADS)])

    def with_torch():
        found["torch"] = (queries_t @ keys_t.transpose(1, 2)).topk(TOP_CHUNKS, dim=-1).indices

    t_faiss, t_torch = _best_of(with_faiss, repeats), _best_of(with_torch, repeats)
    per_token = HEADS * QUERIES
    return {
        "faiss_us_per_query_token": 1e6 * t_faiss / per_token,
        "torch_us_per_query_token": 1e6 * t_torch / per_token,
        "faiss_over_torch": t_faiss / t_torch,
        "same_chunks": bool(np.array_equal(np.sort(found["faiss"], -1), np.sort(found["torch"].numpy(), -1))),
        "chunks_per_head": n_chunks,
    }


def _batches(args: TrainArgs, n: int = 4) -> list:
    """Random bytes with a BOS at each row's start and one document boundary mid-window."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.data.batch_size, args.data.seq_len + 1)
    out = []
    for _ in range(n):
        t = torch.randint(0, 256, shape, generator=gen)
        t[:, 0] = BOS
        t[:, shape[1] // 2 + 3] = BOS
        out.append((t[:, :-1], t[:, 1:]))
    return out


def step_overheads(config: str, rounds: int, warmup: int, overrides: list[str]) -> dict:
    base = [f"config={config}", f"model.vocab_size={VOCAB}", f"model.bos_id={BOS}", "distributed.compile=false",
            *overrides]
    runners, times = {}, {}
    for kind, flags in KINDS.items():
        args = load_config(TrainArgs, base + flags)
        runners[kind] = Runner(args, _batches(args))
        logger.info("%s: %d warm-up steps", kind, warmup)
        runners[kind].run(warmup)
        times[kind] = []
    kinds = list(KINDS)
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:  # rotate who goes first
            times[kind].append(runners[kind].run(1))
        logger.info("round %d: %s", r + 1, "  ".join(f"{k} {t[-1]:.3f}s" for k, t in times.items()))
    overhead = {kind: statistics.median(m / p for m, p in zip(times[kind], times["none"])) - 1
                for kind in kinds if kind != "none"}
    return {"step_overhead": overhead,
            "step_seconds": {kind: statistics.median(t) for kind, t in times.items()},
            "targets": {kind: {"max": target, "met": overhead[kind] <= target} for kind, target in TARGETS.items()},
            "tokens_per_step": args.data.batch_size * args.data.seq_len, "segment_length": args.model.segment_length}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--sizes", default="4096,65536,1048576", help="bank sizes in tokens (per head)")
    parser.add_argument("--search_repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="timed training-step rounds per kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every model")
    ns = parser.parse_args(argv)
    stderr_logging(logger)
    sizes = [int(s) for s in ns.sizes.split(",") if s]
    faiss_vs_torch = {}
    for n in sizes:
        logger.info("search over %d tokens per head", n)
        faiss_vs_torch[str(n)] = search_speed(n, ns.search_repeats)
    steps = step_overheads(ns.config, ns.rounds, ns.warmup, ns.overrides)
    result = {"faiss_vs_torch": faiss_vs_torch, **steps,
              "search_shape": {"heads": HEADS, "head_dim": HEAD_DIM, "chunk_size": CHUNK, "top_chunks": TOP_CHUNKS,
                               "query_tokens": QUERIES},
              "config": {"config": ns.config, "overrides": ns.overrides, "rounds": ns.rounds, "compiled": False,
                         "threads": torch.get_num_threads()},
              "machine": machine_info(torch.device("cpu")), "torch": torch.__version__,
              "faiss": faiss_module().__version__}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
