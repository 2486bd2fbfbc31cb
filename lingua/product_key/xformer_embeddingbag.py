"""The weighted embedding bag of the product-key memory: out[n] = sum_j weights[n, j] * table[rows[n, j]].

Owns its implementations and the dispatch between them: Triton kernels on CUDA (fp32 accumulation,
a reverse-index table gradient without atomics), a CPU autograd path (ATen bag + compiled score
gradient), and the plain `F.embedding_bag` reference they are tested against.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from types import SimpleNamespace
import torch
import torch.nn.functional as F

IMPLS = ("auto", "triton", "cpu", "reference")

# Whether triton can be imported; it is imported only when a Triton kernel is first needed.
_HAS_TRITON = importlib.util.find_spec("triton") is not None

# Below this many lookups (N * K) the CPU path uses ATen's own backward: it takes milliseconds
# there, while compiling the score-gradient kernel costs seconds (tiny test models, debug runs).
CPU_COMPILE_MIN_LOOKUPS = 1 << 16

# Triton tile sizes. Column blocks are at most MAX_BLOCK_D wide (a power of two; a masked tail
# handles widths that are not), so any width works and wide tables get more programs.
MAX_BLOCK_D = 256
BLOCK_K = 16  # (row, weight) pairs of one bag loaded together
BLOCK_P = 16  # (bag, slot) pairs of one row accumulated together in the table gradient


def weighted_bag(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """sum_j weights[n, j] * table[rows[n, j]] for each n: rows, weights [N, K] -> [N, table.shape[1]].

    The result has the table's dtype; gradients reach the table and the weights. The Triton
    kernels read fp32 (softmax) weights as they are, accumulate in fp32 and give their gradient
    in their dtype: rounding them to a bf16 table's dtype would cost the scores ~3 digits. ATen's
    bag (the CPU and reference paths) needs weights of the table's dtype, so they are cast there.
    `impl`: "auto" (CUDA + triton -> Triton; CPU -> the CPU path; else the reference), or force
    "triton" (CPU tensors need TRITON_INTERPRET=1), "cpu" or "reference".
    """
    _check_shapes(table, rows, weights)
    if impl == "auto":
        if table.is_cuda and _HAS_TRITON:
            impl = "triton"
        elif table.device.type == "cpu" and rows.numel() >= CPU_COMPILE_MIN_LOOKUPS:
            impl = "cpu"
        else:
            impl = "reference"
    if impl == "triton":
        return triton_weighted_bag(table, rows, weights)
    if impl == "cpu":
        return cpu_weighted_bag(table, rows, weights.to(table.dtype))
    if impl == "reference":
        return reference_weighted_bag(table, rows, weights.to(table.dtype))
    raise ValueError(f"weighted_bag: impl={impl!r}, expected one of {IMPLS}")


def reference_weighted_bag(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ATen's embedding bag: what the other implementations must reproduce."""
    return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")


