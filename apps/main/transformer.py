"""The language model of apps/main: embedding -> BaseTransformer blocks -> norm -> output.

`LMTransformer(args)(tokens, target=labels)` returns the mean loss over labels != -100
(`reduction="sum"`: their sum, which the training loop normalises over a whole step);
without target it returns logits, as in Meta Lingua.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.data import IGNORE_INDEX
from lingua.product_key.memory import ProductKeyArgs, ProductKeyMemory, ValueTable, value_overrides
from lingua.transformer import (
    BaseTransformer,
    BaseTransformerArgs,
    KVCache,
    ParamInit,
    RMSNorm,
    matmul_flops_per_token,
)


@dataclass
class LMTransformerArgs(BaseTransformerArgs):
    seed: int = 42
    vocab_size: int = -1  # -1: taken from the tokenizer at build time
    weight_tying: bool = False
    sliding_window: Optional[int] = None
    productkey_args: ProductKeyArgs = field(default_factory=ProductKeyArgs)


class LMTransformer(BaseTransformer):
    def __init__(self, args: LMTransformerArgs):
        if args.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (train.py fills it from the tokenizer when -1)")
        pk = args.productkey_args
        self.memory_layers = pk.layer_ids(args.n_layers) if pk.is_enabled else []
        self.memory_values: Optional[ValueTable] = None  # the shared table, created with the first memory
        super().__init__(args, sliding_window=args.sliding_window)
        self.weight_tying = args.weight_tying
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.weight_tying:
            self.output.weight = self.tok_embeddings.weight

    def build_feed_forward(self, args: LMTransformerArgs, layer_id: int) -> nn.Module:
        if layer_id not in self.memory_layers:
            return super().build_feed_forward(args, layer_id)
        pk = args.productkey_args
        if pk.mem_share_values and self.memory_values is None:
            self.memory_values = ValueTable(pk.mem_n_keys**2, pk.value_dim(args.dim), pk.peer_variant)
        return ProductKeyMemory(args.dim, pk, self.memory_values if pk.mem_share_values else None)

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
        if self.memory_values is not None:
            self.memory_values.reset_parameters(init)

    def optim_overrides(self) -> dict[str, dict]:
        if self.memory_values is None:
            return {}
        return value_overrides(self.memory_values, "memory_values", self.args.productkey_args)

    def new_kv_caches(self, batch: int, max_len: int) -> list[KVCache]:
        _, n_kv_heads, head_dim = self.args.resolved_heads()
        p = self.output.weight
        return [KVCache.empty(batch, n_kv_heads, max_len, head_dim, p.device, p.dtype) for _ in self.layers]

    def num_matmul_params(self, trainable_only: bool = False) -> int:
        """Parameters that take part in a matmul per token: all but the embedding lookup, and
        of a memory's value table only the rows a token reads (heads * knn per memory layer).
        trainable_only: of those, the ones that require grad (not in a frozen component)."""
        counted = lambda p: p.requires_grad or not trainable_only  # noqa: E731
        tables = {id(p) for m in self.modules() if isinstance(m, ValueTable) for p in m.parameters()}
        total = sum(p.numel() for p in self.parameters() if id(p) not in tables and counted(p))
        if not self.weight_tying and counted(self.tok_embeddings.weight):
            total -= self.tok_embeddings.weight.numel()
        return total + sum(m.lookup_params_per_token() for m in self.modules()
                           if isinstance(m, ProductKeyMemory) and counted(m.values.weight))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (frozen components: forward only)."""
        return matmul_flops_per_token(self.num_matmul_params(), self.args.n_layers, self.args.dim, seq_len,
                                      n_trainable=self.num_matmul_params(trainable_only=True))


def build_model(args: LMTransformerArgs, device: torch.device | str = "cpu") -> LMTransformer:
    """Build and initialise from args.seed (the same values on any device or sharding)."""
    with torch.device(device):
        model = LMTransformer(args)
    if torch.device(device).type != "meta":
        model.reset_parameters(ParamInit(args.seed))
    return model
