"""The language model of apps/main: embedding -> BaseTransformer blocks -> norm -> output.

`LMTransformer(args)(tokens, target=labels)` returns the mean loss over labels != -100
(`reduction="sum"`: their sum, which the training loop normalises over a whole step);
without target it returns logits, as in Meta Lingua.

With `segment_length` > 0 a window is processed segment by segment (lingua.segments): each
segment attends within itself and within each token's document, with RoPE positions from 0,
and the memory modules (LM2 slots: `use_internal_memory`) carry state from one segment to the
next within a document. `segment_length` alone is the no-memory segment baseline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.data import IGNORE_INDEX
from lingua.memory_bank import MemoryBank
from lingua.memory_slots import MemorySlots
from lingua.product_key.memory import ProductKeyArgs, ProductKeyMemory, ValueTable, clear_auxiliary_stats, value_overrides
from lingua.segments import MemoryState, SegmentContext, document_ids, split_segments
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
    # Recurrent memory (not in Meta Lingua; names as the LM2/LongMem hybrid trainer's):
    bos_id: int = -1  # documents start at BOS; -1: the tokenizer's (train.py fills it)
    segment_length: int = 0  # 0: the whole window at once; > 0: segments of this many tokens
    bptt_depth: int = 0  # gradients flow through at most this many segments of state; 0: all; 1 refused with memory
    use_internal_memory: bool = False  # LM2 memory slots
    memory_slots: int = 16  # N slots per memory block
    num_mem_heads: int = 4
    memory_layers: Optional[list[int]] = None  # blocks with slots; None: all (as LM2)
    use_external_memory: bool = False  # LongMem bank (FAISS)
    external_memory_size: int = 65536  # tokens kept per document (FIFO)
    chunk_size: int = 4  # tokens per bank entry (keyed by their mean key)
    retrieval_k: int = 64  # tokens retrieved per query, in chunks of chunk_size
    retrieval_layer_index: Optional[int] = None  # the block whose keys/values are cached; None: n_layers // 2
    use_gpu_to_search: bool = False  # faiss-gpu's index when on a GPU
    external_memory_grad: bool = False  # gradients reach the cached keys/values in the window (LongMem: no)

    def check_memory(self, bos_known: bool = True) -> None:
        """ValueError naming the model key when the segment and memory settings do not fit
        (bos_known=False: before the tokenizer has filled bos_id)."""
        if self.segment_length < 0 or self.bptt_depth < 0:
            raise ValueError("model.segment_length and model.bptt_depth must be >= 0")
        for key in ("use_internal_memory", "use_external_memory"):
            if getattr(self, key) and self.segment_length == 0:
                raise ValueError(f"model.{key} needs model.segment_length > 0: the memory is written after each "
                                 "segment")
        if self.use_external_memory:
            c = self.chunk_size
            if c < 1 or self.segment_length % c:
                raise ValueError(f"model.chunk_size={c} must divide model.segment_length={self.segment_length}")
            for key in ("external_memory_size", "retrieval_k"):
                if getattr(self, key) < c or getattr(self, key) % c:
                    raise ValueError(f"model.{key}={getattr(self, key)} must be a positive multiple of "
                                     f"model.chunk_size={c}")
            if not 0 <= self.bank_layer() < self.n_layers:
                raise ValueError(f"model.retrieval_layer_index={self.retrieval_layer_index} is not a block of a "
                                 f"{self.n_layers}-block model")
        trained_writes = self.use_internal_memory or (self.use_external_memory and self.external_memory_grad)
        if self.bptt_depth == 1 and trained_writes:
            # The state is detached at the end of every bptt_depth segments, before the next
            # segment reads it: with 1 the write path (LM2's write_*, gates; the bank's cached
            # keys) would never get a gradient, silently.
            raise ValueError("model.bptt_depth=1 detaches the memory after every segment, so its write path never "
                             "gets a gradient: use model.bptt_depth >= 2 (segments of state the gradient flows "
                             "through) or 0 (the whole window)")
        if self.segment_length > 0 and self.sliding_window is not None:
            raise ValueError(f"model.sliding_window={self.sliding_window} is not applied by a segment model "
                             f"(model.segment_length={self.segment_length}: attention stays within each segment); "
                             "set one of them")
        if bos_known and self.segment_length > 0 and self.bos_id < 0:
            raise ValueError("model.bos_id must be set with model.segment_length > 0 (documents start at BOS; "
                             "train.py takes the tokenizer's)")
        if self.segment_length > self.max_seqlen:
            raise ValueError(f"model.segment_length={self.segment_length} exceeds model.max_seqlen={self.max_seqlen}")
        bad = [i for i in self.memory_layers or [] if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"model.memory_layers {bad} are not blocks of a {self.n_layers}-block model")
        if self.use_internal_memory and self.memory_slots < 1:
            raise ValueError(f"model.memory_slots must be >= 1, got {self.memory_slots}")

    def bank_layer(self) -> int:
        return self.n_layers // 2 if self.retrieval_layer_index is None else self.retrieval_layer_index

    def slot_layers(self) -> list[int]:
        if not self.use_internal_memory:
            return []
        return sorted(set(self.memory_layers)) if self.memory_layers is not None else list(range(self.n_layers))


class LMTransformer(BaseTransformer):
    def __init__(self, args: LMTransformerArgs):
        if args.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (train.py fills it from the tokenizer when -1)")
        args.check_memory()
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

    def build_memory_slots(self, args: LMTransformerArgs, layer_id: int) -> Optional[MemorySlots]:
        if layer_id not in args.slot_layers():
            return None
        return MemorySlots(args.dim, args.memory_slots, args.num_mem_heads, args.norm_eps)

    def build_memory_bank(self, args: LMTransformerArgs, layer_id: int) -> Optional[MemoryBank]:
        if not args.use_external_memory or layer_id != args.bank_layer():
            return None
        n_heads, n_kv_heads, head_dim = args.resolved_heads()
        return MemoryBank(n_heads, n_kv_heads, head_dim, args.external_memory_size, args.chunk_size,
                          args.retrieval_k, args.use_gpu_to_search, args.external_memory_grad)

    def forward(
        self,
        tokens: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        kv_caches: Optional[list[KVCache]] = None,
        start: int = 0,
        reduction: str = "mean",
    ) -> torch.Tensor:
        if self.training and self.args.productkey_args.is_enabled:
            clear_auxiliary_stats(self)
        if self.args.segment_length > 0:
            if kv_caches is not None:
                raise ValueError("a segment model (model.segment_length > 0) decodes with new_segment_decoder(), "
                                 "not kv_caches: its memory is part of the decoding state")
            return self.forward_segments(tokens, target, reduction)
        h = self.forward_blocks(self.tok_embeddings(tokens), kv_caches, start)
        logits = self.output(self.norm(h))
        if target is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)

    def forward_segments(self, tokens: torch.Tensor, target: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
        """The window segment by segment, the memory state handed along; logits, or the loss
        over all segments (mean over the window's scored labels, or their sum)."""
        state, logits, loss = MemoryState(), [], None
        for segment in split_segments(document_ids(tokens, self.args.bos_id), self.args.segment_length):
            ctx = SegmentContext(segment, state)
            h = self.forward_blocks(self.tok_embeddings(tokens[:, segment.start : segment.end]), ctx=ctx)
            out = self.output(self.norm(h))
            state = ctx.next_state(self.args.bptt_depth)
            if target is None:
                logits.append(out)
                continue
            part = F.cross_entropy(out.flatten(0, 1).float(), target[:, segment.start : segment.end].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            loss = part if loss is None else loss + part
        if target is None:
            return torch.cat(logits, dim=1)
        if reduction == "sum":
            return loss
        return loss / (target != IGNORE_INDEX).sum()

    def save_pretrained(self, directory: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> Path:
        """config.yaml (the model args) + model.safetensors (the weights, no optimizer) in a new or
        empty directory (lingua.hf): for the models Hugging Face has no class for (memory, mHC),
        and any other. One process, an unsharded model."""
        from lingua.args import to_dict
        from lingua.hf import save_pretrained_files

        state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                 for k, v in self.state_dict().items()}
        return save_pretrained_files(directory, to_dict(self.args), state, tied=self.weight_tying)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> "LMTransformer":
        """The model save_pretrained wrote; its config loads strictly (an unknown key fails)."""
        from lingua.args import from_dict
        from lingua.hf import load_pretrained_files

        keys, state = load_pretrained_files(directory, str(device))
        args = from_dict(LMTransformerArgs, keys)
        with torch.device(device):
            model = cls(args)
        if args.weight_tying:
            state["output.weight"] = state["tok_embeddings.weight"]
        model.load_state_dict(state, strict=True)
        if args.weight_tying:  # load_state_dict copied into both; keep them one parameter
            model.output.weight = model.tok_embeddings.weight
        return model.eval()

    def new_segment_decoder(self, batch: int) -> "SegmentDecoder":
        return SegmentDecoder(self, batch)

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
        """Training FLOPs per token (frozen components: forward only); a segment model attends
        within segments."""
        if self.args.segment_length > 0:
            seq_len = min(seq_len, self.args.segment_length)
        return matmul_flops_per_token(self.num_matmul_params(), self.args.n_layers, self.args.dim, seq_len,
                                      n_trainable=self.num_matmul_params(trainable_only=True))


def build_model(args: LMTransformerArgs, device: torch.device | str = "cpu") -> LMTransformer:
    """Build and initialise from args.seed (the same values on any device or sharding)."""
    with torch.device(device):
        model = LMTransformer(args)
    if torch.device(device).type != "meta":
        model.reset_parameters(ParamInit(args.seed))
    return model


class SegmentDecoder:
    """Incremental decoding of a segment model with its memory: the tokens of the current
    segment go through a KV cache (positions from 0 in each segment, as in training), reading
    the memory that earlier segments wrote; when a segment is full it runs once more whole to
    write its memory update, exactly as training does, and the cache starts over. The logits
    equal those of forward_segments over the whole sequence."""

    def __init__(self, model: LMTransformer, batch: int):
        self.model, self.batch = model, batch
        self.L, self.bos = model.args.segment_length, model.args.bos_id
        self.state = MemoryState()
        device = model.output.weight.device
        self.carry_doc = torch.full((batch,), -1, dtype=torch.long, device=device)  # the state's document
        self.n_bos = torch.zeros(batch, dtype=torch.long, device=device)  # documents begun so far, per row
        self.index = 0  # segments completed
        self.tokens: list[torch.Tensor] = []  # this segment's tokens so far, [B, 1] each
        self.docs: list[torch.Tensor] = []
        self.caches = model.new_kv_caches(batch, self.L)

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B, n]; returns the logits [B, V] after the last of them. Whole segments
        of a prompt go through in one forward each; the rest one token at a time."""
        logits, t = None, 0
        while t < tokens.shape[1]:
            if not self.tokens and tokens.shape[1] - t >= self.L:
                logits = self._whole_segment(tokens[:, t : t + self.L])
                t += self.L
            else:
                logits = self._step(tokens[:, t : t + 1])
                t += 1
        return logits

    def _whole_segment(self, tokens: torch.Tensor) -> torch.Tensor:
        docs = self.n_bos[:, None] + torch.cumsum(tokens == self.bos, dim=1)
        self.n_bos = docs[:, -1].clone()
        self.tokens, self.docs = [tokens], [docs]
        return self._complete_segment()

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        from lingua.segments import Segment

        self.n_bos = self.n_bos + (token[:, 0] == self.bos)
        doc = self.n_bos[:, None].clone()  # document_ids of this position: BOS count so far
        pos = len(self.tokens)
        self.tokens.append(token)
        self.docs.append(doc)
        seg_docs = torch.cat(self.docs, dim=1)
        seg = Segment(self.index, pos, pos + 1, doc, carried=doc == self.carry_doc[:, None],
                      continues=doc[:, 0] == self.carry_doc, last_doc=torch.ones_like(doc, dtype=torch.bool))
        mask = (seg_docs == doc)[:, None, None, :]  # [B, 1, 1, pos + 1]: the token's own document only
        ctx = SegmentContext(seg, self.state, mask=mask, writes=False)
        h = self.model.forward_blocks(self.model.tok_embeddings(token), self.caches, start=pos, ctx=ctx)
        logits = self.model.output(self.model.norm(h))[:, -1]
        if pos + 1 == self.L:
            self._complete_segment()
        return logits

    def _complete_segment(self) -> torch.Tensor:
        """Write the full segment's memory update as training does; start a new segment.
        Returns the logits after its last token."""
        tokens, docs = torch.cat(self.tokens, dim=1), torch.cat(self.docs, dim=1)
        segment = next(split_segments(docs, self.L, self.carry_doc))
        segment.index = self.index
        ctx = SegmentContext(segment, self.state)
        h = self.model.forward_blocks(self.model.tok_embeddings(tokens), ctx=ctx)
        self.state = ctx.next_state(0)
        self.carry_doc = docs[:, -1]
        self.index += 1
        self.tokens, self.docs = [], []
        self.caches = self.model.new_kv_caches(self.batch, self.L)
        return self.model.output(self.model.norm(h[:, -1:]))[:, -1]
