"""HMT's evaluation: each document of a split read whole, segment by segment with its memory
(as at inference), and PPL = exp(total loss / scored tokens) over the split, not the mean of
per-batch exps (the reference's defect). Figures go to metrics.eval.jsonl next to the checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from apps.hmt.data import split_documents
from lingua.checkpoint import load_model_weights
from lingua.data import IGNORE_INDEX
from lingua.distributed import collective_device, default_device, world_info
from lingua.metrics import MetricLogger

logger = logging.getLogger(__name__)


@torch.no_grad()
def split_perplexity(model, docs: list[list[int]], device: torch.device, desc: str = "",
                     after_each: Optional[Callable[[], None]] = None) -> dict:
    """{loss, ppl, tokens, docs} over every next-token prediction of the documents;
    `after_each()` runs after each document's forward (--plot_hist reads the recall weights).
    Under torchrun each rank reads its share of the documents (on a whole model: no collective
    in the forward) and the sums are added up."""
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    nll, tokens = 0.0, 0
    bar = tqdm(docs[rank::world], desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=rank > 0)
    try:
        for number, doc in enumerate(bar, start=1):
            if len(doc) < 2:
                continue
            x = torch.tensor([doc[:-1]], device=device)
            y = torch.tensor([doc[1:]], device=device)
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
            nll, tokens = nll + loss.item(), tokens + y.numel()
            if after_each is not None:
                after_each()
            # through tqdm, so the bar stays clean; stderr, so stdout keeps the results alone
            if rank == 0:
                bar.write(f"{desc} document {number}: loss {loss.item() / y.numel():.4f}", file=sys.stderr)
    finally:
        model.train(was_training)
    if world > 1:
        sums = torch.tensor([nll, tokens], dtype=torch.float64, device=collective_device())
        dist.all_reduce(sums)
        nll, tokens = float(sums[0]), int(sums[1])
    mean = nll / max(tokens, 1)
    return {"loss": mean, "ppl": math.exp(mean), "tokens": tokens, "docs": len(docs)}


class RecallHistogram:
    """Recall attention mass by how many segments back the memory was written (1: the previous
    segment), summed over every segment read; drawn as a PNG (--plot_hist)."""

    def __init__(self, model):
        self.model = model
        self.mass: dict[int, float] = {}

    def __call__(self) -> None:
        for weights in self.model.last_recall_weights:  # [B, n]: oldest first, newest last
            n = weights.shape[1]
            for back, value in zip(range(n, 0, -1), weights.sum(0).tolist()):
                self.mass[back] = self.mass.get(back, 0.0) + value

    def write(self, path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        backs = sorted(self.mass)
        total = sum(self.mass.values()) or 1.0
        ax.bar(backs, [self.mass[b] / total for b in backs])
        ax.set_xlabel("memory written this many segments back")
        ax.set_ylabel("share of recall attention")
        ax.set_title("HMT memory recall")
        fig.savefig(str(path), dpi=100)


def evaluate_splits(args, ckpt, eval_batches: int, test_batches: int, splits=("validation", "test"),
                    device: Optional[torch.device] = None, plot_hist: bool = False,
                    generate_from: Optional[str] = None, generate_tokens: int = 128) -> dict:
    """The HMT checkpoint `ckpt` on each split's first batches x batch_size documents; rank 0's
    figures appended to <ckpt's dump dir>/metrics.eval.jsonl and printed. plot_hist: the recall
    histogram of the test split to <dump dir>/recall_hist.png; generate_from: a prompt file,
    continued greedily with the memory (printed)."""
    from apps.hmt.train import build_hmt
    from apps.main.train import model_tokenizer

    device = device or default_device()
    tokenizer = model_tokenizer(args)
    model = build_hmt(args, device)
    load_model_weights(ckpt, model)
    step = int(ckpt.name) if ckpt.name.isdigit() else None
    results = {}
    for split in splits:
        n_docs = (eval_batches if split == "validation" else test_batches) * args.data.batch_size
        docs = split_documents(args.task, split, tokenizer, limit=n_docs)
        histogram = RecallHistogram(model) if plot_hist and split == "test" else None
        results[split] = split_perplexity(model, docs, device, desc=split, after_each=histogram)
        if histogram is not None and world_info().rank == 0:  # (rank 0's share of the documents)
            path = ckpt.parent.parent / "recall_hist.png"
            histogram.write(path)
            print(f"recall histogram: {path}", flush=True)
        r = results[split]
        if world_info().rank > 0:
            continue
        print(f"{split} PPL {r['ppl']:.4f} (loss {r['loss']:.4f} over {r['tokens']} tokens, {r['docs']} documents)",
              flush=True)
    if world_info().rank > 0:
        return results
    if generate_from:
        prompt = tokenizer.encode(open(generate_from, encoding="utf-8").read(), add_bos=True, add_eos=False)
        new = model.generate(prompt, generate_tokens, eos_id=tokenizer.eos_id)
        print(f"--- generated from {generate_from} ({len(prompt)} prompt tokens):\n{tokenizer.decode(new)}", flush=True)
    with MetricLogger(ckpt.parent.parent / "metrics.eval.jsonl") as m:
        m.log({"global_step": step, "checkpoint": str(ckpt), "hmt_mode": args.hmt.mode, **results}, nested=True)
    return results
