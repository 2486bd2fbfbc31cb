"""HMT's evaluation: each document of a split read whole, segment by segment with its memory
(as at inference), and PPL = exp(total loss / scored tokens) over the split, not the mean of
per-batch exps (the reference's defect). Figures go to metrics.eval.jsonl next to the checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from apps.hmt.data import load_texts
from lingua.checkpoint import load_model_weights
from lingua.data import IGNORE_INDEX
from lingua.distributed import default_device
from lingua.metrics import MetricLogger

logger = logging.getLogger(__name__)


@torch.no_grad()
def split_perplexity(model, docs: list[list[int]], device: torch.device, desc: str = "") -> dict:
    """{loss, ppl, tokens, docs} over every next-token prediction of the documents."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    bar = tqdm(docs, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        for number, doc in enumerate(bar, start=1):
            if len(doc) < 2:
                continue
            x = torch.tensor([doc[:-1]], device=device)
            y = torch.tensor([doc[1:]], device=device)
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
            nll, tokens = nll + loss.item(), tokens + y.numel()
            # through tqdm, so the bar stays clean; stderr, so stdout keeps the results alone
            bar.write(f"{desc} document {number}: loss {loss.item() / y.numel():.4f}", file=sys.stderr)
    finally:
        model.train(was_training)
    mean = nll / max(tokens, 1)
    return {"loss": mean, "ppl": math.exp(mean), "tokens": tokens, "docs": len(docs)}


def evaluate_splits(args, ckpt, eval_batches: int, test_batches: int, splits=("validation", "test"),
                    device: Optional[torch.device] = None) -> dict:
    """The HMT checkpoint `ckpt` on each split's first batches x batch_size documents; rank 0's
    figures appended to <ckpt's dump dir>/metrics.eval.jsonl and printed."""
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
        t = args.task
        texts = load_texts(t.task_name, split, t.task_config, t.data_dir, t.cache_dir)[:n_docs]
        docs = [tokenizer.encode(text, add_bos=True, add_eos=True) for text in texts]
        results[split] = split_perplexity(model, docs, device, desc=split)
        r = results[split]
        print(f"{split} PPL {r['ppl']:.4f} (loss {r['loss']:.4f} over {r['tokens']} tokens, {r['docs']} documents)",
              flush=True)
    with MetricLogger(ckpt.parent.parent / "metrics.eval.jsonl") as m:
        m.log({"global_step": step, "checkpoint": str(ckpt), "hmt_mode": args.hmt.mode, **results}, nested=True)
    return results
