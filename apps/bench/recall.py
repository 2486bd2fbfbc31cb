"""Does it remember? A pass-key recall task whose answer lies segments before the question.

`python -m apps.bench.recall [--steps 600] [--eval_every 100] [key=value ...]` generates
windows of `segments` x `segment_length` tokens:

    BOS  KEY  v  filler ...  (>= 2 whole segments of filler)  ...  QUERY  -> v

`v` is one of `n_values` value tokens, the filler random tokens from their own range, and only
the answer after QUERY is a label. The value sits in the first segment and the question at the
end of the last, so a segment model without memory can only guess (chance = 1 / n_values);
LM2 slots and the LongMem bank must carry it over the segments between. Five models train at
equal steps, shape and data (the same batches): the no-memory segment model (`baseline`),
`slots`, `bank` (detached cache, as LongMem), `bank_trained_keys` (external_memory_grad),
`hybrid`, and `full_attention` over the whole window (the upper reference).
One JSON object: `accuracy` (exact match on held-out windows) per model, `chance`, the learning
curves (`curves`: accuracy against steps), step time, activation memory saved for backward per
step (and peak CUDA memory on a GPU). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from apps.bench.common import machine_info, stderr_logging
from apps.main.train import IGNORE_INDEX, TrainArgs, train_step
from apps.main.transformer import build_model
from lingua.args import load_config
from lingua.optim import build_optimizer

logger = logging.getLogger(__name__)

PAD, BOS, KEY, QUERY = 0, 1, 2, 3
MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.multiple_of=64", "model.memory_slots=8",
         "model.num_mem_heads=2", "model.chunk_size=4", "model.retrieval_k=8", "model.retrieval_layer_index=1",
         "optim.lr=3e-3", "optim.warmup=20", "optim.lr_min_ratio=0.1", "optim.clip=1.0", "optim.weight_decay=0.0",
         "dump_dir=/unused"]
VARIANTS = {
    "baseline": ["model.use_internal_memory=false", "model.use_external_memory=false"],
    "slots": ["model.use_internal_memory=true", "model.use_external_memory=false"],
    "bank": ["model.use_internal_memory=false", "model.use_external_memory=true"],
    # The bank with gradients through its cached keys and values (LongMem detaches them): trained
    # from scratch, detached keys never learn to be found.
    "bank_trained_keys": ["model.use_internal_memory=false", "model.use_external_memory=true",
                          "model.external_memory_grad=true"],
    "hybrid": ["model.use_internal_memory=true", "model.use_external_memory=true"],
    "full_attention": ["model.use_internal_memory=false", "model.use_external_memory=false",
                       "model.segment_length=0"],
}


class RecallTask:
    """Token ids: 0-3 special, then n_values values, then n_filler filler tokens."""

    def __init__(self, segment_length: int, segments: int, n_values: int, n_filler: int):
        if segments < 4:
            raise ValueError("--segments must be >= 4: the value's segment, >= 2 of filler, the question's")
        self.L, self.segments, self.n_values, self.n_filler = segment_length, segments, n_values, n_filler
        self.seq_len = segment_length * segments
        self.vocab = 4 + n_values + n_filler

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, labels, answers): the answer is the label at the last position only."""
        x = torch.randint(4 + self.n_values, self.vocab, (size, self.seq_len), generator=gen)
        values = torch.randint(0, self.n_values, (size,), generator=gen) + 4
        offset = torch.randint(0, self.L - 2, (size,), generator=gen)  # anywhere in the first segment
        rows = torch.arange(size)
        x[:, 0] = BOS
        x[rows, 1 + offset] = KEY
        x[rows, 2 + offset] = values
        x[:, -1] = QUERY
        labels = torch.full_like(x, IGNORE_INDEX)
        labels[:, -1] = values
        return x, labels, values


