"""Llama-style transformer building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameter names follow Meta Lingua (attention.wq, feed_forward.w1, attention_norm, ...) so
its checkpoints map one to one. A block is `x + attention_branch(x)` then
`h + feed_forward_branch(h)`; later modules swap the FFN (`build_feed_forward`) or wrap the
residual (`TransformerBlock.forward`) by config, without touching the training loop.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lingua.args import choice
from lingua.mhc import HyperConnection, MHCArgs, expand_streams, reduce_streams
from lingua.segments import SegmentContext

logger = logging.getLogger(__name__)


@dataclass
class BaseTransformerArgs:
    dim: int = 512
    n_layers: int = 8
    head_dim: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_dim_multiplier: Optional[float] = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_base_std: Optional[float] = None
    init_std_factor: str = choice("disabled", ("disabled", "global_depth", "current_depth", "dim_ratio"))
    max_seqlen: int = 1024
    # Not in Meta Lingua's schema (it passes attn_impl at call time); sdpa runs everywhere.
    attn_impl: str = choice("sdpa", ("sdpa", "xformers", "flex"))
    mhc: MHCArgs = field(default_factory=MHCArgs)  # manifold-constrained hyper-connections

    def resolved_heads(self) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim), checked against dim."""
        if self.n_heads is None and self.head_dim is None:
            raise ValueError("model: set model.n_heads or model.head_dim")
        n_heads = self.n_heads if self.n_heads is not None else self.dim // self.head_dim
        head_dim = self.head_dim if self.head_dim is not None else self.dim // n_heads
        if n_heads * head_dim != self.dim:
            raise ValueError(f"model.dim={self.dim} is not model.n_heads={n_heads} x model.head_dim={head_dim}")
        n_kv_heads = self.n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"model.n_heads={n_heads} is not a multiple of model.n_kv_heads={n_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head dim {head_dim} must be even for RoPE")
        return n_heads, n_kv_heads, head_dim

    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def depth_init_factor(args: BaseTransformerArgs, layer_id: int) -> float:
    """Meta Lingua's init_std_factor: how much to shrink output projections with depth."""
    return {
        "disabled": 1.0,
        "global_depth": (2 * args.n_layers) ** 0.5,
        "current_depth": (2 * (layer_id + 1)) ** 0.5,
        "dim_ratio": args.dim / 4096,
    }[args.init_std_factor]


