"""Auxiliary losses on product-key sub-key usage (load balance, auxiliary, z-loss): each term
by hand and against an independent implementation (values and gradients), off means free,
activation checkpointing changes nothing, and 2 gloo ranks under FSDP / TP / memory
parallelism give one process's values and gradients on the whole batch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from apps.main.transformer import LMTransformerArgs, build_model
from lingua.product_key.memory import (
    ProductKeyArgs,
    ProductKeyMemory,
    aux_terms,
    auxiliary_losses,
    subkey_stats,
)
from tests.conftest import ROOT, failure_report

COEFS = dict(load_balance_coef=0.7, auxiliary_coef=3.0, z_loss_coef=0.05)
OFF = dict(load_balance_coef=0.0, auxiliary_coef=0.0, z_loss_coef=0.0)


def model_args(qk_norm: bool = True, **coefs) -> LMTransformerArgs:
    pk = ProductKeyArgs(is_enabled=True, layers="0,2", mem_n_keys=8, mem_heads=2, mem_knn=3, mem_k_dim=16,
                        qk_norm=qk_norm, **coefs)
    return LMTransformerArgs(dim=32, n_layers=3, n_heads=2, vocab_size=64, max_seqlen=16, seed=3, productkey_args=pk)


def tokens(batch: int = 3, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(11))


def memories(model) -> list[ProductKeyMemory]:
    return [m for m in model.modules() if isinstance(m, ProductKeyMemory)]


# ---------------------------------------------------------------- definitions


def test_each_term_on_a_hand_computed_example() -> None:
    """One head, C = 2 sub-keys, knn = 1, two tokens. Half 0: scores [ln 3, 0] and [0, ln 3]
    (softmax 3/4, 1/4 and its mirror; each token picks another key). Half 1: [ln 3, 0] twice
    (both pick key 0). Every logsumexp is ln(3 + 1) = ln 4.
      load balance: half 0 2 * (1/2 * 1/2 + 1/2 * 1/2) = 1; half 1 2 * (1 * 3/4 + 0) = 3/2; mean 5/4
      auxiliary:    half 0 0;                              half 1 (1/2)^2 + (1/2)^2 = 1/2; mean 1/4
      z-loss:       (ln 4)^2"""
    ln3 = math.log(3.0)
    sub = torch.tensor([[[[ln3, 0.0], [ln3, 0.0]]],
                        [[[0.0, ln3], [ln3, 0.0]]]])  # [N=2, H=1, half=2, C=2]
    idx = sub.topk(1, dim=-1).indices
    args = ProductKeyArgs(load_balance_coef=2.0, auxiliary_coef=3.0, z_loss_coef=0.5)
    terms = aux_terms(subkey_stats(sub, idx, args), args, knn=1)
    assert terms.keys() == {"pk_load_balance", "pk_auxiliary", "pk_z_loss"}
    assert terms["pk_load_balance"].item() == pytest.approx(2.0 * 1.25, rel=1e-6)
    assert terms["pk_auxiliary"].item() == pytest.approx(3.0 * 0.25, rel=1e-6)
    assert terms["pk_z_loss"].item() == pytest.approx(0.5 * math.log(4.0) ** 2, rel=1e-6)
    # Each coefficient turns on its term only.
    only_z = ProductKeyArgs(z_loss_coef=1.0)
    assert aux_terms(subkey_stats(sub, idx, only_z), only_z, knn=1).keys() == {"pk_z_loss"}


def independent_terms(memory: ProductKeyMemory, x: torch.Tensor, args: ProductKeyArgs) -> dict[str, torch.Tensor]:
    """The terms written out per head and half from the layer's input x [N, dim]: a matmul per
    (head, half), selection by a full sort, usage counted with one-hot rows, logsumexp as
    log-sum-exp; then means over heads and halves."""
    n_keys, knn, half = memory.n_keys, memory.knn, memory.half
    q = memory.query_proj(x).view(x.shape[0], memory.heads, 2, half)
    lb, aux, z = [], [], []
    for h in range(memory.heads):
        for j in range(2):
            qh, kh = q[:, h, j], memory.keys[h, j]
            if memory.qk_norm:
                qh, kh = F.rms_norm(qh, (half,)), F.rms_norm(kh, (half,))
            s = qh @ kh.T  # [N, C]
            chosen = s.argsort(dim=-1, descending=True)[:, :knn]
            f = F.one_hot(chosen, n_keys).sum((0, 1)).float() / (x.shape[0] * knn)
            p = s.softmax(-1).mean(0)
            lb.append(n_keys * (f * p).sum())
            aux.append(((f - 1 / n_keys) ** 2).sum())
            z.append((s.exp().sum(-1).log() ** 2).mean())
    return {"pk_load_balance": args.load_balance_coef * torch.stack(lb).mean(),
            "pk_auxiliary": args.auxiliary_coef * torch.stack(aux).mean(),
            "pk_z_loss": args.z_loss_coef * torch.stack(z).mean()}


@pytest.mark.parametrize("qk_norm", [True, False])
def test_terms_and_gradients_match_an_independent_implementation(qk_norm: bool) -> None:
    """Two memory layers: the model's terms are the sums of both layers' terms computed
    independently from the inputs the layers saw, and so are their gradients."""
    model = build_model(model_args(qk_norm, **COEFS)).train()
    inputs = []
    for m in memories(model):
        m.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0].reshape(-1, module.dim))))
    model(tokens())
    terms = auxiliary_losses(model)
    ref: dict[str, torch.Tensor] = {}
    for module, x in inputs:
        for name, value in independent_terms(module, x, module.args).items():
            ref[name] = ref.get(name, 0) + value
    assert terms.keys() == ref.keys()
    params = [p for p in model.parameters()]
    for name in terms:
        torch.testing.assert_close(terms[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda s: f"{name}: {s}")
    for name in ("pk_load_balance", "pk_z_loss"):
        got = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref[name], params, retain_graph=True, allow_unused=True)
        names = [n for n, _ in model.named_parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in got), name
        for pname, g, w in zip(names, got, want):
            assert (g is None) == (w is None), pname
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda s: f"{name} / {pname}: {s}")
    # f counts hard selections: the auxiliary term has no gradient (as documented).
    zero = torch.autograd.grad(terms["pk_auxiliary"], params, allow_unused=True)
    assert all(g is None or not g.any() for g in zero)


def test_bad_coefficients_name_the_key() -> None:
    for key in COEFS:
        with pytest.raises(ValueError, match=key):
            ProductKeyMemory(32, ProductKeyArgs(mem_n_keys=8, mem_knn=2, mem_k_dim=16, **{key: -0.1}))


# ---------------------------------------------------------------- off means free


class OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def forward_ops(model) -> Counter:
    with OpCounts() as counts:
        model(tokens(), target=tokens())
    return counts.ops


def test_zero_coefficients_add_no_work_and_no_terms() -> None:
    off = build_model(model_args(**OFF)).train()
    on = build_model(model_args(**COEFS)).train()
    ops_off, ops_on = forward_ops(off), forward_ops(on)
    # Off, the forward runs no op the terms need: one softmax per layer (over the knn scores),
    # one index_add per layer (the row-hit count), no logsumexp; and keeps nothing.
    assert ops_off["aten._softmax"] == 2 and ops_off["aten.index_add_"] == 2
    assert ops_off["aten.logsumexp"] == 0
    assert ops_off < ops_on  # the same ops as on, minus the terms' own
    assert all(m.aux_stats is None for m in memories(off))
    assert auxiliary_losses(off) == {}


def test_terms_read_nothing_back_from_the_device() -> None:
    """A read (or a data-dependent shape, as bincount's) would make the host wait for the GPU
    every micro-batch; counted by op on CPU."""
    from lingua.profiling import HostSyncs

    model = build_model(model_args(**COEFS)).train()
    with HostSyncs() as syncs:
        loss = model(tokens(), target=tokens())
        (loss + sum(auxiliary_losses(model).values())).backward()
    assert syncs.calls == [], syncs.calls


def test_terms_come_from_training_forwards_and_are_taken_once() -> None:
    model = build_model(model_args(**COEFS))
    model.eval()
    model(tokens())
    assert auxiliary_losses(model) == {}  # evaluation measures nothing
    model.train()
    model(tokens())
    first = auxiliary_losses(model)
    assert first.keys() == {"pk_load_balance", "pk_auxiliary", "pk_z_loss"}
    # Taken: a second call would otherwise add a stale micro-batch's terms again.
    assert auxiliary_losses(model) == {}


def test_activation_checkpointing_gives_the_same_terms_and_gradients_and_keeps_nothing() -> None:
    """The recomputation in backward runs the same ops (checkpointing checks the tensors it
    saves) but must not leave its copy of the sums behind, holding the recomputed graph."""
    results = []
    for checkpointing in (False, True):
        model = build_model(model_args(**COEFS)).train()
        for block in model.layers:
            block.activation_checkpointing = checkpointing
        loss = model(tokens(), target=tokens())
        terms = auxiliary_losses(model)
        (loss + sum(terms.values())).backward()
        assert all(m.aux_stats is None for m in memories(model))
        results.append(({k: v.item() for k, v in terms.items()}, {n: p.grad for n, p in model.named_parameters()}))
    (plain_terms, plain_grads), (ckpt_terms, ckpt_grads) = results
    assert plain_terms == ckpt_terms
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- data parallel

WORKER = str(ROOT / "tests" / "pk_aux_worker.py")


def run_worker(out: Path, *overrides: str, nproc: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, WORKER, str(out), *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_report(proc)
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run_worker(tmp_path_factory.mktemp("single") / "out.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [
    ["dp_shard=2"],
    ["dp_shard=2", "fsdp_type=full_shard", "selective_activation_checkpointing=true"],
    ["dp_replicate=2"],
    ["tp_size=2"],
    ["dp_shard=2", "memory_parallel_size=2"],
], ids=["fsdp", "fsdp_full_shard_sac", "replicate", "tp", "memory_parallel"])
def test_two_ranks_give_one_process_terms_and_gradients(single, tmp_path, layout) -> None:
    """Each data-parallel rank holds half of every micro-batch (TP peers hold the same one):
    the terms of each micro-batch, the step's gradients (after FSDP's reduction) and the terms'
    own gradients equal one process's on the whole batch. Without the all-reduce each rank's
    terms are those of its half; with the wrong scale on the terms the gradients are off by dp.
    With every coefficient 0 the same layout issues no collective."""
    got = run_worker(tmp_path / "out.pt", *layout, nproc=2)
    assert got["dp_size"] == (1 if "tp_size=2" in layout else 2)
    assert len(got["terms"]) == len(single["terms"]) == 2
    for step, (want, have) in enumerate(zip(single["terms"], got["terms"])):
        assert have.keys() == want.keys() == {"pk_load_balance", "pk_auxiliary", "pk_z_loss"}
        for name in want:
            assert have[name] == pytest.approx(want[name], rel=1e-5), f"micro-batch {step}: {name}"
    for key in ("grads", "aux_grads"):
        assert got[key].keys() == single[key].keys()
        for name, want in single[key].items():
            diff = (got[key][name] - want).abs().max().item()
            assert diff < 1e-5, f"{key} of {name} differs by {diff} (max {want.abs().max().item()})"
    # The terms' gradient is real: it reaches the memory's query and sub-keys.
    assert single["aux_grads"]["layers.0.feed_forward.keys"].abs().max() > 1e-3
    assert single["aux_grads"]["layers.1.feed_forward.query_proj.weight"].abs().max() > 1e-3
    # All coefficients 0: no terms, and not one collective (a rank would otherwise wait for it).
    assert got["off_terms"] == {} and got["off_collectives"] == 0


def test_a_segment_model_s_terms_cover_every_segment() -> None:
    """With model.segment_length each memory layer runs once per segment: the terms are over
    all of the window's tokens (the last segment's alone before: 14 of 62 tokens)."""
    args = model_args(**COEFS)
    args.segment_length, args.bos_id = 4, 1
    model = build_model(args)
    model.train()
    seen: dict[int, list] = {}
    for m in memories(model):
        search = m._search

        def recording(x, search=search, m=m):
            out = search(x)
            seen.setdefault(id(m), []).append((out[2].detach(), out[3]))
            return out
        m._search = recording
    x = tokens(seq=16)
    model(x, target=x)
    got = auxiliary_losses(model)
    expected: dict[str, torch.Tensor] = {}
    for m in memories(model):
        sub = torch.cat([s for s, _ in seen[id(m)]])
        idx = torch.cat([i for _, i in seen[id(m)]])
        assert len(seen[id(m)]) == 4 and sub.shape[0] == x.numel()
        for name, value in aux_terms(subkey_stats(sub, idx, m.args), m.args, m.knn).items():
            expected[name] = expected.get(name, 0) + value
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name
    model(x, target=x)  # a call whose terms nobody takes: the next call's terms are its own
    model(x, target=x)
    again = auxiliary_losses(model)
    assert all(torch.allclose(again[n], got[n], rtol=1e-5) for n in got)