def saved_activation_bytes(model, x, labels) -> int:
    """Bytes of the tensors one forward keeps for backward (activation memory, any device)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, target=labels, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def accuracy(model, task: RecallTask, n: int, seed: int, batch: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    hits = 0
    for start in range(0, n, batch):
        x, _, answers = task.batch(min(batch, n - start), gen)
        hits += int((model(x)[:, -1].argmax(-1) == answers).sum())
    model.train()
    return hits / n


def train_variant(name: str, args: TrainArgs, task: RecallTask, steps: int, batch: int, eval_every: int,
                  n_eval: int, seed: int) -> dict:
    torch.manual_seed(args.model.seed)
    model = build_model(args.model)
    optimizer, scheduler = build_optimizer(model, args.optim, steps)
    gen = torch.Generator().manual_seed(seed)  # the same batches for every variant
    curve, times = [], []
    for step in range(1, steps + 1):
        x, labels, _ = task.batch(batch, gen)
        t0 = time.perf_counter()
        result = train_step(model, optimizer, scheduler, [(x, labels)], args.optim.clip)
        loss = float(result.loss)
        times.append(time.perf_counter() - t0)
        if step % eval_every == 0 or step == steps:
            acc = accuracy(model, task, n_eval, seed + 1, batch)
            curve.append({"step": step, "accuracy": acc, "loss": loss})
            logger.info("%s step %d: loss %.3f, held-out accuracy %.3f", name, step, loss, acc)
    x, labels, _ = task.batch(batch, torch.Generator().manual_seed(seed + 2))
    out = {"accuracy": curve[-1]["accuracy"], "curve": curve, "step_seconds": statistics.median(times[1:] or times),
           "saved_activation_bytes": saved_activation_bytes(model, x, labels)}
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--segment_length", type=int, default=16)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--n_values", type=int, default=16)
    parser.add_argument("--n_filler", type=int, default=64)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--n_eval", type=int, default=512, help="held-out windows per evaluation")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every model")
    ns = parser.parse_args(argv)
    stderr_logging(logger)
    task = RecallTask(ns.segment_length, ns.segments, ns.n_values, ns.n_filler)
    names = [v for v in ns.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; known: {list(VARIANTS)}")
    shape = [f"model.vocab_size={task.vocab}", f"model.bos_id={BOS}", f"model.max_seqlen={task.seq_len}",
             f"data.seq_len={task.seq_len}", f"model.segment_length={ns.segment_length}",
             f"model.external_memory_size={task.seq_len}"]
    results = {}
    for name in names:
        args = load_config(TrainArgs, MODEL + shape + VARIANTS[name] + ns.overrides)
        results[name] = train_variant(name, args, task, ns.steps, ns.batch_size, ns.eval_every, ns.n_eval, ns.seed)
    chance = 1 / ns.n_values
    memory = [results[k]["accuracy"] for k in ("slots", "bank", "hybrid") if k in results]
    out = {
        "accuracy": {k: r["accuracy"] for k, r in results.items()},
        "chance": chance,
        "goal": {"memory_min": 0.9, "baseline_max": chance + 0.05,
                 "met": bool(memory) and min(memory) >= 0.9 and results.get("baseline", {"accuracy": 0})["accuracy"]
                 <= chance + 0.05},
        "curves": {k: r["curve"] for k, r in results.items()},
        "step_seconds": {k: r["step_seconds"] for k, r in results.items()},
        "saved_activation_bytes": {k: r["saved_activation_bytes"] for k, r in results.items()},
        "task": {"segment_length": ns.segment_length, "segments": ns.segments, "seq_len": task.seq_len,
                 "n_values": ns.n_values, "n_filler": ns.n_filler, "answer_distance_segments": ns.segments - 1,
                 "steps": ns.steps, "batch_size": ns.batch_size, "n_eval": ns.n_eval},
        "config": {"model": MODEL, "overrides": ns.overrides},
        "machine": machine_info(torch.device("cpu")), "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = {k: r.get("peak_cuda_bytes") for k, r in results.items()}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
