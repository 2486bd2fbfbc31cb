"""The language model of apps/main: embedding -> BaseTransformer blocks -> norm -> output.

`LMTransformer(args)(tokens, target=labels)` returns the mean loss over labels != -100
(`reduction="sum"`: their sum, which the training loop normalises over a whole step);
without target it returns logits, as in Meta Lingua.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.transformer import (
    BaseTransformer,
    BaseTransformerArgs,
    KVCache,
    ParamInit,
    RMSNorm,
    matmul_flops_per_token,
)

from lingua.data import IGNORE_INDEX  # noqa: F401  (re-exported: the label models ignore)


@dataclass
class LMTransformerArgs(BaseTransformerArgs):
    seed: int = 42
    vocab_size: int = -1  # -1: taken from the tokenizer at build time
    weight_tying: bool = False
    sliding_window: Optional[int] = None


class LMTransformer(BaseTransformer):
    def __init__(self, args: LMTransformerArgs):
        if args.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (train.py fills it from the tokenizer when -1)")
        super().__init__(args, sliding_window=args.sliding_window)
        self.weight_tying = args.weight_tying
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.weight_tying:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        kv_caches: Optional[list[KVCache]] = None,
        start: int = 0,
        reduction: str = "mean",
    ) -> torch.Tensor:
        h = self.forward_blocks(self.tok_embeddings(tokens), kv_caches, start)
        logits = self.output(self.norm(h))
        if target is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)

    def reset_parameters(self, init: ParamInit) -> None:
        super().reset_parameters(init)
        std = self.init_std()
        init.trunc_normal_(self.tok_embeddings.weight, std)
        self.norm.reset_parameters(init)
        if not self.weight_tying:
            init.trunc_normal_(self.output.weight, std)

    def new_kv_caches(self, batch: int, max_len: int) -> list[KVCache]:
        _, n_kv_heads, head_dim = self.args.resolved_heads()
        p = self.output.weight
        return [KVCache.empty(batch, n_kv_heads, max_len, head_dim, p.device, p.dtype) for _ in self.layers]

    def num_matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all but the embedding lookup."""
        total = sum(p.numel() for p in self.parameters())
        if not self.weight_tying:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        return matmul_flops_per_token(self.num_matmul_params(), self.args.n_layers, self.args.dim, seq_len)


def build_model(args: LMTransformerArgs, device: torch.device | str = "cpu") -> LMTransformer:
    """Build and initialise from args.seed (the same values on any device or sharding)."""
    with torch.device(device):
        model = LMTransformer(args)
    if torch.device(device).type != "meta":
        model.reset_parameters(ParamInit(args.seed))
    return model
