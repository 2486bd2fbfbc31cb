"""The Hierarchical Memory Transformer (HMT, arXiv 2405.06067) around a causal LM backbone.

A window is read `content_length` tokens at a time (`segment_length` counts the whole backbone
input: the segment, two memory tokens and `num_sensory` tokens of the previous segment). For
segment n with token embeddings E_n:

1. representation: the backbone reads [T | E_{n-1}[-j:] | T] (T a learned embedding, j =
   sum_fraction * the segment's length) and S_n is the final hidden state at its last position.
   The paper reads E_n[:j], the segment's own first tokens (`summary="current"`): then P_n, which
   every position of the segment sees, depends on later tokens of the segment, and the loss is
   optimistic (a leak). The default, "previous", summarises what precedes the segment, so no
   position sees a later token; the window's first segment then reads the initial memory;
2. recall: P_n = softmax((S_n W_q)(M W_k)^T / sqrt(h)) M over the cache M of past memory
   embeddings (the last `mem_recall_context`; a learned initial memory before the first);
3. the backbone reads [P_n | last num_sensory embeddings of segment n-1 | E_n | P_n]; the
   logits at E_n's positions are the segment's (each predicts the token after it, as the
   labels say), and the final hidden state at the trailing P_n is M_n, appended to the cache.

Modes (`HMTArgs.mode`): "hmt" (all of it), "stage1" (no recall: P_n = M_{n-1}, sensory kept: the
paper's first training stage), "rmt" (no recall, no sensory: the Recurrent Memory Transformer)
and "baseline" (the backbone alone on segments of segment_length tokens).

The state (cache, last memory) lives in the loop of `forward` only: every window starts from the
initial memory, so nothing is carried across windows or training steps. Gradients flow through
at most `bptt_depth` segments of it: the state is detached after every bptt_depth-th segment
(for real: the reference's detach was a no-op). A window is one document's stretch (apps/hmt's
data never packs two documents in a row), so memory never crosses documents.

The backbone is reached through a small adapter: `LinguaBackbone` (an apps/main LMTransformer:
dense, product keys or mHC) or `HFBackbone` (a transformers causal LM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lingua.args import choice
from lingua.data import IGNORE_INDEX
from lingua.distributed import collective_device
from lingua.transformer import ParamInit

MODES = ("hmt", "stage1", "rmt", "baseline")


@dataclass
class HMTArgs:
    mode: str = choice("hmt", MODES)
    segment_length: int = 1024  # backbone input per segment: tokens + 2 memory tokens + num_sensory
    num_sensory: int = 0  # embeddings of the previous segment's last tokens read again (k)
    mem_recall_context: int = 100  # N: memory embeddings kept for recall
    mem_recall_hidden_dim: int = 1024  # width of W_q and W_k
    sum_fraction: float = 0.5  # share of a segment the representation reads
    bptt_depth: int = 2  # segments of state the gradient flows through; 0: all
    mem_prune: str = choice("fifo", ("fifo", "attention"))  # which memory a full cache drops
    # What the representation S_n summarises: "previous" (the last sum_fraction of segment n-1:
    # causal) or "current" (the paper's first sum_fraction of segment n itself: every position
    # before the window's end then sees a summary of later tokens of its segment, so training
    # loss and PPL are optimistic; kept for comparison with the paper's figures).
    summary: str = choice("previous", ("previous", "current"))
    # LoRA on the backbone (peft; the `lora` component), its base weights frozen: r 8, alpha 32,
    # dropout 0.1 on q/k/v/o/gate/up/down and the embedding, as the paper.
    dynamic: bool = False  # training reads segments of varying length (L/2 .. L text tokens): reading speed varies
    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1

    @property
    def uses_memory(self) -> bool:
        return self.mode != "baseline"

    @property
    def sensory(self) -> int:
        return self.num_sensory if self.mode in ("hmt", "stage1") else 0

    @property
    def content_length(self) -> int:
        """Tokens of the input text per segment."""
        return self.segment_length - (2 + self.sensory if self.uses_memory else 0)

    def check(self) -> None:
        """ValueError naming the HMT key that cannot work."""
        if self.content_length < 1:
            raise ValueError(f"segment_length={self.segment_length} leaves no room for the text: it holds the two "
                             f"memory tokens and num_sensory={self.sensory} tokens too")
        if self.num_sensory < 0 or self.bptt_depth < 0:
            raise ValueError("num_sensory and bptt_depth must be >= 0")
        if self.mode == "hmt" and self.mem_recall_context < 1:
            raise ValueError(f"mem_recall_context must be >= 1, got {self.mem_recall_context}")
        if not 0 < self.sum_fraction <= 1:
            raise ValueError(f"sum_fraction must be in (0, 1], got {self.sum_fraction}")


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2", "tok_embeddings")  # q/k/v/o/gate/up/down, embedding
HF_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def add_lora(model: nn.Module, args: HMTArgs, targets=LORA_TARGETS) -> nn.Module:
    """peft's LoRA adapters in `model`'s target layers (in place); they are the `lora`
    component, and peft freezes everything else of `model`."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=list(targets))
    inject_adapter_in_model(config, model)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_PARTS:
            module.optim_component = "lora"
    return model


