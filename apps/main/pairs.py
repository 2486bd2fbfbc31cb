"""Evaluation on input/output pairs (setup/prepare_io_data.py's test split): the loss on output
tokens, and greedy generation of each output from its input, scored by exact match and ROUGE-L.

    python -m apps.main.eval ckpt_dir=./dump/hybrid_debug pairs.path=datasets/io_pairs/test

A segment model builds its memory from the input's segments and decodes with it
(LMTransformer.new_segment_decoder), as it would at inference. The figures go to
metrics.eval.jsonl (apps.main.eval, and the training loop when eval.pairs.path is set).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lingua.args import ConfigError
from lingua.data import IGNORE_INDEX, DataArgs, document_segments, encode_document, labels_from
from lingua.distributed import collective_device
from lingua.storage import resolve


@dataclass
class PairsArgs:
    path: str = ""  # a directory of {"input", "output"} JSONL files, or one such file; "" = off
    max_pairs: Optional[int] = None  # the first N pairs (all ranks together)
    max_gen_len: int = 64  # new tokens per generated output


def read_pairs(path: str, max_pairs: Optional[int] = None) -> list[dict]:
    root = resolve(path)
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root]
    if not files or not files[0].exists():
        raise ConfigError(f"pairs.path='{path}': no .jsonl files (prepare them with setup/prepare_io_data.py)")
    pairs = []
    for f in files:
        # newlines only: splitlines() also splits at U+2028, U+0085, \x0c, \x1c-\x1e inside a record
        for number, line in enumerate(f.read_text().split("\n"), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("input"), str)
                    and isinstance(record.get("output"), str)):
                raise ConfigError(f"{f}:{number}: expected an object with string fields 'input' and 'output'")
            pairs.append(record)
    return pairs[:max_pairs] if max_pairs is not None else pairs


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer  # the rouge-score package (requirements.txt)

    # rouge-score's default tokenizer keeps only [a-z0-9]: Japanese or Cyrillic text would score 0.
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWords())  # built once (it logs on construction)


class UnicodeWords:
    """ROUGE's tokens in any script: lowercased runs of letters and digits, each character of a
    script written without spaces (CJK, kana, Thai, ...) a token of its own."""

    WORD = re.compile(r"[^\W_]+")
    UNSPACED = re.compile(r"([\u0e00-\u0eff\u1000-\u109f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
                          r"\uf900-\ufaff\uff66-\uff9f])")

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for word in self.WORD.findall(text.lower()):
            tokens += [t for t in self.UNSPACED.split(word) if t]
        return tokens


def rouge_l(reference: str, prediction: str) -> float:
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


@torch.no_grad()
def evaluate_pairs(model, tokenizer, args: PairsArgs, data: DataArgs, device: torch.device, rank: int = 0,
                   world_size: int = 1) -> dict:
    """{loss, exact_match, rouge_l, pairs, tokens} over all ranks (pair i on rank i % world_size)."""
    from apps.main.generate import GeneratorArgs, generate  # generate imports apps.main.eval, which imports us

    pairs = read_pairs(args.path, args.max_pairs)
    segmented = model.args.segment_length > 0
    was_training = model.training
    model.eval()
    nll = exact = rouge = 0.0
    n_tokens = n_pairs = 0
    try:
        for i, record in enumerate(pairs):
            if i % world_size != rank:
                continue
            tokens, mask = encode_document(tokenizer, document_segments(record, f"{args.path} pair {i}"),
                                           data.add_bos, data.add_eos)
            if not segmented and len(tokens) - 1 > model.args.max_seqlen:
                raise ConfigError(f"pair {i} of {args.path} has {len(tokens)} tokens, more than model.max_seqlen="
                                  f"{model.args.max_seqlen} (a segment model has no such limit)")
            x = torch.from_numpy(np.ascontiguousarray(tokens[:-1]))[None].to(device)
            y = torch.from_numpy(np.ascontiguousarray(labels_from(tokens, mask)))[None].to(device)
            logits = model(x)
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum").item()
            n_tokens += int((y != IGNORE_INDEX).sum())
            predicted = generate(model, tokenizer, [record["input"]], GeneratorArgs(max_gen_len=args.max_gen_len))[0]
            exact += float(predicted.strip() == record["output"].strip())
            rouge += rouge_l(record["output"], predicted)
            n_pairs += 1
    finally:
        model.train(was_training)
    sums = torch.tensor([nll, n_tokens, exact, rouge, n_pairs], dtype=torch.float64, device=collective_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    nll, n_tokens, exact, rouge, n_pairs = sums.tolist()
    return {"loss": nll / max(n_tokens, 1), "exact_match": exact / max(n_pairs, 1),
            "rouge_l": rouge / max(n_pairs, 1), "pairs": int(n_pairs), "tokens": int(n_tokens)}
