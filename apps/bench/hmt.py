"""Does HMT help? The backbone alone on segments, RMT and HMT at equal steps and backbone.

`python -m apps.bench.hmt [--steps 300] [--backbone_steps 400] [--recall_steps 600] ...`

1. Perplexity on long documents (Python's own stdlib sources, the files longer than
   `--min_doc_tokens` bytes): a small byte-level backbone is pretrained on windows of one
   segment, then each variant (`baseline`: the backbone on segments, `rmt`: memory tokens passed
   on, `hmt`: sensory memory, representation and recall) fine-tunes a copy of it for the same
   steps on windows of `bptt_depth` segments, and is scored on held-out documents read whole:
   PPL = exp(mean loss per token) over the first `--test_tokens` bytes of each.
2. Recall: apps.bench.recall's pass-key task (the answer lies >= 2 segments before the question),
   each variant trained from scratch on it at equal steps: exact match on held-out windows,
   against chance.

One JSON object: `ppl: {baseline, rmt, hmt}`, `recall: {baseline, rmt, hmt}`, `chance`,
`seconds_per_segment` (training, per variant), the learning curves and the settings. Logs to
stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from apps.bench.common import machine_info, stderr_logging
from apps.bench.recall import RecallTask
from apps.hmt.data import DocumentBatches, document_windows
from apps.hmt.eval import split_perplexity
from apps.hmt.model import HMT, HMTArgs, LinguaBackbone
from apps.main.train import train_step
from apps.main.transformer import LMTransformerArgs, build_model
from lingua.optim import OptimArgs, build_optimizer
from lingua.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

# hmt_paper_summary: HMT with the paper's summary of the segment's own first tokens, which
# every position of the segment sees (a leak of later tokens: its PPL is optimistic).
VARIANTS = ("baseline", "rmt", "hmt", "hmt_paper_summary")


def stdlib_documents(min_bytes: int, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [t for t in (f.read_text(encoding="utf-8", errors="replace") for f in files) if len(t) >= min_bytes]
    if len(texts) < n_train + n_test:
        raise SystemExit(f"only {len(texts)} stdlib files of >= {min_bytes} bytes; lower --n_train/--n_test")
    return texts[n_test : n_test + n_train], texts[:n_test]


def hmt_args(variant: str, content: int, ns) -> HMTArgs:
    mode, summary = ("hmt", "current") if variant == "hmt_paper_summary" else (variant, "previous")
    sensory = ns.num_sensory if mode == "hmt" else 0
    length = content if mode == "baseline" else content + 2 + sensory  # the same text per segment
    return HMTArgs(mode=mode, segment_length=length, num_sensory=sensory, mem_recall_context=ns.mem_recall_context,
                   mem_recall_hidden_dim=ns.mem_recall_hidden_dim, sum_fraction=0.5, bptt_depth=ns.bptt_depth,
                   summary=summary)


def fit(model, batches, steps: int, lr: float, warmup: int, every: int = 0, on_eval=None) -> tuple[list[float], float]:
    """Train `steps` steps with apps/main's train_step (on_eval(step) every `every` steps);
    (losses, median seconds per step)."""
    optimizer, scheduler = build_optimizer(model, OptimArgs(lr=lr, warmup=warmup, weight_decay=0.0,
                                                            scheduler="cosine", lr_min_ratio=0.1), steps)
    model.train()
    losses, times = [], []
    for step in range(1, steps + 1):
        x, y = batches()
        t0 = time.perf_counter()
        losses.append(float(train_step(model, optimizer, scheduler, [(x, y)], 1.0).loss))
        times.append(time.perf_counter() - t0)
        if on_eval is not None and (step % every == 0 or step == steps):
            on_eval(step)
    return losses, statistics.median(times[1:] or times)


def backbone_args(vocab: int, max_len: int, ns) -> LMTransformerArgs:
    return LMTransformerArgs(dim=ns.dim, n_layers=ns.n_layers, n_heads=ns.n_heads, multiple_of=64, vocab_size=vocab,
                             max_seqlen=max_len, seed=ns.seed)


def perplexity_part(ns) -> dict:
    tok = ByteTokenizer()
    train_texts, test_texts = stdlib_documents(ns.min_doc_tokens, ns.n_train, ns.n_test)
    train_docs = [tok.encode(t) for t in train_texts]
    test_docs = [tok.encode(t)[: ns.test_tokens] for t in test_texts]
    L = ns.content_length
    max_len = L + 2 + ns.num_sensory
    backbone = build_model(backbone_args(tok.n_words, max_len, ns))
    pretrain = DocumentBatches(document_windows(train_docs, L), ns.batch_size, seed=ns.seed, shuffle=True)
    losses, _ = fit(backbone, lambda: tuple(map(torch.from_numpy, next(pretrain))), ns.backbone_steps, ns.lr, 20)
    logger.info("backbone pretrained %d steps on windows of %d: loss %.3f", ns.backbone_steps, L, losses[-1])
    out = {"ppl": {}, "train_loss": {}, "seconds_per_segment": {}}
    window = L * max(ns.bptt_depth, 2)
    for mode in VARIANTS:
        model = HMT(LinguaBackbone(copy.deepcopy(backbone)), hmt_args(mode, L, ns))
        batches = DocumentBatches(document_windows(train_docs, window), ns.batch_size, seed=ns.seed + 1, shuffle=True)
        losses, seconds = fit(model, lambda: tuple(map(torch.from_numpy, next(batches))), ns.steps, ns.lr / 3, 10)
        result = split_perplexity(model, test_docs, torch.device("cpu"), desc=mode)
        out["ppl"][mode] = result["ppl"]
        out["train_loss"][mode] = statistics.mean(losses[-10:])
        out["seconds_per_segment"][mode] = seconds / (window // L)
        logger.info("%s: test PPL %.3f over %d tokens (train loss %.3f)", mode, result["ppl"], result["tokens"],
                    out["train_loss"][mode])
    out["test_tokens"] = sum(len(d) - 1 for d in test_docs)
    return out


def recall_part(ns) -> dict:
    task = RecallTask(ns.recall_segment_length, ns.recall_segments, ns.n_values, ns.n_filler)
    max_len = task.L + 2 + ns.num_sensory
    out, curves = {}, {}
    for mode in VARIANTS:
        torch.manual_seed(ns.seed)
        backbone = build_model(backbone_args(task.vocab, max_len, ns))
        args = hmt_args(mode, task.L, ns)
        args.bptt_depth = 0  # the whole window: the value must travel the segments to the question
        model = HMT(LinguaBackbone(backbone), args)
        gen = torch.Generator().manual_seed(ns.seed)  # the same batches for every variant
        curve = []

        def evaluate(step, mode=mode, model=model, curve=curve):
            curve.append({"step": step, "accuracy": recall_accuracy(model, task, ns)})
            logger.info("recall %s step %d: accuracy %.3f", mode, step, curve[-1]["accuracy"])

        _, seconds = fit(model, lambda: task.batch(ns.batch_size * 2, gen)[:2], ns.recall_steps, ns.recall_lr, 20,
                         ns.eval_every, evaluate)
        out[mode], curves[mode] = curve[-1]["accuracy"], curve
    return {"recall": out, "chance": 1 / ns.n_values, "recall_curves": curves,
            "recall_task": {"segment_length": task.L, "segments": task.segments, "n_values": ns.n_values}}


@torch.no_grad()
def recall_accuracy(model, task: RecallTask, ns) -> float:
    gen = torch.Generator().manual_seed(ns.seed + 1)
    model.eval()
    hits = 0
    for _ in range(ns.n_eval // ns.batch_size):
        x, _, answers = task.batch(ns.batch_size, gen)
        hits += int((model(x)[:, -1].argmax(-1) == answers).sum())
    model.train()
    return hits / (ns.n_eval // ns.batch_size * ns.batch_size)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each variant (perplexity)")
    p.add_argument("--backbone_steps", type=int, default=400)
    p.add_argument("--recall_steps", type=int, default=600)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--content_length", type=int, default=64, help="text tokens per segment")
    p.add_argument("--bptt_depth", type=int, default=3)
    p.add_argument("--num_sensory", type=int, default=8)
    p.add_argument("--mem_recall_context", type=int, default=16)
    p.add_argument("--mem_recall_hidden_dim", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--recall_lr", type=float, default=3e-3)
    p.add_argument("--min_doc_tokens", type=int, default=8000)
    p.add_argument("--n_train", type=int, default=60)
    p.add_argument("--n_test", type=int, default=8)
    p.add_argument("--test_tokens", type=int, default=2000)
    p.add_argument("--recall_segment_length", type=int, default=16)
    p.add_argument("--recall_segments", type=int, default=4)
    p.add_argument("--n_values", type=int, default=16)
    p.add_argument("--n_filler", type=int, default=64)
    p.add_argument("--n_eval", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="ppl,recall", help="which parts to run: ppl, recall")
    ns = p.parse_args(argv)
    stderr_logging(logger)
    torch.manual_seed(ns.seed)
    parts = set(ns.parts.split(","))
    out: dict = {}
    if "ppl" in parts:
        out.update(perplexity_part(ns))
    if "recall" in parts:
        out.update(recall_part(ns))
    if "ppl" in out:
        p_ = out["ppl"]
        out["goal"] = {"hmt_below_baseline_and_rmt": p_["hmt"] < p_["baseline"] and p_["hmt"] < p_["rmt"]}
    out.update(settings=vars(ns), machine=machine_info(torch.device("cpu")), torch=torch.__version__)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