def without_lora(key: str) -> str | None:
    """A LoRA-wrapped model's key as the plain model's checkpoint names it (None: an adapter's)."""
    return None if any(part in key for part in LORA_PARTS) else key.replace(".base_layer", "")


def reset_lora(model: nn.Module) -> None:
    """LoRA adapters back to their start, the identity (B = 0), e.g. after to_empty."""
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters"):
            for adapter in module.lora_A.keys() | module.lora_embedding_A.keys():
                module.reset_lora_parameters(adapter, True)


class LinguaBackbone(nn.Module):
    """An apps/main LMTransformer as HMT's backbone; `weights`: the checkpoint (DCP dir or
    consolidated file) its parameters start from (None: from the model's seed)."""

    optim_component = "base"

    def __init__(self, model: nn.Module, weights: Optional[str] = None):
        super().__init__()
        self.model, self.weights = model, weights
        self.dim = model.args.dim
        self.max_len = model.args.max_seqlen

    def reset_parameters(self, init: ParamInit) -> None:
        if self.model.weight_tying:  # to_empty re-creates the two as separate tensors
            self.model.output.weight = self.model.tok_embeddings.weight
        self.model.reset_parameters(init)
        if self.weights is not None:
            from lingua.checkpoint import load_model_weights

            load_model_weights(self.weights, self.model, key_map=without_lora)
        reset_lora(self.model)

    def flops_per_token(self, seq_len: int) -> float:
        return self.model.flops_per_token(seq_len)

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embedding_weight(self) -> torch.Tensor:
        return self.model.tok_embeddings.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(tokens)

    def hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.model.norm(self.model.forward_blocks(embeds))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.output(hidden)


class HFBackbone(nn.Module):
    """A transformers causal LM (LlamaForCausalLM, OPT, ...) as HMT's backbone: its decoder's
    last hidden state (after the final norm) and its LM head. `weights`: the directory its
    parameters (and buffers, such as the rotary frequencies) start from."""

    optim_component = "base"

    def __init__(self, model: nn.Module, weights: Optional[str] = None):
        super().__init__()
        self.model, self.weights = model, weights
        self.dim = model.config.hidden_size
        self.max_len = getattr(model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def reset_parameters(self, init: ParamInit) -> None:
        """Everything from the pretrained directory (after to_empty nothing is left, buffers
        included), tying kept, LoRA at its start."""
        if self.weights is None:
            raise ValueError("an HF backbone starts from its pretrained weights: give HFBackbone(weights=DIR)")
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(self.weights, torch_dtype=torch.float32)
        theirs = {**dict(fresh.named_parameters(remove_duplicate=False)),
                  **dict(fresh.named_buffers(remove_duplicate=False))}
        self.model.tie_weights()
        for name, tensor in [*self.model.named_parameters(remove_duplicate=False),
                             *self.model.named_buffers(remove_duplicate=False)]:
            source = without_lora(name)
            if source is not None:
                tensor.copy_(theirs[source])
        reset_lora(self.model)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(tokens)

    def embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def blocks(self) -> nn.ModuleList:
        base = self.model.base_model
        return base.layers if hasattr(base, "layers") else base.decoder.layers  # Llama-like, OPT-like

    def flops_per_token(self, seq_len: int) -> float:
        n = sum(p.numel() for p in self.model.parameters()) - self.model.get_input_embeddings().weight.numel()
        return 6.0 * n

    def hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(inputs_embeds=embeds).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)


