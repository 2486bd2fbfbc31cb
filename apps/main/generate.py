"""Sampling from a checkpoint with a KV cache: prefill the prompt once, then one token per
step. Temperature 0 is greedy; top-k and top-p filter before sampling. A segment model (memory
slots, memory bank) decodes with its memory (LMTransformer.new_segment_decoder).

    python -m apps.main.generate ckpt_dir=./dump/debug prompt='def ' max_gen_len=200 temperature=0.8
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from apps.main.eval import load_model_from_checkpoint, resolve_ckpt_dir
from apps.main.transformer import LMTransformer
from lingua.args import cli_main
from lingua.distributed import default_device
from lingua.logger import init_logger
from lingua.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class GeneratorArgs:
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_gen_len: int = 256  # new tokens per prompt
    max_tokens: Optional[int] = None  # prompt + generation; defaults to model.max_seqlen
    until: list[str] = field(default_factory=list)  # stop when one of these strings appears
    seed: int = 0


@dataclass
class GenerateCLIArgs:
    ckpt_dir: str = ""
    prompt: list[str] = field(default_factory=list)
    generator: GeneratorArgs = field(default_factory=GeneratorArgs)


def sample_next(logits: torch.Tensor, args: GeneratorArgs, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if args.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / args.temperature, dim=-1)
    if args.top_k is not None and args.top_k > 0:
        kth = torch.topk(probs, min(args.top_k, probs.shape[-1]), dim=-1).values[..., -1, None]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if args.top_p is not None and 0 < args.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        drop = cumulative - sorted_probs > args.top_p * cumulative[..., -1:]  # keep the smallest set >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LMTransformer, tokenizer: Tokenizer, prompts: list[str], args: GeneratorArgs,
             prompt_budget: Optional[int] = None) -> list[str]:
    """One completion per prompt (each prompt decoded on its own, batch 1); `prompt_budget`: a
    prompt keeps at most its last that many tokens (default: all that fit with one more)."""
    device = next(model.parameters()).device
    max_tokens = min(args.max_tokens or model.args.max_seqlen, model.args.max_seqlen)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    outputs = []
    segmented = model.args.segment_length > 0
    if segmented:  # positions restart in every segment: only max_tokens bounds the length
        max_tokens = args.max_tokens or 1 << 30
    for prompt in prompts:
        keep = max_tokens - 1 if prompt_budget is None else min(prompt_budget, max_tokens - 1)
        tokens = tokenizer.encode(prompt, add_bos=True, add_eos=False)[-keep:]
        if segmented:  # the memory is built from the prompt's segments, then carried on
            decoder = model.new_segment_decoder(1)
            step = lambda t, pos: decoder.feed(t)  # noqa: E731
        else:
            caches = model.new_kv_caches(1, max_tokens)
            step = lambda t, pos: model(t, kv_caches=caches, start=pos)[:, -1]  # noqa: E731
        logits = step(torch.tensor([tokens], device=device), 0)
        generated: list[int] = []
        pos = len(tokens)
        while len(generated) < args.max_gen_len and pos < max_tokens:
            nxt = int(sample_next(logits, args, generator)[0])
            if nxt == tokenizer.eos_id:
                break
            generated.append(nxt)
            if args.until and any(u in tokenizer.decode(generated) for u in args.until):
                break
            logits = step(torch.tensor([[nxt]], device=device), pos)
            pos += 1
        text = tokenizer.decode(generated)
        for u in args.until:
            if u in text:
                text = text[: text.index(u)]
        outputs.append(text)
    return outputs


def main(argv: Optional[list[str]] = None) -> list[str]:
    args = cli_main(GenerateCLIArgs, argv)
    init_logger(0)
    if not args.ckpt_dir:
        raise SystemExit("config error: ckpt_dir is required (a checkpoint dir or a training dump_dir)")
    ckpt = resolve_ckpt_dir(args.ckpt_dir)
    model, tokenizer, _ = load_model_from_checkpoint(ckpt, default_device())
    prompts = args.prompt or [""]
    outputs = generate(model, tokenizer, prompts, args.generator)
    logger.info("sampled from %s", ckpt)
    for prompt, out in zip(prompts, outputs):
        print(f"--- prompt: {prompt!r}\n{prompt}{out}\n", flush=True)
    return outputs


if __name__ == "__main__":
    main()
