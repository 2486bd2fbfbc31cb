"""Manifold-constrained hyper-connections (mHC; DeepSeek, arXiv 2512.24880).

The residual stream is widened into n streams x [..., n, C]. Around each sublayer F (attention
and FFN, or a whole block):
    x' = RMSNorm(flatten(x));   H~ = alpha * (x' phi) + b          (dynamic + static)
    H_pre = sigmoid(H~_pre) [n],  H_post = 2 sigmoid(H~_post) [n],  H_res = SinkhornKnopp(H~_res) [n, n]
    x_next = H_res x + H_post^T F(H_pre x)
H_res is doubly stochastic, so the residual path neither amplifies nor attenuates on average,
however deep the stack: the Amax gains (largest row sum forward, column sum backward, of each
H_res and of their product over layers) stay near 1, where unconstrained hyper-connections drift.

Initialisation: phi = 0 and b such that H_pre = 1/n, H_post = 1 and H_res is near the
identity. The embedding is copied into every stream, the copies stay equal, and the model
computes the plain pre-norm function; the dynamic part grows from there at a pace set by alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lingua.args import choice
from lingua.distributed import collective_device

AMAX_WARN = 2.0  # above this the residual path amplifies noticeably (the paper's healthy range is < 2)
# Sinkhorn starts from exp(logits - max) with logits floored at max - LOG_FLOOR: every entry stays
# a positive fp32 normal number (e^-60 ~ 1e-26), so no row or column is ever all zeros.
LOG_FLOOR = 60.0
# H_res starts near the identity: off-diagonal logits this far below the diagonal give
# about 0.95 on the diagonal for n = 4, so each stream mostly keeps its own state.
RES_INIT_OFFDIAG = -4.0
# sigmoid(b_pre) = 1/n needs b_pre = -log(n - 1), infinite for n = 1: there it is 20, whose sigmoid
# is 1 in fp32, so one stream is exactly the plain residual model (the pre-norm would remove
# any other scale of H_pre anyway, up to its epsilon).
PRE_LOGIT_MAX = 20.0


@dataclass
class MHCArgs:
    """`model.mhc`."""

    enabled: bool = False
    n_streams: int = 4
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    dynamic: bool = True  # input-dependent H (x' phi); false: static b only
    wrap: str = choice("sublayer", ("sublayer", "block"))  # around attention and FFN each, or each block

    def check(self) -> None:
        if self.n_streams < 1:
            raise ValueError(f"model.mhc.n_streams must be >= 1, got {self.n_streams}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"model.mhc.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")


def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """A doubly stochastic matrix from logits [..., n, n], in fp32: start from exp(logits) (shifted
    by the max and floored, so nothing overflows or underflows to 0), then alternate column and
    row normalisation. Autograd differentiates the unrolled iterations (a hand-written
    "simplified" backward in one public port is wrong)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (fp64 for gradcheck)
    z = z - z.detach().amax(dim=(-2, -1), keepdim=True)
    m = z.clamp(min=-LOG_FLOOR).exp()
    if torch.compiler.is_compiling():
        # Inductor fuses each normalisation over the per-token n x n block into one loop.
        for _ in range(iters):
            m = m / m.sum(dim=-2, keepdim=True)
            m = m / m.sum(dim=-1, keepdim=True)
        return m
    # Eager: matrix dimensions first, so every entry is a contiguous vector over tokens and each
    # of the 4 kernels per iteration is one vectorised pass over all tokens (fwd + bwd ~6x
    # faster than on [..., n, n] on a CPU).
    m = m.movedim((-2, -1), (0, 1)).contiguous()
    for _ in range(iters):
        m = m / m.sum(dim=0, keepdim=True)
        m = m / m.sum(dim=1, keepdim=True)
    return m.movedim((0, 1), (-2, -1))


