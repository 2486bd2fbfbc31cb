"""LM2 memory slots (arXiv 2502.06049): N slots of width dim per memory block, read by every
token of a segment and written after it (lingua.segments hands the state along).

Read:  E_mem = MHA(Q = h W_q, K = M W_k, V = M W_v) W_o over the N slots M, gated by
       g_out = sigmoid(E_mem W_out); g_out * E_mem is added to the attention output, before
       the FFN. h is the block's hidden state after attention (normed).
Write: after the segment the slots attend to its hidden states: C = MHA(Q = M, K, V = h);
       g_in = sigmoid(C W_in), g_forget = sigmoid(C W_forget) per slot (forget bias 1, input
       bias 0); M' = g_in * tanh(C) + g_forget * M.
The slots start from a learned state, identity-like (slot r = e_r when N <= dim).

Unlike the reference code: the write happens only after the segment, so no position sees a
later one (LM2's input gate mean-pools the whole sequence); N is free of seq_len and dim; no
dropout on the memory attention; the state never crosses documents or batches (lingua.segments).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lingua.segments import SegmentContext, select_rows


class MemorySlots(nn.Module):
    optim_component = "memory"  # its own lr (optim.memory_lr), lingua.optim

    def __init__(self, dim: int, n_slots: int, n_heads: int, norm_eps: float = 1e-5):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"model.dim={dim} is not a multiple of model.num_mem_heads={n_heads}")
        self.dim, self.n_slots, self.n_heads = dim, n_slots, n_heads
        self.initial = nn.Parameter(torch.empty(n_slots, dim))
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        # read: tokens -> slots
        self.read_q = nn.Linear(dim, dim, bias=False)
        self.read_k = nn.Linear(dim, dim, bias=False)
        self.read_v = nn.Linear(dim, dim, bias=False)
        self.read_o = nn.Linear(dim, dim, bias=False)
        self.out_gate = nn.Linear(dim, dim, bias=False)
        # write: slots -> the segment's tokens
        self.write_q = nn.Linear(dim, dim, bias=False)
        self.write_k = nn.Linear(dim, dim, bias=False)
        self.write_v = nn.Linear(dim, dim, bias=False)
        self.write_o = nn.Linear(dim, dim, bias=False)
        self.in_gate = nn.Linear(dim, dim)
        self.forget_gate = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.n_heads, -1).transpose(1, 2)  # [B, H, T, dh]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)

    def initial_state(self, batch: int) -> torch.Tensor:
        return self.initial[None].expand(batch, -1, -1)

    def read(self, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[B, L, dim] tokens read [B, N, dim] slots -> gated [B, L, dim]."""
        e = F.scaled_dot_product_attention(self._heads(self.read_q(h)), self._heads(self.read_k(slots)),
                                           self._heads(self.read_v(slots)))
        e = self.read_o(self._merge(e))
        return torch.sigmoid(self.out_gate(e)) * e

    def write(self, h: torch.Tensor, slots: torch.Tensor, keys_mask: torch.Tensor) -> torch.Tensor:
        """The slots after attending to the segment's tokens where keys_mask [B, L] is True."""
        c = F.scaled_dot_product_attention(self._heads(self.write_q(slots)), self._heads(self.write_k(h)),
                                           self._heads(self.write_v(h)), attn_mask=keys_mask[:, None, None, :])
        c = self.write_o(self._merge(c))
        return torch.sigmoid(self.in_gate(c)) * torch.tanh(c) + torch.sigmoid(self.forget_gate(c)) * slots

    def forward(self, h: torch.Tensor, ctx: SegmentContext, layer_id: int) -> torch.Tensor:
        """What the slots add to the attention output of block `layer_id` for this segment;
        writes the block's next slots into ctx."""
        seg = ctx.segment
        h = self.norm(h)
        initial = self.initial_state(h.shape[0]).to(h.dtype)
        carried = ctx.state.get(layer_id)
        if carried is None:  # the window's first segment: every row starts from the initial slots
            out, before = self.read(h, initial), initial
        elif bool(seg.carried.all()):  # one document throughout (then it also continues)
            out, before = self.read(h, carried), carried
        else:  # a document that starts in this segment reads the initial slots, not its predecessor's
            out = torch.where(seg.carried[..., None], self.read(h, carried), self.read(h, initial))
            before = select_rows(seg.continues, carried, initial)
        if ctx.writes:
            ctx.write(layer_id, self.write(h, before, seg.last_doc))
        return out

    def reset_parameters(self, init, init_std: float, factor: float = 1.0) -> None:
        eye = torch.zeros(self.n_slots, self.dim)
        if self.n_slots <= self.dim:
            eye[torch.arange(self.n_slots), torch.arange(self.n_slots)] = 1.0
        else:  # more slots than dimensions: no identity; small random slots instead
            eye = torch.randn(self.n_slots, self.dim, generator=torch.Generator().manual_seed(self.n_slots)) \
                / math.sqrt(self.dim)
        init.copy_(self.initial, eye)
        init.ones_(self.norm.weight)
        for lin in (self.read_q, self.read_k, self.read_v, self.write_q, self.write_k, self.write_v, self.out_gate,
                    self.in_gate, self.forget_gate):
            init.trunc_normal_(lin.weight, init_std)
        for lin in (self.read_o, self.write_o):
            init.trunc_normal_(lin.weight, init_std / factor)
        init.zeros_(self.in_gate.bias)
        init.ones_(self.forget_gate.bias)