class ParamInit:
    """Initialises parameters from a seed, drawing on the CPU and copying in only this rank's
    part. The values depend only on the seed and the order of the draws, not on the device or
    how the model is sharded, so an FSDP/TP/memory-parallel model starts exactly where a
    single-process one does.

    Memory that fits: each draw is made in blocks of whole rows (about `block_elements` values,
    each block from its own generator seeded by (seed, draw, block)), and a rank draws only the
    blocks holding its rows. A 1024^2 x 2048 value table (8 GiB in fp32) costs a rank its shard
    plus one block of host memory instead of the whole table, and the device receives only the
    shard (DTensor's distribute_tensor would first move the whole tensor to the device)."""

    def __init__(self, seed: int, block_elements: int = 1 << 22):
        self.seed = seed
        self.block_elements = block_elements
        self.draws = 0

    @torch.no_grad()
    def trunc_normal_(self, param: torch.Tensor, std: float) -> None:
        draw, self.draws = self.draws, self.draws + 1
        full_shape = tuple(param.shape) or (1,)
        shape, offset = local_box(param)
        shape, offset = shape or (1,), offset or (0,)
        rows_per_block = max(1, self.block_elements // max(1, math.prod(full_shape[1:])))
        inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))
        first, last = offset[0], offset[0] + shape[0]
        local = torch.empty(shape, dtype=torch.float32)
        for b in range(first // rows_per_block, -(-last // rows_per_block)):
            lo, hi = b * rows_per_block, min((b + 1) * rows_per_block, full_shape[0])
            block = torch.empty((hi - lo, *full_shape[1:]), dtype=torch.float32)
            generator = torch.Generator().manual_seed(hash((self.seed, draw, b)) & (2**63 - 1))
            nn.init.trunc_normal_(block, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
            take_lo, take_hi = max(lo, first), min(hi, last)
            local[take_lo - first : take_hi - first] = block[(slice(take_lo - lo, take_hi - lo), *inner)]
        _local_part(param).copy_(local.view(_local_part(param).shape))

    def copy_(self, param: torch.Tensor, full: torch.Tensor) -> None:
        copy_full_into(param, full)

    @torch.no_grad()
    def ones_(self, param: torch.Tensor) -> None:
        _local_part(param).fill_(1.0)

    @torch.no_grad()
    def zeros_(self, param: torch.Tensor) -> None:
        _local_part(param).zero_()


def _local_part(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of this rank's part of `param` in the full tensor: the whole tensor for a
    plain one. Every layout here (FSDP, TP, memory parallelism and their nestings) gives each
    rank one box of the full tensor; anything else is refused rather than misinitialised."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return tuple(param.shape), (0,) * param.dim()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape) != tuple(param.to_local().shape):
        raise ValueError(f"cannot locate this rank's part of a {tuple(param.shape)} parameter placed "
                         f"{param.placements}: local shape {tuple(param.to_local().shape)}, box {tuple(shape)}")
    return tuple(shape), tuple(offset)


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of a full (unsharded) tensor into a plain or DTensor parameter:
    sliced where `full` lies, so only the part reaches the parameter's device."""
    shape, offset = local_box(param)
    part = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    _local_part(param).copy_(part)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the small-variance tail.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight

    def reset_parameters(self, init: ParamInit) -> None:
        init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, recomputed by reset_parameters (meta-device safe)."""

    def __init__(self, head_dim: int, max_seqlen: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seqlen, self.theta = head_dim, max_seqlen, theta
        self.register_buffer("cos", torch.empty(max_seqlen, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seqlen, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles = torch.outer(torch.arange(self.max_seqlen, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        with torch.no_grad():
            self.cos.copy_(angles.cos().to(self.cos.dtype))
            self.sin.copy_(angles.sin().to(self.sin.dtype))

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.max_seqlen:
            raise ValueError(f"sequence position {start + length} exceeds model.max_seqlen={self.max_seqlen}")
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos/sin: [S, D]. Rotated in fp32 with the fp32 tables and rounded once:
    bf16 tables lose the angle at large positions, and bf16 products round three times."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None, :].float() + rotated * sin[:, None, :].float()).to(x.dtype)


@dataclass
class KVCache:
    """Pre-allocated keys/values of one attention layer for incremental decoding."""

    k: torch.Tensor  # [B, n_kv_heads, max_len, head_dim]
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype) -> "KVCache":
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def _causal_mask(q_len: int, kv_len: int, sliding_window: Optional[int], device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True = attend; queries sit at the end of the keys."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _xformers_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


# torch 2.13's CPU flex kernel (AVX2 path) reads garbage for lengths that end inside a block
# (24 or 40 tokens: errors of ~2, sometimes nan, run to run): on CPU, q and kv are padded to
# whole blocks of this many tokens and the padded query rows dropped.
FLEX_CPU_BLOCK = 128


def flex_padded_lengths(q_len: int, kv_len: int, device: torch.device) -> tuple[int, int]:
    if device.type != "cpu":
        return q_len, kv_len
    return tuple(-(-n // FLEX_CPU_BLOCK) * FLEX_CPU_BLOCK for n in (q_len, kv_len))


def flex_block_mask(q_len: int, kv_len: int, window: Optional[int], device: torch.device,
                    padded: Optional[tuple[int, int]] = None):
    """FlexAttention's block mask for causal attention (queries at the end of the keys), within
    `window` keys when set; over `padded` (q, kv) lengths when given: a real query never
    reaches a padded key (it lies after every real one), padded queries are dropped."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len

    def causal(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx + offset
        if window is not None:
            keep = keep & (kv_idx > q_idx + offset - window)
        return keep

    return create_block_mask(causal, None, None, *(padded or (q_len, kv_len)), device=device)


class FlexMasks:
    """Block masks by (q_len, kv_len, window, device), shared by the layers of one model: a mask
    depends on the shapes only, so it is built once, not once per layer per step. Holds the few
    shapes a run uses (training, validation, decoding)."""

    MAX_ENTRIES = 8

    def __init__(self):
        self.masks: dict[tuple, object] = {}

    def get(self, q_len: int, kv_len: int, window: Optional[int], device: torch.device,
            padded: Optional[tuple[int, int]] = None):
        key = (q_len, kv_len, window, str(device), padded)
        if key not in self.masks:
            if len(self.masks) >= self.MAX_ENTRIES:
                self.masks.pop(next(iter(self.masks)))
            self.masks[key] = flex_block_mask(q_len, kv_len, window, device, padded)
        return self.masks[key]


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process, on first use (a pure function: torch.compile's
    caches live on the returned object, so it is reused, not rebuilt per call)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def sdpa_gqa_is_fused(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether sdpa's `enable_gqa` reaches a fused kernel. In torch 2.13 only the flash kernels
    take it: on CPU for any dtype and mask, on CUDA for fp16/bf16 without a mask. Everywhere else
    sdpa falls back to the math kernel, which keeps the S x S scores for backward (4 GiB per
    layer at batch 4, 16 heads, seq 4096): there k/v are expanded instead, for the efficient kernels."""
    if device_type == "cpu":
        return True
    return device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not masked


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv_heads, S, D] -> [B, n_kv_heads * n_rep, S, D], each kv head serving n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    def __init__(self, args: BaseTransformerArgs, sliding_window: Optional[int] = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.resolved_heads()
        self.attn_impl = args.attn_impl
        self.sliding_window = sliding_window
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self._warned_fallback = False
        self.flex_masks = FlexMasks()  # BaseTransformer gives all its layers one
        self.memory_bank: Optional[nn.Module] = None  # set by its block (LongMem, lingua.memory_bank)
        self.layer_id = -1

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: Optional[KVCache] = None,
        start: int = 0,
        ctx: Optional[SegmentContext] = None,
    ) -> torch.Tensor:
        """With `ctx` (a segment, lingua.segments) the segment's document mask replaces the
        causal one, and a memory bank (LongMem, lingua.memory_bank) joins its retrieval."""
        bsz, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism this rank holds n_heads / tp of them.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q_raw, k_raw = q, k  # the bank is position-free: it keeps and searches keys without RoPE
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if kv_cache is not None:
            k, v = kv_cache.update(start, k, v)
        if ctx is None:
            out = self._attend(q, k, v)
        else:
            out = self._attend_masked(q, k, v, ctx.mask)
            if self.memory_bank is not None:
                out = self._with_bank(out, q_raw.transpose(1, 2), k_raw.transpose(1, 2), v, ctx)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def _with_bank(self, local, q_raw, k_raw, v, ctx: SegmentContext) -> torch.Tensor:
        """Joint attention over local and retrieved keys; the segment's keys go to the bank."""
        key = ("bank", self.layer_id)
        bank = ctx.state.get(key)
        out = self.memory_bank.fuse(local, self.memory_bank.retrieve(q_raw, bank, ctx.segment.carried))
        if ctx.writes:
            ctx.write(key, self.memory_bank.write(k_raw, v, bank, ctx))
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        impl = self.attn_impl
        if impl == "xformers" and not _xformers_available(q.device):
            impl = self._fallback("xformers has no kernel here (it needs CUDA)")
        if impl == "flex" and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            impl = self._fallback("FlexAttention has no backward on CPU")
        if impl == "xformers":
            return self._xformers(q, k, v)
        if impl == "flex":
            return self._flex(q, k, v)
        q_len, kv_len = q.shape[2], k.shape[2]
        causal = self.sliding_window is None and q_len == kv_len
        # One new token without a window sees every cached key: no mask at all.
        unmasked = causal or (self.sliding_window is None and q_len == 1)
        mask = None if unmasked else _causal_mask(q_len, kv_len, self.sliding_window, q.device)
        gqa = q.shape[1] != k.shape[1]
        if gqa and not sdpa_gqa_is_fused(q.device.type, q.dtype, masked=mask is not None):
            k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    def _attend_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if gqa and not sdpa_gqa_is_fused(q.device.type, q.dtype, masked=True):
            k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def _fallback(self, why: str) -> str:
        if not self._warned_fallback:
            logger.warning("attn_impl=%s unavailable: %s; using sdpa", self.attn_impl, why)
            self._warned_fallback = True
        return "sdpa"

    def _xformers(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        import xformers.ops as xops

        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
        if self.sliding_window is not None:
            bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(self.sliding_window)
        else:
            bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        gqa = q.shape[1] != k.shape[1]
        q_len, kv_len = q.shape[2], k.shape[2]
        padded = flex_padded_lengths(q_len, kv_len, q.device)
        if padded != (q_len, kv_len):
            q = F.pad(q, (0, 0, 0, padded[0] - q_len))
            k, v = (F.pad(t, (0, 0, 0, padded[1] - kv_len)) for t in (k, v))
        else:
            padded = None
        if torch.compiler.is_compiling():  # inside a compiled block: traced into its graph
            mask = flex_block_mask(q_len, kv_len, self.sliding_window, q.device, padded)
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:  # eager flex_attention materialises the scores; compiled once it is the fused kernel
            mask = self.flex_masks.get(q_len, kv_len, self.sliding_window, q.device, padded)
            out = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
        return out[:, :, :q_len]

    def reset_parameters(self, init: ParamInit, init_std: float, factor: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            init.trunc_normal_(w.weight, init_std)
        init.trunc_normal_(self.wo.weight, init_std / factor)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def reset_parameters(self, init: ParamInit, init_std: float, factor: float) -> None:
        init.trunc_normal_(self.w1.weight, init_std)
        init.trunc_normal_(self.w3.weight, init_std)
        init.trunc_normal_(self.w2.weight, self.w2.in_features**-0.5 / factor)


# Selective activation checkpointing: keep attention outputs and every other matmul output
# (expensive to recompute), recompute the rest: the other matmuls and the cheap elementwise
# ops (norms, SiLU, RoPE, residual adds). The matmul count restarts for the recompute pass,
# so both passes make the same choices.
_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,
}
# xformers registers its kernels under these namespaces (cutlass, flash 2 and 3 forwards).
_XFORMERS_NAMESPACES = ("xformers", "xformers_flash", "xformers_flash3")
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def is_attention_op(op) -> bool:
    """An attention kernel's forward, whichever attn_impl ran it: kept by SAC, not recomputed."""
    if op in _ATTENTION_OPS:
        return True
    namespace, name = getattr(op, "namespace", ""), getattr(op, "__name__", "")
    return namespace in _XFORMERS_NAMESPACES and ("fwd" in name or "forward" in name)


def selective_checkpoint_context():
    matmuls = {"forward": 0, "recompute": 0}

    def policy(ctx, op, *args, **kwargs):
        if is_attention_op(op):
            return CheckpointPolicy.MUST_SAVE
        if op in _MATMUL_OPS:
            mode = "recompute" if ctx.is_recompute else "forward"
            matmuls[mode] += 1
            if matmuls[mode] % 2 == 1:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class TransformerBlock(nn.Module):
    """Pre-norm block. `feed_forward` may be any module mapping [B, S, dim] -> [B, S, dim].
    `memory_slots` (LM2, lingua.memory_slots) adds its read to the attention output, before the
    FFN; it and the segment's document mask come into play when a SegmentContext is passed."""

    def __init__(self, args: BaseTransformerArgs, layer_id: int, feed_forward: nn.Module, sliding_window=None,
                 memory_slots: Optional[nn.Module] = None, memory_bank: Optional[nn.Module] = None):
        super().__init__()
        self.layer_id = layer_id
        self.memory_slots = memory_slots
        self.attention = Attention(args, sliding_window)
        self.attention.memory_bank, self.attention.layer_id = memory_bank, layer_id
        self.feed_forward = feed_forward
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Set by parallelize_model; a flag, not a wrapper module, so parameter names stay put.
        self.activation_checkpointing = False
        # Hyper-connections (args.mhc) around each sublayer, or around the whole block.
        self.mhc_attention = self.mhc_feed_forward = self.mhc_block = None
        if args.mhc.enabled:
            if args.mhc.wrap == "sublayer":
                self.mhc_attention = HyperConnection(args.dim, args.mhc, args.norm_eps)
                self.mhc_feed_forward = HyperConnection(args.dim, args.mhc, args.norm_eps)
            else:
                self.mhc_block = HyperConnection(args.dim, args.mhc, args.norm_eps)

    def attention_branch(self, x, rope, kv_cache: Optional[KVCache] = None, start: int = 0,
                         ctx: Optional[SegmentContext] = None) -> torch.Tensor:
        a = self.attention(self.attention_norm(x), rope, kv_cache, start, ctx)
        if self.memory_slots is not None and ctx is not None:
            a = a + self.memory_slots(x + a, ctx, self.layer_id)
        return a

    def feed_forward_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.ffn_norm(x))

    def forward(self, x, rope, kv_cache: Optional[KVCache] = None, start: int = 0,
                ctx: Optional[SegmentContext] = None) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None:
            # The recomputation writes the same memory update into ctx again: harmless, the
            # caller took the state after the forward.
            return checkpoint(self._forward, x, rope, None, 0, ctx, use_reentrant=False,
                              context_fn=selective_checkpoint_context)
        return self._forward(x, rope, kv_cache, start, ctx)

    def _forward(self, x, rope, kv_cache: Optional[KVCache] = None, start: int = 0,
                 ctx: Optional[SegmentContext] = None) -> torch.Tensor:
        """x: [B, S, dim], or [B, S, n_streams, dim] with hyper-connections."""
        if self.mhc_attention is not None:
            x = self.mhc_attention(x, lambda h: self.attention_branch(h, rope, kv_cache, start, ctx))
            return self.mhc_feed_forward(x, self.feed_forward_branch)
        if self.mhc_block is not None:
            return self.mhc_block(x, lambda h: self.block_branch(h, rope, kv_cache, start, ctx))
        return x + self.block_branch(x, rope, kv_cache, start, ctx)

    def block_branch(self, x, rope, kv_cache: Optional[KVCache] = None, start: int = 0,
                     ctx: Optional[SegmentContext] = None) -> torch.Tensor:
        """What the block adds to its input: attention (and memory reads), then the FFN on the
        updated state."""
        a = self.attention_branch(x, rope, kv_cache, start, ctx)
        return a + self.feed_forward_branch(x + a)

    def reset_parameters(self, init: ParamInit, init_std: float, factor: float) -> None:
        """A swapped-in FFN must offer reset_parameters(init, init_std, factor) too."""
        self.attention.reset_parameters(init, init_std, factor)
        self.attention_norm.reset_parameters(init)
        self.ffn_norm.reset_parameters(init)
        self.feed_forward.reset_parameters(init, init_std, factor)
        for hc in (self.mhc_attention, self.mhc_feed_forward, self.mhc_block):
            if hc is not None:
                hc.reset_parameters(init)
        if self.memory_slots is not None:
            self.memory_slots.reset_parameters(init, init_std, factor)
        if self.attention.memory_bank is not None:
            self.attention.memory_bank.reset_parameters(init)


class BaseTransformer(nn.Module):
    """The stack of blocks. Subclasses override `build_feed_forward` to swap a block's FFN and
    `build_memory_slots` to give a block LM2 memory slots."""

    def __init__(self, args: BaseTransformerArgs, sliding_window: Optional[int] = None):
        super().__init__()
        self.args = args
        _, _, head_dim = args.resolved_heads()
        args.mhc.check()
        self.init_base_std = args.init_base_std
        self.rope = RotaryEmbedding(head_dim, args.max_seqlen, args.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, self.build_feed_forward(args, i), sliding_window, self.build_memory_slots(args, i),
                             self.build_memory_bank(args, i))
            for i in range(args.n_layers)
        )
        flex_masks = FlexMasks()
        for layer in self.layers:
            layer.attention.flex_masks = flex_masks

    def build_feed_forward(self, args: BaseTransformerArgs, layer_id: int) -> nn.Module:
        return FeedForward(args.dim, args.ffn_hidden_dim())

    def build_memory_slots(self, args: BaseTransformerArgs, layer_id: int) -> Optional[nn.Module]:
        return None

    def build_memory_bank(self, args: BaseTransformerArgs, layer_id: int) -> Optional[nn.Module]:
        return None

    def forward_blocks(self, h: torch.Tensor, kv_caches: Optional[list[KVCache]] = None, start: int = 0,
                       ctx: Optional[SegmentContext] = None):
        """[B, S, dim] -> [B, S, dim]; with hyper-connections the blocks see n streams in between.
        `ctx`: the segment being processed and its memory state (lingua.segments)."""
        rope = self.rope(start, h.shape[1])
        if self.args.mhc.enabled:
            h = expand_streams(h, self.args.mhc.n_streams)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, kv_caches[i] if kv_caches is not None else None, start, ctx)
        return reduce_streams(h) if self.args.mhc.enabled else h

    def hyper_connections(self) -> list[tuple[str, HyperConnection]]:
        """The model's hyper-connections in the order the residual stream passes them."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, HyperConnection)]

    def init_std(self) -> float:
        return self.init_base_std or self.args.dim**-0.5

    def reset_parameters(self, init: ParamInit) -> None:
        self.rope.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters(init, self.init_std(), depth_init_factor(self.args, layer.layer_id))


def matmul_flops_per_token(n_matmul_params: int, n_layers: int, dim: int, seq_len: int,
                           n_trainable: Optional[int] = None) -> float:
    """Training FLOPs per token: 6 per matmul weight (fwd 2 + bwd 4) plus causal attention.
    `n_trainable`: of the matmul weights, those that train (a frozen component's count only
    their forward: 2 instead of 6); None: all.

    Attention scores and the weighted sum cost 2 * 2 * seq * dim per token per layer forward
    over the full square; a causal kernel does half of that, so we count half (6 L d s in
    fwd+bwd, not PaLM's 12 L d s) to not flatter MFU.
    """
    n_trainable = n_matmul_params if n_trainable is None else n_trainable
    return 2.0 * n_matmul_params + 4.0 * n_trainable + 6.0 * n_layers * dim * seq_len
