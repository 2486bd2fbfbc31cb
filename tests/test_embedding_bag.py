"""The weighted embedding bag (lingua/product_key/xformer_embeddingbag.py): every implementation
matches F.embedding_bag (output, table gradient, weights gradient), duplicates included.

The Triton kernels run on CPU tensors under the Triton interpreter, in a subprocess: triton reads
TRITON_INTERPRET when a kernel is defined, and this pytest process must stay uninterpreted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lingua.product_key.xformer_embeddingbag import (
    cpu_weighted_bag,
    reference_weighted_bag,
    reverse_indices,
    triton_available,
    triton_weighted_bag,
    weighted_bag,
)
from tests.conftest import failure_report, ROOT


def make_case(n_rows: int, width: int, n_bags: int, k: int, seed: int = 0, dtype=torch.float32):
    """Random lookups that repeat rows inside a bag and across bags and leave some rows unhit."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(n_rows, width, generator=gen, dtype=dtype)
    rows = torch.randint(0, n_rows // 2, (n_bags, k), generator=gen)  # the upper half is never hit
    rows[0, : k // 2] = 3  # one row many times in one bag...
    rows[1:, :2] = 3  # ...and in every other bag: in the first case more lookups than one Triton block of pairs (16)
    weights = torch.rand(n_bags, k, generator=gen, dtype=dtype)
    grad_out = torch.randn(n_bags, width, generator=gen, dtype=dtype)
    return table, rows, weights, grad_out


def run_bag(fn, table, rows, weights, grad_out, table_grad: bool = True, weights_grad: bool = True):
    table = table.clone().requires_grad_(table_grad)
    weights = weights.clone().requires_grad_(weights_grad)
    out = fn(table, rows, weights)
    out.backward(grad_out)
    return out.detach(), table.grad, weights.grad


# ---------------------------------------------------------------------------------------
# Triton, under the interpreter on CPU tensors
# ---------------------------------------------------------------------------------------

# (rows, width, bags, lookups per bag): a power-of-two width, widths that are not, one wider
# than a column block (256), and K above and below the 16-pair block.
TRITON_CASES = [(40, 64, 6, 20), (40, 100, 5, 9), (24, 300, 3, 17)]

_INTERPRETED = r"""
import json, sys
import torch
from lingua.product_key import xformer_embeddingbag as xe
from tests.test_embedding_bag import TRITON_CASES, make_case, run_bag
assert xe._kernels().interpreted, "TRITON_INTERPRET did not take effect"
errors = {}
for case in TRITON_CASES:
    table, rows, weights, grad_out = make_case(*case)
    ref = run_bag(xe.reference_weighted_bag, table, rows, weights, grad_out)
    for idx in (torch.int64, torch.int32):
        got = run_bag(xe.triton_weighted_bag, table, rows.to(idx), weights, grad_out)
        errors[f"{case} {idx}"] = [float((a - b).abs().max()) for a, b in zip(got, ref)]
    # weights without grad: only the table gradient is computed
    got = run_bag(xe.triton_weighted_bag, table, rows, weights, grad_out, weights_grad=False)
    errors[f"{case} table only"] = [float((got[0] - ref[0]).abs().max()), float((got[1] - ref[1]).abs().max()),
                                    0.0 if got[2] is None else float("inf")]
# Row 7 looked up 3 times in bag 0 and once in bag 1: its gradient is the sum of all four.
table = torch.randn(10, 64)
rows = torch.tensor([[7, 7, 2, 7], [7, 1, 1, 0]])
weights = torch.tensor([[0.5, 0.25, 1.0, 2.0], [4.0, 1.0, 1.0, 1.0]])
grad_out = torch.randn(2, 64)
_, gt, _ = run_bag(xe.triton_weighted_bag, table, rows, weights, grad_out)
expected = 2.75 * grad_out[0] + 4.0 * grad_out[1]
errors["duplicates by hand"] = [float((gt[7] - expected).abs().max()), float(gt[3:7].abs().max()), 0.0]
# The custom ops are well formed (schema, fake kernels, autograd registration), and a compiled
# caller traces them as opaque nodes with no graph break.
table, rows, weights, grad_out = make_case(*TRITON_CASES[1])
args = (table.requires_grad_(), rows, weights.requires_grad_())
torch.library.opcheck(xe._triton_bag, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
compiled = torch.compile(xe.triton_weighted_bag, backend="aot_eager", fullgraph=True)
got = run_bag(compiled, table.detach(), rows, weights.detach(), grad_out)
ref = run_bag(xe.reference_weighted_bag, table.detach(), rows, weights.detach(), grad_out)
errors["compiled"] = [float((a - b).abs().max()) for a, b in zip(got, ref)]
# A bf16 table with fp32 softmax weights: the weights are used and differentiated in fp32.
table, rows, weights, grad_out = make_case(*TRITON_CASES[0])
table16 = table.bfloat16()
grad16 = grad_out.bfloat16()
out, _, gw = run_bag(lambda t, r, w: xe.weighted_bag(t, r, w, impl="triton"), table16, rows, weights, grad16)
exact_gw = (table16.double()[rows] * grad16.double().unsqueeze(1)).sum(-1)  # d out / d weights, exactly
errors["bf16 table fp32 weights"] = [str(out.dtype), str(gw.dtype),
                                     float(((gw.double() - exact_gw).abs() / exact_gw.abs().clamp(min=1e-3)).max())]
# Nothing read back to the host by the launch code of the three kernels (called directly: a
# dispatch mode does not see inside the custom ops; the interpreter's own copies are not ops).
from lingua.profiling import HostSyncs
table, rows, weights, grad_out = make_case(*TRITON_CASES[0])
with HostSyncs() as syncs:
    xe._launch_bag(table, rows, weights)
    xe._launch_table_grad(grad_out, table, rows, weights)
    xe._launch_score_grad(grad_out, table, rows, weights)
errors["host syncs"] = syncs.calls
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def interpreted_errors() -> dict:
    pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements.txt)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, failure_report(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [str(c) for c in TRITON_CASES])
@pytest.mark.parametrize("index_dtype", ["torch.int64", "torch.int32"])
def test_triton_matches_reference_under_interpreter(interpreted_errors, case, index_dtype):
    out_err, table_err, weights_err = interpreted_errors[f"{case} {index_dtype}"]
    assert out_err < 1e-5 and table_err < 1e-5 and weights_err < 1e-5, (out_err, table_err, weights_err)


@pytest.mark.parametrize("case", [str(c) for c in TRITON_CASES])
def test_triton_without_weights_grad_under_interpreter(interpreted_errors, case):
    out_err, table_err, no_weights_grad = interpreted_errors[f"{case} table only"]
    assert out_err < 1e-5 and table_err < 1e-5 and no_weights_grad == 0.0


def test_triton_bag_reads_nothing_back_from_the_device(interpreted_errors):
    """The table gradient's launch read three values back per memory layer per step (bincount,
    nonzero, the number of touched rows): each drains a GPU's queue."""
    assert interpreted_errors["host syncs"] == []


def test_triton_keeps_fp32_weights_with_a_bf16_table(interpreted_errors):
    """The bag rounded fp32 softmax weights to the table's bf16 and returned their gradient in
    bf16 (~4e-3 relative error). Now the gradient is fp32, accumulated in fp32."""
    out_dtype, grad_dtype, rel_err = interpreted_errors["bf16 table fp32 weights"]
    assert out_dtype == "torch.bfloat16" and grad_dtype == "torch.float32"
    assert rel_err < 1e-5, rel_err


def test_triton_table_grad_sums_duplicate_rows(interpreted_errors):
    dup_err, untouched, _ = interpreted_errors["duplicates by hand"]
    assert dup_err < 1e-5, dup_err
    assert untouched == 0.0  # rows nobody looked up get exactly zero


def test_triton_custom_ops_check_and_compile_without_graph_breaks(interpreted_errors):
    assert max(interpreted_errors["compiled"]) < 1e-5, interpreted_errors["compiled"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_a_hopper_gpu(dtype, tmp_path, monkeypatch):
    """The interpreter does not lower the kernels; this does, ahead of time, to sm_90 machine
    code (the wheel's own LLVM and ptxas, no GPU needed), so CI without a GPU catches kernels
    that would only fail to compile on one."""
    pytest.importorskip("triton", reason="triton is not installed")
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lingua.product_key.xformer_embeddingbag import BLOCK_K, BLOCK_P, _kernels

    kernels = _kernels()
    if kernels.interpreted:
        pytest.skip("TRITON_INTERPRET is set in this process")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    ptr = f"*{dtype}"
    wptr = "*fp32"  # the softmax weights and their gradient stay fp32 with a bf16 table too
    specs = {
        "forward": ({"table": ptr, "rows": "*i64", "weights": wptr, "out": ptr, "K": "i32", "D": "i32",
                     "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"}, {"BLOCK_K": BLOCK_K, "BLOCK_D": 256}),
        "table_grad": ({"grad_out": ptr, "weights": wptr, "pairs": "*i64", "touched": "*i64", "starts": "*i64",
                        "counts": "*i64", "grad_table": ptr, "K": "i32", "D": "i32", "BLOCK_P": "constexpr",
                        "BLOCK_D": "constexpr"}, {"BLOCK_P": BLOCK_P, "BLOCK_D": 128}),
        "score_grad": ({"table": ptr, "rows": "*i32", "grad_out": ptr, "grad_w": wptr, "K": "i32", "D": "i32",
                        "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"}, {"BLOCK_K": BLOCK_K, "BLOCK_D": 128}),
    }
    for name, (signature, constexprs) in specs.items():
        index = {arg: (i,) for i, arg in enumerate(signature)}
        source = ASTSource(getattr(kernels, name), signature, constexprs={index[c]: v for c, v in constexprs.items()})
        compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name


def test_triton_refuses_cpu_tensors_without_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    table, rows, weights, _ = make_case(8, 16, 2, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_weighted_bag(table, rows, weights)


# ---------------------------------------------------------------------------------------
# Reverse indices (the CSR the Triton table gradient walks): duplicates are kept
# ---------------------------------------------------------------------------------------


def test_reverse_indices_list_every_lookup_once_including_duplicates():
    rows = torch.tensor([[5, 5, 2, 5], [5, 0, 0, 9]])
    touched, starts, counts, pairs = reverse_indices(rows, 12)
    assert len(touched) == len(starts) == len(counts) == 8  # min(N * K, rows): sized without a host read
    assert counts.tolist() == [4, 2, 1, 1, 0, 0, 0, 0]  # empty slots last
    touched, starts, counts = touched[:4], starts[:4], counts[:4]
    assert touched.tolist() == [5, 0, 2, 9]  # most looked-up first; ties by row
    assert sorted(pairs.tolist()) == list(range(rows.numel()))
    flat = rows.flatten()
    for row, start, count in zip(touched.tolist(), starts.tolist(), counts.tolist()):
        mine = pairs[start:start + count]
        assert (flat[mine] == row).all()
        assert mine.tolist() == sorted(mine.tolist())  # stable: a fixed accumulation order
    assert int(counts.sum()) == rows.numel()
    # More lookups than rows: one slot per row, every row touched.
    touched, _, counts, _ = reverse_indices(torch.tensor([[1, 0, 2], [2, 2, 1]]), 3)
    assert touched.tolist() == [2, 1, 0] and counts.tolist() == [3, 2, 1]


def test_reverse_indices_read_nothing_back_from_the_device():
    from lingua.profiling import HostSyncs

    rows = torch.randint(0, 50, (64, 8))
    with HostSyncs() as syncs:
        reverse_indices(rows, 50)
    assert syncs.calls == [], syncs.calls


# ---------------------------------------------------------------------------------------
# The CPU path (ATen bag + compiled score gradient)
# ---------------------------------------------------------------------------------------


def test_cpu_matches_reference():
    table, rows, weights, grad_out = make_case(64, 96, 8, 12)
    ref = run_bag(reference_weighted_bag, table, rows, weights, grad_out)
    got = run_bag(cpu_weighted_bag, table, rows, weights, grad_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cpu_without_weights_grad_or_table_grad():
    table, rows, weights, grad_out = make_case(64, 96, 8, 12)
    ref = run_bag(reference_weighted_bag, table, rows, weights, grad_out)
    out, table_grad, weights_grad = run_bag(cpu_weighted_bag, table, rows, weights, grad_out, weights_grad=False)
    assert weights_grad is None
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(table_grad, ref[1])
    out, table_grad, weights_grad = run_bag(cpu_weighted_bag, table, rows, weights, grad_out, table_grad=False)
    assert table_grad is None
    torch.testing.assert_close(weights_grad, ref[2], atol=1e-5, rtol=1e-5)


def test_cpu_table_grad_sums_duplicate_rows():
    table = torch.randn(10, 64)
    rows = torch.tensor([[7, 7, 2, 7], [7, 1, 1, 0]])
    weights = torch.tensor([[0.5, 0.25, 1.0, 2.0], [4.0, 1.0, 1.0, 1.0]])
    grad_out = torch.randn(2, 64)
    _, table_grad, _ = run_bag(cpu_weighted_bag, table, rows, weights, grad_out)
    torch.testing.assert_close(table_grad[7], 2.75 * grad_out[0] + 4.0 * grad_out[1])
    assert table_grad[3:7].abs().max() == 0


def test_cpu_no_grad_retain_graph_and_two_calls():
    table, rows, weights, grad_out = make_case(64, 96, 8, 12)
    table, weights = table.requires_grad_(), weights.requires_grad_()
    with torch.no_grad():
        assert cpu_weighted_bag(table, rows, weights).grad_fn is None

    # backward twice through one graph accumulates twice the gradients
    out = cpu_weighted_bag(table, rows, weights)
    out.backward(grad_out, retain_graph=True)
    once = (table.grad.clone(), weights.grad.clone())
    out.backward(grad_out)
    torch.testing.assert_close(table.grad, 2 * once[0])
    torch.testing.assert_close(weights.grad, 2 * once[1])

    # two bags over one (shared) table in one graph: the gradients add
    table.grad = weights.grad = None
    (cpu_weighted_bag(table, rows, weights) + cpu_weighted_bag(table, rows, weights)).backward(grad_out)
    torch.testing.assert_close(table.grad, 2 * once[0])
    torch.testing.assert_close(weights.grad, 2 * once[1])

    # the result is an ordinary tensor: in-place use is allowed, as with F.embedding_bag
    out = cpu_weighted_bag(table, rows, weights)
    out.mul_(2)
    out.sum().backward()


def test_cpu_gradcheck_float64():
    table, rows, weights, _ = make_case(12, 5, 3, 4, dtype=torch.float64)
    table.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w: cpu_weighted_bag(t, rows, w), (table, weights))


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------


def test_weighted_bag_dispatch_casts_weights_and_checks_arguments():
    table, rows, weights, _ = make_case(32, 16, 4, 5)
    ref = reference_weighted_bag(table, rows, weights)
    for impl in ("auto", "cpu", "reference"):
        torch.testing.assert_close(weighted_bag(table, rows, weights.double(), impl=impl), ref)
    assert weighted_bag(table.bfloat16(), rows, weights).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="impl"):
        weighted_bag(table, rows, weights, impl="fast")
    with pytest.raises(ValueError, match="rows, weights"):
        weighted_bag(table, rows, weights[:, :2])


# ---------------------------------------------------------------------------------------
# The real Triton path on a GPU
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("width", [256, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_matches_reference(width, dtype):
    table, rows, weights, grad_out = (t.cuda() for t in make_case(4096, width, 512, 128))
    table, weights, grad_out = table.to(dtype), weights.to(dtype), grad_out.to(dtype)
    # The reference in fp32 (ATen's bf16 bag accumulates in bf16); ours accumulates in fp32.
    ref = run_bag(reference_weighted_bag, table.float(), rows, weights.float(), grad_out.float())
    got = run_bag(weighted_bag, table, rows, weights, grad_out)  # dispatches to Triton on CUDA
    assert got[0].dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol)
