"""LongMem memory bank (arXiv 2306.07174): the attention keys and values of one block, cached
after each segment and retrieved by that block's queries in later segments of the document.

After a segment, its keys (before RoPE: the bank is position-free) and values are cached,
detached, in chunks of `chunk_size` tokens aligned on the segment, each chunk keyed by its mean
key; a FIFO keeps the newest `external_memory_size` tokens of the row's current document.
Retrieval: every query (per head) searches its kv head's chunk keys for the best
retrieval_k / chunk_size chunks (exact inner product, FAISS IndexFlatIP per row and kv head)
and attends over their tokens. Joint attention: separate softmaxes over the local and the
retrieved keys, out = W_o[(1 - sigmoid(g_h)) A_loc V + sigmoid(g_h) A_mem V_mem], g per head,
initialised 0 (half and half). A token with nothing to retrieve (the window's first segment, a
document that starts in this segment) attends locally only.

`external_memory_grad=true` lets gradients reach the cached keys and values within the window
(truncated every bptt_depth segments, like the rest of the state). LongMem detaches them: its
keys come from a frozen pretrained backbone and are searchable as they are. Trained from
scratch, detached keys never learn to be found: on apps.bench.recall the detached bank stays at
chance while the trained-through one reaches 1.0 (README, Status).

Unlike the reference code: one bank per row and per document (never shared across the batch);
only the row's own document's tokens are written (no padding, no other document); eviction
removes exactly what the FIFO overflows by; the CPU path is the tested one (faiss-cpu), the GPU
one (faiss-gpu, `use_gpu_to_search`) searches on the device.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lingua.segments import SegmentContext

logger = logging.getLogger(__name__)


def faiss_module():
    try:
        import faiss
    except ImportError as e:  # faiss-cpu is in requirements.txt; a GPU install may bring faiss-gpu
        raise ImportError("model.use_external_memory searches with FAISS: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def exact_top_chunks(queries: torch.Tensor, chunk_keys: torch.Tensor, n_chunks: torch.Tensor, k: int) -> torch.Tensor:
    """Reference search in torch: [B, H, L, D] queries against [B, H, C, D] chunk keys, of which
    the first n_chunks[b] are filled; the indices [B, H, L, k] of the k best by inner product
    (-1 where a row has fewer than k chunks)."""
    scores = queries @ chunk_keys.transpose(-1, -2)
    filled = torch.arange(chunk_keys.shape[2], device=queries.device)[None, :] < n_chunks[:, None]  # [B, C]
    scores = scores.masked_fill(~filled[:, None, None, :], float("-inf"))
    top = scores.topk(min(k, chunk_keys.shape[2]), dim=-1)
    return torch.where(torch.isfinite(top.values), top.indices, -1)


class BankState:
    """One bank per row: the cached keys and values of the row's current document.

    keys, values [B, Hkv, C, chunk, D] (C = capacity in chunks), token_valid [B, C, chunk],
    chunk_keys [B, Hkv, C, D] (the mean valid key of each chunk), n_chunks [B] (filled, oldest
    first). Detached (LongMem) unless the bank is trained through (external_memory_grad), then
    truncated with the rest of the state every bptt_depth segments."""

    def __init__(self, keys, values, token_valid, chunk_keys, n_chunks):
        self.keys, self.values, self.token_valid = keys, values, token_valid
        self.chunk_keys, self.n_chunks = chunk_keys, n_chunks

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, capacity_chunks: int, chunk: int, head_dim: int, like: torch.Tensor):
        z = like.new_zeros((batch, n_kv_heads, capacity_chunks, chunk, head_dim))
        return cls(z, z.clone(), torch.zeros(batch, capacity_chunks, chunk, dtype=torch.bool, device=like.device),
                   like.new_zeros((batch, n_kv_heads, capacity_chunks, head_dim)),
                   torch.zeros(batch, dtype=torch.long, device=like.device))

    def detached(self) -> "BankState":
        return BankState(self.keys.detach(), self.values.detach(), self.token_valid, self.chunk_keys.detach(),
                         self.n_chunks)

    def n_tokens(self) -> torch.Tensor:
        return self.token_valid.sum(dim=(1, 2))


def search(queries: torch.Tensor, bank: BankState, k: int, use_gpu: bool = False) -> torch.Tensor:
    """Top-k chunk indices [B, Hq, L, k] (-1 where fewer), each query head searching its kv
    head's chunk keys with a FAISS IndexFlatIP per row and kv head (exact inner product)."""
    faiss = faiss_module()
    B, Hq, L, D = queries.shape
    Hkv = bank.chunk_keys.shape[1]
    rep = Hq // Hkv
    k = min(k, bank.chunk_keys.shape[2])
    out = torch.full((B, Hq, L, k), -1, dtype=torch.long)
    on_gpu = use_gpu and queries.is_cuda and hasattr(faiss, "StandardGpuResources")
    if use_gpu and queries.is_cuda and not on_gpu:
        logger.warning("model.use_gpu_to_search: this faiss has no GPU support (faiss-cpu); searching on the CPU")
    # float32 on the host for faiss-cpu; the device tensors themselves for faiss-gpu.
    q_all = queries.detach().float() if on_gpu else queries.detach().float().cpu()
    keys_all = bank.chunk_keys.detach().float() if on_gpu else bank.chunk_keys.detach().float().cpu()
    counts = bank.n_chunks.tolist()
    resources = faiss.StandardGpuResources() if on_gpu else None
    for b in range(B):
        n = counts[b]
        if n == 0:
            continue
        for g in range(Hkv):
            index = faiss.IndexFlatIP(D)
            if on_gpu:
                import faiss.contrib.torch_utils  # noqa: F401 - lets faiss take torch tensors
                index = faiss.index_cpu_to_gpu(resources, queries.device.index or 0, index)
                index.add(keys_all[b, g, :n].contiguous())
                _, idx = index.search(q_all[b, g * rep : (g + 1) * rep].reshape(-1, D).contiguous(), min(k, n))
                idx = idx.cpu()
            else:
                index.add(np.ascontiguousarray(keys_all[b, g, :n].numpy()))
                _, idx = index.search(np.ascontiguousarray(q_all[b, g * rep : (g + 1) * rep].reshape(-1, D).numpy()),
                                      min(k, n))
                idx = torch.from_numpy(idx)
            out[b, g * rep : (g + 1) * rep, :, : idx.shape[1]] = idx.view(rep, L, -1)
    return out.to(queries.device)