class MemoryRecall(nn.Module):
    """Cross attention of a segment's summary S_n over the cached memory embeddings; no value
    projection (the memories themselves are mixed)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.wq = nn.Linear(dim, hidden_dim, bias=False)
        self.wk = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, summary: torch.Tensor, memories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """summary [B, d], memories [B, N, d] -> (recalled [B, d], attention weights [B, N])."""
        q, k = self.wq(summary), self.wk(memories)
        weights = torch.softmax(torch.einsum("bh,bnh->bn", q, k).float() / math.sqrt(q.shape[-1]), dim=-1)
        return torch.einsum("bn,bnd->bd", weights.to(memories.dtype), memories), weights


@dataclass
class MemoryCache:
    """The last `capacity` memory embeddings per row, [B, n, d], with the recall attention each
    received (for mem_prune=attention and --plot_hist). Updates return a new cache, so a state
    can be read from without being changed (generation re-reads its unfinished segment)."""

    capacity: int
    prune: str = "fifo"
    memories: Optional[torch.Tensor] = None
    attention: Optional[torch.Tensor] = None  # [B, n] recall weight received so far

    def __len__(self) -> int:
        return 0 if self.memories is None else self.memories.shape[1]

    def attended(self, weights: torch.Tensor) -> "MemoryCache":
        return replace(self, attention=self.attention + weights.detach().float())

    def appended(self, memory: torch.Tensor) -> "MemoryCache":
        memory = memory[:, None]
        fresh = torch.zeros(memory.shape[0], 1, device=memory.device)
        if self.memories is None:
            return replace(self, memories=memory, attention=fresh)
        memories, attention = self.memories, self.attention
        if len(self) >= self.capacity:
            keep = torch.ones_like(attention, dtype=torch.bool)
            if self.prune == "fifo":
                keep[:, 0] = False
            else:  # the memory recall attended to least (the oldest among equals)
                keep.scatter_(1, attention.argmin(dim=1, keepdim=True), False)
            B, n, d = memories.shape
            memories, attention = memories[keep].view(B, n - 1, d), attention[keep].view(B, n - 1)
        return replace(self, memories=torch.cat([memories, memory], dim=1), attention=torch.cat([attention, fresh], 1))

    def detached(self) -> "MemoryCache":
        return replace(self, memories=None if self.memories is None else self.memories.detach())


@dataclass
class HMTState:
    """What one segment hands the next: the memory cache, the last memory embedding and the
    previous segment's token embeddings (sensory memory)."""

    cache: MemoryCache
    last_memory: Optional[torch.Tensor] = None
    previous: Optional[torch.Tensor] = None
    segments: int = 0  # read so far

    def detached(self) -> "HMTState":
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(self, cache=self.cache.detached(), last_memory=detach(self.last_memory),
                       previous=detach(self.previous))