def _check_shapes(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> None:
    if table.dim() != 2 or rows.dim() != 2 or rows.shape != weights.shape:
        raise ValueError(f"weighted_bag: expected table [R, D] and rows, weights [N, K]; got table "
                         f"{tuple(table.shape)}, rows {tuple(rows.shape)}, weights {tuple(weights.shape)}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"weighted_bag: rows must be int32 or int64, got {rows.dtype}")


# ---------------------------------------------------------------------------------------
# CPU: ATen's bag for the output and the table gradient, a compiled kernel for the score gradient
# ---------------------------------------------------------------------------------------


def cpu_weighted_bag(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The CPU training path (works on any device inductor compiles for).

    ATen's bag with the weights as a constant gives the output and the table gradient
    (its dense backward is parallel and good); ATen's weight gradient
    (_embedding_bag_per_sample_weights_backward) is a single-threaded loop and was ~40% of the
    whole fwd+bwd at 1M rows, so `_AttachScoreGrad` supplies it instead, from a compiled
    gather-dot. Composing the two keeps everything in public autograd: no forward is re-run,
    no graph is held on a ctx, and activation checkpointing sees ordinary saved tensors.
    """
    _check_shapes(table, rows, weights)
    out = F.embedding_bag(rows, table, per_sample_weights=weights.detach(), mode="sum")
    if weights.requires_grad and torch.is_grad_enabled():
        out = _AttachScoreGrad.apply(out, weights, table.detach(), rows)
    return out


def _score_grad(table: torch.Tensor, rows: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """grad_w[n, j] = table[rows[n, j]] . grad_out[n], accumulated in fp32. Compiled, the gather
    fuses into the dot product: the [N, K, D] gather is never materialised."""
    return (table[rows].float() * grad_out.float().unsqueeze(1)).sum(-1)


@functools.cache
def _compiled_score_grad():
    # One compiled function for the process: torch.compile's caches (one static kernel per
    # training shape, a dynamic one if shapes keep changing) live on this object, so it must
    # be reused, not rebuilt per call. It is a pure function holding no data, and is built on
    # first use so importing this module does not import dynamo.
    return torch.compile(_score_grad)


class _AttachScoreGrad(torch.autograd.Function):
    """Identity on the bag output; its backward adds the weights' gradient.

    Returns a copy (N x D, ~1% of the bag's time at 8k tokens): an input returned as-is becomes
    a view that autograd forbids modifying in place, and the bag's result must behave like
    F.embedding_bag's."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, rows: torch.Tensor):
        ctx.save_for_backward(table, rows)
        ctx.weights_dtype = weights.dtype
        return out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        table, rows = ctx.saved_tensors
        # Inside an outer torch.compile (compiled blocks) the plain function is traced and
        # fused into the caller's backward graph; eager, the cached compiled kernel runs.
        score_grad = _score_grad if torch.compiler.is_compiling() else _compiled_score_grad()
        grad_w = score_grad(table, rows, grad_out.contiguous()).to(ctx.weights_dtype)
        return grad_out, grad_w, None, None


# ---------------------------------------------------------------------------------------
# Triton (CUDA; CPU tensors only under the interpreter)
# ---------------------------------------------------------------------------------------


def triton_available() -> bool:
    return _HAS_TRITON


def triton_weighted_bag(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The Triton bag (autograd-aware). CUDA tensors, or CPU tensors when triton was imported
    with TRITON_INTERPRET=1 (tests). Rows must lie in [0, R): not checked (that would sync).

    The kernels are wrapped as torch.library custom ops, so torch.compile (compiled blocks)
    keeps them as opaque nodes instead of tracing into the launch code."""
    _check_shapes(table, rows, weights)
    if not _HAS_TRITON:
        raise RuntimeError("triton_weighted_bag needs triton (pip install -r requirements.txt)")
    return _triton_bag(table, rows, weights)


def reverse_indices(rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lookups grouped by value row, for the table gradient, in shapes fixed by rows.shape
    and n_rows alone: nothing is read back to the host (bincount, nonzero or a length would
    each make the host wait for the GPU, per memory layer per step).

    Returns (touched, starts, counts, pairs): `pairs` lists every flat lookup index n * K + j
    grouped by row (stable, so each row's accumulation order is fixed: deterministic
    gradients); slot i owns pairs[starts[i] : starts[i] + counts[i]], the lookups of row
    touched[i]. There are min(N * K, n_rows) slots, as many as rows could be touched: the
    touched rows come first, most-looked-up first (the longest programs start first and the
    tail is short; ties by row), then slots with count 0, which the kernel skips.
    """
    flat = rows.reshape(-1)
    pairs = torch.argsort(flat, stable=True)
    sorted_rows = flat[pairs]
    per_row = torch.zeros(n_rows, dtype=torch.int64, device=rows.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int64))
    # A row's run of lookups starts where the sorted rows change; only the start carries its count.
    is_start = torch.ones_like(sorted_rows, dtype=torch.bool)
    is_start[1:] = sorted_rows[1:] != sorted_rows[:-1]
    run_counts = torch.where(is_start, per_row[sorted_rows], 0)
    order = torch.argsort(run_counts, descending=True, stable=True)[: min(flat.numel(), n_rows)]
    return sorted_rows[order], order, run_counts[order], pairs


def _launchable(t: torch.Tensor) -> SimpleNamespace:
    """The kernels, after checking that Triton can run on t's device."""
    kernels = _kernels()
    if not t.is_cuda and not kernels.interpreted:
        raise RuntimeError(f"triton_weighted_bag got {t.device} tensors: Triton runs them only under its "
                           "interpreter (set TRITON_INTERPRET=1 before triton is first imported)")
    return kernels


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it t's (cuda:1 tensors while cuda:0 is current).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_d(d: int) -> int:
    return min(1 << max(d - 1, 0).bit_length(), MAX_BLOCK_D)  # next power of two, capped


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_bag(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    table, rows, weights = table.contiguous(), rows.contiguous(), weights.contiguous()
    (n, k), d = rows.shape, table.shape[1]
    out = table.new_empty(n, d)
    if n and d:
        if k == 0:
            return out.zero_()
        block_d = _block_d(d)
        with _on_device(table):
            _launchable(table).forward[(n, _cdiv(d, block_d))](
                table, rows, weights, out, k, d, BLOCK_K=BLOCK_K, BLOCK_D=block_d)
    return out


# Custom ops, so that torch.compile keeps the launches as opaque nodes. (A dispatch mode does
# not see inside a custom op: tests check the _launch_* functions for host syncs directly.)
_triton_bag = torch.library.custom_op("lingua_pk::triton_bag", _launch_bag, mutates_args=())


@_triton_bag.register_fake
def _(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return table.new_empty(rows.shape[0], table.shape[1])


def _launch_table_grad(grad_out: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """grad_table (table's shape and dtype; `table` itself is not read): one program per
    slot of the reverse indices (a touched row, or an empty slot that stores nothing)."""
    grad_out, rows, weights = grad_out.contiguous(), rows.contiguous(), weights.contiguous()
    (r, d), k = table.shape, rows.shape[1]
    grad_table = torch.zeros(r, d, dtype=table.dtype, device=table.device)  # unhit rows: exactly 0
    if rows.numel() and d:
        touched, starts, counts, pairs = reverse_indices(rows, r)
        block_d = _block_d(d)
        with _on_device(table):
            _launchable(table).table_grad[(touched.numel(), _cdiv(d, block_d))](
                grad_out, weights, pairs, touched, starts, counts, grad_table, k, d, BLOCK_P=BLOCK_P, BLOCK_D=block_d)
    return grad_table


_triton_table_grad = torch.library.custom_op("lingua_pk::triton_bag_table_grad", _launch_table_grad, mutates_args=())


@_triton_table_grad.register_fake
def _(grad_out: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(table, memory_format=torch.contiguous_format)


def _launch_score_grad(grad_out: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """grad_weights (weights' shape and dtype; their values are not read): one program per bag."""
    grad_out, table, rows = grad_out.contiguous(), table.contiguous(), rows.contiguous()
    (n, k), d = rows.shape, table.shape[1]
    grad_w = torch.zeros(n, k, dtype=weights.dtype, device=weights.device)
    if n and k and d:
        with _on_device(table):
            _launchable(table).score_grad[(n,)](table, rows, grad_out, grad_w, k, d, BLOCK_K=BLOCK_K,
                                                BLOCK_D=_block_d(d))
    return grad_w


_triton_score_grad = torch.library.custom_op("lingua_pk::triton_bag_score_grad", _launch_score_grad, mutates_args=())


@_triton_score_grad.register_fake
def _(grad_out: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.empty(rows.shape, dtype=weights.dtype, device=weights.device)


def _triton_bag_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _triton_bag_backward(ctx, grad_out: torch.Tensor):
    table, rows, weights = ctx.saved_tensors
    grad_table = _triton_table_grad(grad_out, table, rows, weights) if ctx.needs_input_grad[0] else None
    grad_w = _triton_score_grad(grad_out, table, rows, weights) if ctx.needs_input_grad[2] else None
    return grad_table, None, grad_w


_triton_bag.register_autograd(_triton_bag_backward, setup_context=_triton_bag_setup)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The Triton kernels, defined on first use.

    Not at module level: triton stays optional, and `triton.jit` decides between compiling and
    the interpreter when a kernel is *defined* (TRITON_INTERPRET at that moment), so tests can
    set it before anything here runs. Cached because a kernel's compiled variants live on it.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def bag_forward(table, rows, weights, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (bag, column block): out[n, cols] = sum_j w[n, j] * table[rows[n, j], cols].
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            r = tl.load(rows + n * K + ks, mask=kmask, other=0).to(tl.int64)
            w = tl.load(weights + n * K + ks, mask=kmask, other=0.0).to(tl.float32)
            v = tl.load(table + r[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(v.to(tl.float32) * w[:, None], axis=0)
        tl.store(out + n * D + cols, acc.to(out.dtype.element_ty), mask=cmask)

    @triton.jit
    def bag_table_grad(grad_out, weights, pairs, touched, starts, counts, grad_table, K, D,
                       BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (touched row, column block) owns that slice of the row's gradient:
        # grad_table[row] = sum over its lookups (n, j) of w[n, j] * grad_out[n]. No other
        # program writes it, so there are no atomics and the sum order is fixed. Slots with
        # count 0 (the grid is sized without reading the number of touched rows) store nothing.
        i = tl.program_id(0)
        row = tl.load(touched + i).to(tl.int64)
        start = tl.load(starts + i)
        count = tl.load(counts + i).to(tl.int32)  # one row's lookups: loop bound, fits easily
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(0, count, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            pmask = ps < count
            pair = tl.load(pairs + start + ps, mask=pmask, other=0).to(tl.int64)  # n * K + j
            w = tl.load(weights + pair, mask=pmask, other=0.0).to(tl.float32)
            bag = pair // K
            g = tl.load(grad_out + bag[:, None] * D + cols[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32) * w[:, None], axis=0)
        tl.store(grad_table + row * D + cols, acc.to(grad_table.dtype.element_ty), mask=cmask & (count > 0))

    @triton.jit
    def bag_score_grad(table, rows, grad_out, grad_w, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per bag: grad_w[n, j] = table[rows[n, j]] . grad_out[n].
        n = tl.program_id(0).to(tl.int64)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            r = tl.load(rows + n * K + ks, mask=kmask, other=0).to(tl.int64)
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                cmask = cols < D
                g = tl.load(grad_out + n * D + cols, mask=cmask, other=0.0).to(tl.float32)
                v = tl.load(table + r[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc += tl.sum(v.to(tl.float32) * g[None, :], axis=1)
            tl.store(grad_w + n * K + ks, acc.to(grad_w.dtype.element_ty), mask=kmask)

    return SimpleNamespace(
        forward=bag_forward,
        table_grad=bag_table_grad,
        score_grad=bag_score_grad,
        interpreted=type(bag_forward).__name__ == "InterpretedFunction",
    )