class _MatmulInFP32(torch.autograd.Function):
    """a @ b computed in fp32 (or wider), saving a and b as they came: the low-precision streams
    are kept for backward in their own dtype, not as an fp32 copy twice their size. Shapes: two
    matrices, or batches of the same batch shape. Backward is matmul's own, in the same precision."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        dtype = _compute_dtype(a, b)
        with torch.autocast(a.device.type, enabled=False):  # autocast would make it bf16 again
            return torch.matmul(a.to(dtype), b.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad = grad.to(_compute_dtype(a, b))
        with torch.autocast(a.device.type, enabled=False):
            grad_a = torch.matmul(grad, b.to(grad.dtype).mT).to(a.dtype) if ctx.needs_input_grad[0] else None
            grad_b = torch.matmul(a.to(grad.dtype).mT, grad).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _MatmulInFP32.apply(a, b)


class HyperConnection(nn.Module):
    """mHC around one sublayer: forward(x [..., n, C], F) -> [..., n, C], F mapping [..., C] -> [..., C]."""

    def __init__(self, dim: int, args: MHCArgs, norm_eps: float = 1e-5):
        super().__init__()
        n = args.n_streams
        self.n, self.dim, self.iters, self.eps = n, dim, args.sinkhorn_iters, norm_eps
        self.alpha_init = args.alpha_init
        width = 2 * n + n * n  # [pre | post | res]
        self.phi = nn.Parameter(torch.empty(n * dim, width)) if args.dynamic else None
        self.bias = nn.Parameter(torch.empty(width))
        self.alpha = nn.Parameter(torch.empty(3))  # scales of the dynamic pre, post and res parts
        # The last forward's H_res (detached), for the Amax metrics: n^2 floats per token.
        self.last_h_res: Optional[torch.Tensor] = None

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre [..., n], H_post [..., n], H_res [..., n, n]) in fp32 for streams x [..., n, C];
        without the dynamic part they are the same for every token: [n], [n] and [n, n]."""
        n = self.n
        h = self.bias.float()
        if self.phi is not None:
            # RMSNorm(x) phi = (x phi) * rsqrt(mean(x^2) + eps): the per-token scale is applied
            # after the small matmul, so the normalised [.., n * C] copy is never written. Both
            # read the streams in their own dtype and compute in fp32, so backward keeps bf16
            # streams as they are, not an fp32 copy of them.
            flat = x.flatten(-2)
            sq_norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=torch.float32).square()
            inv_rms = torch.rsqrt(sq_norm / flat.shape[-1] + self.eps)
            a = self.alpha.float()
            scale = torch.cat([a[0:1].expand(n), a[1:2].expand(n), a[2:3].expand(n * n)])
            proj = matmul_fp32(flat.flatten(0, -2), self.phi).unflatten(0, flat.shape[:-1])
            h = proj * inv_rms * scale + h
        h_pre = torch.sigmoid(h[..., :n])
        h_post = 2 * torch.sigmoid(h[..., n : 2 * n])
        h_res = sinkhorn_knopp(h[..., 2 * n :].unflatten(-1, (n, n)), self.iters)
        return h_pre, h_post, h_res

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        h_pre, h_post, h_res = self.coefficients(x)
        self.last_h_res = h_res.detach()
        # The streams are mixed in fp32 with the fp32 coefficients, and only the result is
        # rounded to the streams' dtype: coefficients rounded to bf16 would bias every layer
        # alike (H_res row sums 1.0012, a product of 1.06 over 48 sublayers) while the logged
        # Amax, taken from the fp32 matrix, showed none of it.
        if torch.compiler.is_compiling():
            # Broadcast sums over the n streams: inductor fuses H_pre x into one pass and
            # H_res x + H_post^T out into another (as matmuls they stay batched GEMMs of tiny
            # per-token matrices, slower here).
            out = sublayer((h_pre.unsqueeze(-1) * x).sum(-2).to(x.dtype))
            mixed = (h_res.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)
            return (mixed + h_post.unsqueeze(-1) * out.unsqueeze(-2)).to(x.dtype)
        # Eager: one per-token [1 + n, n] x [n, C] matmul reads the streams once for both the
        # sublayer's input (row 0: H_pre x) and the mixed residual (rows 1..n: H_res x).
        both = matmul_fp32(torch.cat([h_pre.unsqueeze(-2), h_res], dim=-2), x)
        out = sublayer(both[..., 0, :].to(x.dtype))
        return torch.addcmul(both[..., 1:, :], h_post.unsqueeze(-1), out.unsqueeze(-2)).to(x.dtype)

    def reset_parameters(self, init) -> None:
        """`init`: a lingua.transformer.ParamInit (same values on any device or sharding)."""
        n = self.n
        pre = min(-math.log(n - 1), PRE_LOGIT_MAX) if n > 1 else PRE_LOGIT_MAX
        res = torch.full((n, n), RES_INIT_OFFDIAG).fill_diagonal_(0.0)
        full = torch.cat([torch.full((n,), pre), torch.zeros(n), res.flatten()])
        init.copy_(self.bias, full)
        init.copy_(self.alpha, torch.full((3,), self.alpha_init))
        if self.phi is not None:
            init.zeros_(self.phi)
        self.last_h_res = None


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """[..., C] -> [..., n, C]: the embedding copied into every stream. A real copy, not a
    stride-0 view: every block then sees the same strides, and a compiled block (one code
    object for all of them) needs one graph, not one more for block 0."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


def reduce_streams(x: torch.Tensor) -> torch.Tensor:
    """[..., n, C] -> [..., C]: the streams summed before the final norm."""
    return x.sum(dim=-2)


def amax_gains(h: torch.Tensor) -> tuple[float, float]:
    """(forward, backward) Amax gain of matrices [..., n, n]: the largest absolute row sum and
    the largest absolute column sum over all of them."""
    a = h.detach().abs().double()
    return float(a.sum(-1).amax()), float(a.sum(-2).amax())


def composite(h_res: Iterable[torch.Tensor]) -> torch.Tensor:
    """The residual path's total mixing H_L ... H_1 (first applied rightmost), per token."""
    total = None
    for h in h_res:
        h = h.detach().double()
        total = h if total is None else h @ total
    return total


def amax_stats(named_connections: Iterable[tuple[str, HyperConnection]]) -> dict[str, float]:
    """Per-connection and composite Amax gains of the last forward, maxed over tokens and over
    data-parallel ranks (a collective in a distributed run: call it on every rank)."""
    named = [(name, hc.last_h_res) for name, hc in named_connections if hc.last_h_res is not None]
    if not named:
        return {}
    stats = {}
    for name, h in named:
        stats[f"{name}/amax_forward"], stats[f"{name}/amax_backward"] = amax_gains(h)
    stats["amax_forward"] = max(v for k, v in stats.items() if k.endswith("/amax_forward"))
    stats["amax_backward"] = max(v for k, v in stats.items() if k.endswith("/amax_backward"))
    stats["composite_amax_forward"], stats["composite_amax_backward"] = amax_gains(composite(h for _, h in named))
    if dist.is_available() and dist.is_initialized():
        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=collective_device())
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        stats = dict(zip(keys, values.tolist()))
    return stats