class MemoryBank(nn.Module):
    """The bank's parameters (the per-head joint-attention gate) and its read and write."""

    optim_component = "memory"

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, external_memory_size: int, chunk_size: int,
                 retrieval_k: int, use_gpu_to_search: bool = False, grad: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.chunk_size, self.retrieval_k = chunk_size, retrieval_k
        self.capacity_chunks = external_memory_size // chunk_size
        self.use_gpu_to_search = use_gpu_to_search
        self.grad = grad  # gradients reach the cached keys and values (within the window)
        self.gate = nn.Parameter(torch.zeros(n_heads))

    def reset_parameters(self, init) -> None:
        init.zeros_(self.gate)

    def retrieve(self, q: torch.Tensor, bank: Optional[BankState], carried: torch.Tensor):
        """Attention of q [B, Hq, L, D] over its retrieved tokens: (output [B, Hq, L, D], has
        [B, 1, L, 1] bool: the token retrieved something), or None when nothing can be."""
        if bank is None or not bool(carried.any()) or int(bank.n_chunks.max()) == 0:
            return None
        B, Hq, L, D = q.shape
        n = self.retrieval_k // self.chunk_size
        idx = search(q, bank, n, self.use_gpu_to_search)  # [B, Hq, L, n]
        found = idx >= 0
        safe = idx.clamp(min=0)
        rep = Hq // self.n_kv_heads
        kv_head = torch.arange(Hq, device=q.device) // rep
        b_ix = torch.arange(B, device=q.device)[:, None, None, None]
        h_ix = kv_head[None, :, None, None]
        keys = bank.keys[b_ix, h_ix, safe]  # [B, Hq, L, n, chunk, D]
        values = bank.values[b_ix, h_ix, safe]
        valid = bank.token_valid[b_ix, safe] & found[..., None]  # [B, Hq, L, n, chunk]
        keys, values, valid = keys.flatten(3, 4), values.flatten(3, 4), valid.flatten(3, 4)
        scores = torch.einsum("bhld,bhlmd->bhlm", q, keys.to(q.dtype)) / D**0.5
        scores = scores.masked_fill(~valid, float("-inf"))
        has = valid.any(dim=-1, keepdim=True) & carried[:, None, :, None]
        probs = torch.softmax(scores.masked_fill(~has, 0.0), dim=-1) * has
        return torch.einsum("bhlm,bhlmd->bhld", probs, values.to(q.dtype)), has

    def fuse(self, local: torch.Tensor, memory) -> torch.Tensor:
        """(1 - sigmoid(g)) local + sigmoid(g) memory per head, where the token retrieved."""
        if memory is None:
            return local
        out, has = memory
        g = torch.sigmoid(self.gate.float()).to(local.dtype)[None, :, None, None]
        return torch.where(has, (1 - g) * local + g * out, local)

    def write(self, k: torch.Tensor, v: torch.Tensor, bank: Optional[BankState], ctx: SegmentContext) -> BankState:
        """The bank after this segment: k, v [B, Hkv, L, D] (pre-RoPE) of the row's last
        document appended, chunk by chunk (FIFO); a row whose last document began here starts
        a new bank."""
        seg = ctx.segment
        c = self.chunk_size
        if not self.grad:  # LongMem: the bank is a cache, not a path for gradients
            k, v = k.detach(), v.detach()
        last_doc = seg.last_doc
        pad = -k.shape[2] % c  # a window's last segment may be shorter: pad it with invalid tokens
        if pad:
            k, v = (F.pad(t, (0, 0, 0, pad)) for t in (k, v))
            last_doc = F.pad(last_doc, (0, pad), value=False)
        B, H, L, D = k.shape
        if bank is None:
            bank = BankState.empty(B, H, self.capacity_chunks, c, D, k)
        keep = seg.continues.clone()
        n_chunks = torch.where(keep, bank.n_chunks, torch.zeros_like(bank.n_chunks))
        token_valid = bank.token_valid & keep[:, None, None]
        new_k = k.view(B, H, L // c, c, D)
        new_v = v.view(B, H, L // c, c, D)
        new_valid = last_doc.view(B, L // c, c)
        has_any = new_valid.any(dim=-1)  # [B, L//c]: chunks holding a token of the document
        mean = (new_k * new_valid[:, None, :, :, None]).sum(3) / new_valid.sum(-1).clamp(min=1)[:, None, :, None]
        keys, values, chunk_keys = bank.keys.clone(), bank.values.clone(), bank.chunk_keys.clone()
        token_valid = token_valid.clone()
        for b in range(B):  # rows differ in fill and in how many chunks they add
            add = has_any[b].nonzero().flatten()
            n_old, n_add = int(n_chunks[b]), add.numel()
            if n_add == 0:
                continue
            if n_add > self.capacity_chunks:
                add, n_add = add[-self.capacity_chunks :], self.capacity_chunks
            overflow = max(0, n_old + n_add - self.capacity_chunks)
            if overflow:  # FIFO: drop exactly the oldest `overflow` chunks
                for t in (keys, values, chunk_keys):
                    t[b, :, : n_old - overflow] = t[b, :, overflow:n_old].clone()
                token_valid[b, : n_old - overflow] = token_valid[b, overflow:n_old].clone()
                n_old -= overflow
            keys[b, :, n_old : n_old + n_add] = new_k[b, :, add]
            values[b, :, n_old : n_old + n_add] = new_v[b, :, add]
            chunk_keys[b, :, n_old : n_old + n_add] = mean[b, :, add]
            token_valid[b, n_old : n_old + n_add] = new_valid[b, add]
            token_valid[b, n_old + n_add :] = False
            n_chunks[b] = n_old + n_add
        return BankState(keys, values, token_valid, chunk_keys, n_chunks)