def shared_seed(local: torch.Tensor) -> int:
    """`local` summed over every process (HMT trains data-parallel over all of them): one seed
    for all ranks, the one a single process on the whole global batch draws. A collective."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = local.to(collective_device(), torch.long)
        dist.all_reduce(total)
        return int(total)
    return int(local)


class HMT(nn.Module):
    # HMT's own parameters are the `memory` component (optim.memory_lr; they train whatever the
    # backbone does); the backbone adapters declare theirs `base` (lingua.optim).
    optim_component = "memory"

    def __init__(self, backbone: nn.Module, args: HMTArgs, init_from: Optional[str] = None,
                 init_skip: tuple[str, ...] = ()):
        """init_from: an HMT checkpoint whose weights start this model (but for the keys that
        start with one of init_skip: stage 2 starts from stage 1, which has no recall)."""
        super().__init__()
        self.init_from, self.init_skip = init_from, init_skip
        args.check()
        if backbone.max_len is not None and args.segment_length > backbone.max_len:
            raise ValueError(f"segment_length={args.segment_length} exceeds the backbone's {backbone.max_len} "
                             "positions")
        self.backbone, self.args = backbone, args
        d = backbone.dim
        self.memory_token = nn.Parameter(torch.empty(d))  # T, around the representation's input
        self.initial_memory = nn.Parameter(torch.empty(d))  # P_1, and recall's memory before any
        self.recall = MemoryRecall(d, args.mem_recall_hidden_dim) if args.mode == "hmt" else None
        if not self.memory_token.is_meta:
            self.reset_memory_parameters(ParamInit(0))
        self.last_recall_weights: list[torch.Tensor] = []  # of the last forward, for --plot_hist

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's blocks: what FSDP shards (and activation checkpointing wraps) one by one."""
        return self.backbone.blocks()

    def reset_parameters(self, init: ParamInit) -> None:
        """The backbone's initialisation (its pretrained weights when it has some), then HMT's;
        then the weights of init_from, if given."""
        self.backbone.reset_parameters(init)
        self.reset_memory_parameters(init)
        if self.init_from:
            from lingua.checkpoint import load_model_weights

            load_model_weights(self.init_from, self, key_map=lambda k: None if k.startswith(self.init_skip) else k)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per text token: the backbone's over the segment's whole input, and the
        representation's read (forward only counts as much: its gradient flows too)."""
        a = self.args
        reads = a.segment_length + (round(a.sum_fraction * a.content_length) + 2 if a.mode == "hmt" else 0)
        return self.backbone.flops_per_token(a.segment_length) * reads / a.content_length

    @torch.no_grad()
    def reset_memory_parameters(self, init: ParamInit) -> None:
        """As the reference: memory embeddings at the scale of the token embeddings."""
        table = self.backbone.embedding_weight()
        table = table.full_tensor() if hasattr(table, "full_tensor") else table  # sharded under FSDP
        scale = float(table.detach().float().std())
        scale = scale if math.isfinite(scale) and scale > 0 else 0.02
        for p in (self.memory_token, self.initial_memory):
            init.trunc_normal_(p, scale)
        if self.recall is not None:
            for w in (self.recall.wq.weight, self.recall.wk.weight):
                init.trunc_normal_(w, self.backbone.dim ** -0.5)

    def segment_inputs(self, embeds: torch.Tensor, memory: Optional[torch.Tensor],
                       sensory: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The backbone input of a segment, [P | sensory | E | P] (just E for the baseline), and
        the position of E's first token in it."""
        if memory is None:
            return embeds, 0
        P = memory[:, None].to(embeds.dtype)
        parts = [P] + ([sensory] if sensory is not None and sensory.shape[1] else []) + [embeds, P]
        return torch.cat(parts, dim=1), 1 + (sensory.shape[1] if sensory is not None else 0)

    def summary(self, embeds: torch.Tensor, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """S_n: the final hidden state after [T | its sum_fraction of the text | T]: the first of
        this segment's embeddings E (summary "current", the paper's) or the last of the previous
        segment's (summary "previous": causal)."""
        text = embeds if self.args.summary == "current" else previous
        j = max(1, round(self.args.sum_fraction * text.shape[1]))
        text = text[:, :j] if self.args.summary == "current" else text[:, -j:]
        T = self.memory_token.to(embeds.dtype).expand(embeds.shape[0], 1, -1)
        return self.backbone.hidden(torch.cat([T, text, T], dim=1))[:, -1]

    def new_state(self) -> HMTState:
        return HMTState(MemoryCache(self.args.mem_recall_context, self.args.mem_prune))

    def read_segment(self, tokens: torch.Tensor, state: HMTState) -> tuple[torch.Tensor, HMTState, Optional[torch.Tensor]]:
        """One segment's tokens [B, <= content_length] after `state`: (its logits, the state after
        it, the recall weights over the cached memories or None). `state` is left as it is."""
        args, B = self.args, tokens.shape[0]
        embeds = self.backbone.embed(tokens)
        memory, weights, cache = None, None, state.cache
        if args.uses_memory:
            memory = self.initial_memory.expand(B, -1) if state.last_memory is None else state.last_memory
            # Recall, except where a causal summary has nothing to read (the window's first
            # segment): over the initial memory alone it would give that memory anyway.
            if args.mode == "hmt" and (args.summary == "current" or state.previous is not None):
                memories = cache.memories if len(cache) else self.initial_memory.expand(B, 1, -1)
                memory, weights = self.recall(self.summary(embeds, state.previous), memories)
                if len(cache):
                    cache = cache.attended(weights)
                else:
                    weights = None  # the initial memory alone: nothing recalled
        sensory = state.previous[:, -args.sensory :] if state.previous is not None and args.sensory else None
        inputs, offset = self.segment_inputs(embeds, memory, sensory)
        hidden = self.backbone.hidden(inputs)
        logits = self.backbone.logits(hidden[:, offset : offset + embeds.shape[1]])
        last_memory = hidden[:, -1] if args.uses_memory else None
        if last_memory is not None:
            cache = cache.appended(last_memory)
        after = HMTState(cache, last_memory, embeds, state.segments + 1)
        if args.bptt_depth > 0 and after.segments % args.bptt_depth == 0:
            after = after.detached()  # the gradient stops here: at most bptt_depth segments of state
        return logits, after, weights

    def segment_bounds(self, tokens: torch.Tensor) -> list[tuple[int, int]]:
        """(start, end) of each segment of the window: content_length tokens, or with `dynamic`
        in training between half that and that, drawn from the window's own tokens (the same
        window reads the same way again, so a resumed run repeats it exactly) summed over the
        data-parallel ranks: every rank reads the same segments (FSDP's collectives run per
        segment: ranks drawing from their own tokens read [6,6,7] vs [6,5,6] and hung)."""
        L, S = self.args.content_length, tokens.shape[1]
        if not (self.args.dynamic and self.training):
            return [(start, min(start + L, S)) for start in range(0, S, L)]
        generator = torch.Generator().manual_seed(shared_seed(tokens[:, :64].sum()))
        bounds, start = [], 0
        while start < S:
            n = int(torch.randint(max(1, L // 2), L + 1, (1,), generator=generator))
            bounds.append((start, min(start + n, S)))
            start += n
        return bounds

    def forward(self, tokens: torch.Tensor, target: Optional[torch.Tensor] = None, reduction: str = "mean"):
        """Logits [B, S, V] of the window read segment by segment, or the loss over the labels
        (mean, or sum with reduction="sum", as LMTransformer: the shared training loop calls it)."""
        state = self.new_state()
        self.last_recall_weights = []
        outputs, loss = [], None
        for start, end in self.segment_bounds(tokens):
            logits, state, weights = self.read_segment(tokens[:, start:end], state)
            if weights is not None:
                self.last_recall_weights.append(weights.detach())
            if target is None:
                outputs.append(logits)
                continue
            part = F.cross_entropy(logits.flatten(0, 1).float(), target[:, start:end].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            loss = part if loss is None else loss + part
        if target is None:
            return torch.cat(outputs, dim=1)
        return loss if reduction == "sum" else loss / (target != IGNORE_INDEX).sum().clamp(min=1)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: Optional[int] = None) -> list[int]:
        """Greedy continuation of one prompt, the memory carried over its segments: each full
        segment is read once and its state kept; the unfinished one is re-read with every new
        token (from the same state), so the logits equal those of forward() on the whole text."""
        L = self.args.content_length
        device = self.memory_token.device
        state, tokens = self.new_state(), list(prompt)
        done = (len(tokens) // L) * L if len(tokens) % L else max(0, len(tokens) - L)
        for start in range(0, done, L):
            _, state, _ = self.read_segment(torch.tensor([tokens[start : start + L]], device=device), state)
        new: list[int] = []
        while len(new) < max_new_tokens:
            logits, after, _ = self.read_segment(torch.tensor([tokens[done:]], device=device), state)
            token = int(logits[0, -1].argmax())
            if token == eos_id:
                break
            tokens.append(token)
            new.append(token)
            if len(tokens) - done == L + 1:  # the segment before this token is complete: keep its state
                _, state, _ = self.read_segment(torch.tensor([tokens[done : done + L]], device=device), state)
                done += L
        return new
