"""Product-key memory: exact search, agreement with a naive dense memory (outputs and
gradients), initialisation (meta device included), shared values, optimizer groups through a
checkpoint, FLOP accounting, usage statistics, and a short training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apps.main.transformer import LMTransformerArgs, build_model
from torch.distributed.checkpoint import FileSystemReader

from lingua.checkpoint import CheckpointArgs, CheckpointManager
from lingua.optim import OptimArgs, build_optimizer
from lingua.product_key.memory import ProductKeyArgs, ProductKeyMemory, product_key_topk
from lingua.transformer import ParamInit
from tests.conftest import failure_report, read_losses, run_module, tiny_overrides

def pk_args(**kw) -> ProductKeyArgs:
    base = dict(is_enabled=True, layers="1", mem_n_keys=16, mem_heads=2, mem_knn=4, mem_k_dim=16)
    base.update(kw)
    return ProductKeyArgs(**base)


def memory(dim: int = 24, seed: int = 0, **kw) -> ProductKeyMemory:
    m = ProductKeyMemory(dim, pk_args(**kw))
    m.reset_parameters(ParamInit(seed), init_std=dim**-0.5, factor=1.0)
    return m


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("n_keys, knn, heads", [(8, 3, 1), (16, 4, 2), (32, 8, 4)])
def test_product_key_search_is_the_exact_topk_over_all_keys(n_keys: int, knn: int, heads: int) -> None:
    gen = torch.Generator().manual_seed(n_keys)
    n, d = 50, 6
    q1, q2 = torch.randn(n, heads, d, generator=gen), torch.randn(n, heads, d, generator=gen)
    k1, k2 = torch.randn(heads, n_keys, d, generator=gen), torch.randn(heads, n_keys, d, generator=gen)
    scores, rows = product_key_topk(q1, q2, k1, k2, knn)
    # Exhaustive: every one of the n_keys^2 product keys (k1[i] ++ k2[j]) scored.
    full = (torch.einsum("nhd,hkd->nhk", q1, k1).unsqueeze(-1)
            + torch.einsum("nhd,hkd->nhk", q2, k2).unsqueeze(-2)).flatten(-2)
    ref_scores, ref_rows = full.topk(knn, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(rows, ref_rows)  # random floats: no ties


# ---------------------------------------------------------------- against a dense memory


def dense_memory(m: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The same layer written naively: all n_keys^2 scores, top-k, softmax, a dense [N, rows]
    weight matrix times the whole value table."""
    x2 = x.reshape(-1, m.dim)
    q = m.query_proj(x2).view(-1, m.heads, 2, m.half)
    keys = m.keys
    if m.qk_norm:
        q, keys = F.rms_norm(q, (m.half,)), F.rms_norm(keys, (m.half,))
    full = (torch.einsum("nhd,hkd->nhk", q[:, :, 0], keys[:, 0]).unsqueeze(-1)
            + torch.einsum("nhd,hkd->nhk", q[:, :, 1], keys[:, 1]).unsqueeze(-2)).flatten(-2)
    top, rows = full.topk(m.knn, dim=-1)
    dense = torch.zeros(x2.shape[0], m.n_keys**2).scatter_add(
        1, rows.flatten(1), F.softmax(top, dim=-1).flatten(1))
    if m.args.peer_variant:
        act = F.gelu(x2 @ m.values.down.T)  # every expert, then keep the chosen ones
        out = (dense * act) @ m.values.weight
    else:
        out = dense @ m.values.weight
        if m.swilu_w1 is not None:
            out = m.swilu_w2(out * F.silu(m.swilu_w1(x2)))
        elif m.value_proj is not None:
            out = m.value_proj(out)
    if m.gate is not None:
        out = out * torch.sigmoid(m.gate(x2))
    return out.view(x.shape)


@pytest.mark.parametrize("variant", [
    dict(swilu_projection=True),
    dict(swilu_projection=False, qk_norm=False),
    dict(swilu_projection=False, mem_v_dim=12, qk_norm=True),
    dict(swilu_projection=True, mem_gated=True),
    dict(swilu_projection=False, peer_variant=True),
])
def test_memory_output_and_gradients_match_a_dense_implementation(variant: dict) -> None:
    m = memory(**variant).train()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = m(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *m.parameters()])
    ref = dense_memory(m, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda s: f"{name}: {s}")
    assert grads[names.index("values.weight")].abs().sum() > 0


def test_qk_norm_defaults_on_for_memory_plus_only() -> None:
    assert memory(swilu_projection=True).qk_norm and not memory(swilu_projection=False).qk_norm
    assert memory(swilu_projection=False, qk_norm=True).qk_norm


@pytest.mark.parametrize("bad, key", [
    (dict(mem_k_dim=15), "mem_k_dim"), (dict(mem_knn=40), "mem_knn"), (dict(mem_heads=0), "mem_heads"),
    (dict(peer_variant=True, mem_v_dim=8), "peer_variant"),
])
def test_bad_memory_config_names_the_key(bad: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        memory(**bad)


# ---------------------------------------------------------------- inside the model


def model_args(**pk) -> LMTransformerArgs:
    return LMTransformerArgs(dim=32, n_layers=3, n_heads=2, vocab_size=64, max_seqlen=16, seed=5,
                             productkey_args=pk_args(layers="0,2", **pk))


@pytest.mark.parametrize("layers, message", [("3", "outside"), ("a,b", "comma-separated"), ("", "empty")])
def test_bad_layers_are_refused(layers: str, message: str) -> None:
    args = model_args()
    args.productkey_args.layers = layers
    with pytest.raises(ValueError, match=message):
        build_model(args)


def test_meta_device_build_initialises_every_parameter_like_a_cpu_build() -> None:
    for gated in (False, True):
        args = model_args(mem_gated=gated, swilu_projection=not gated, mem_share_values=False)
        on_cpu = build_model(args)
        meta = build_model(args, "meta")
        meta.to_empty(device="cpu")
        with torch.no_grad():
            torch.nn.init.constant_(meta.layers[0].feed_forward.query_proj.bias, float("nan"))  # garbage
            meta.reset_parameters(ParamInit(args.seed))
        for (name, a), (_, b) in zip(on_cpu.named_parameters(), meta.named_parameters()):
            assert torch.isfinite(b).all(), name
            assert torch.equal(a, b), name
        biases = [n for n, _ in meta.named_parameters() if n.endswith("bias")]
        assert biases and all(meta.get_parameter(n).abs().max() == 0 for n in biases)


def test_shared_values_are_one_tensor_saved_once(tmp_path: Path) -> None:
    model = build_model(model_args(mem_share_values=True))
    mems = [b.feed_forward for b in model.layers if isinstance(b.feed_forward, ProductKeyMemory)]
    assert len(mems) == 2 and mems[0].values is mems[1].values is model.memory_values
    table = [n for n in model.state_dict() if "values" in n]
    assert table == ["memory_values.weight"]
    ckpt = CheckpointManager(CheckpointArgs(), tmp_path)
    optimizer, _ = build_optimizer(model, OptimArgs(), 10)
    ckpt.save(model, optimizer, {"step": 1}, {}, step=1)
    meta = FileSystemReader(str(ckpt.latest())).read_metadata()
    stored = [k for k in meta.state_dict_metadata if "values" in k and not k.startswith("optim")]
    assert stored == ["model.memory_values.weight"], stored

    unshared = build_model(model_args(mem_share_values=False))
    assert sorted(n for n in unshared.state_dict() if "values" in n) == [
        "layers.0.feed_forward.values.weight", "layers.2.feed_forward.values.weight"]


@pytest.mark.parametrize("shared", [True, False])
def test_value_tables_get_their_lr_and_no_decay_also_after_loading_a_checkpoint(tmp_path: Path, shared: bool) -> None:
    args = model_args(mem_share_values=shared, value_fixed_lr=1e-3)
    optim = OptimArgs(lr=3e-3, weight_decay=0.1, warmup=0, scheduler="constant")

    def value_ids(model) -> set[int]:
        return {id(p) for n, p in model.named_parameters() if n.endswith("values.weight")}

    def value_groups(optimizer, model) -> list[tuple[float, float]]:
        ids = value_ids(model)
        groups = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
        assert all(id(p) in ids for g in groups for p in g["params"])  # tables only
        return sorted({(g["lr"], g["weight_decay"]) for g in groups})

    model = build_model(args)
    optimizer, scheduler = build_optimizer(model, optim, 10)
    assert value_groups(optimizer, model) == [(1e-3, 0.0)]
    others = [g for g in optimizer.param_groups if not any(id(p) in value_ids(model) for p in g["params"])]
    assert {(g["lr"], g["weight_decay"]) for g in others} == {(3e-3, 0.1)}
    x = torch.randint(0, 64, (2, 16))
    model(x, target=x).backward()
    optimizer.step()
    scheduler.step()
    ckpt = CheckpointManager(CheckpointArgs(), tmp_path)
    ckpt.save(model, optimizer, {"step": 1}, {}, step=1)

    resumed = build_model(args)
    opt2, _ = build_optimizer(resumed, optim, 10)
    ckpt.load(ckpt.latest(), resumed, opt2)
    assert value_groups(opt2, resumed) == [(1e-3, 0.0)]
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_flops_count_the_rows_a_token_reads_not_the_table() -> None:
    small = build_model(model_args(mem_n_keys=16))
    big = build_model(model_args(mem_n_keys=64), "meta")
    big.to_empty(device="cpu")  # as training builds it: new parameter objects
    # 16x the value rows, but a token still reads heads * knn rows per memory layer: only the
    # sub-keys grow (2 layers x heads 2 x 2 halves x 48 more keys x k_dim/2 = 8).
    keys_growth = 2 * 2 * 2 * (64 - 16) * 8
    assert big.num_matmul_params() - small.num_matmul_params() == keys_growth
    table = 64**2 * 32
    assert sum(p.numel() for p in big.parameters()) > table > big.num_matmul_params() / 4


def test_usage_stats_count_rows_hit_in_the_window() -> None:
    m = memory(mem_n_keys=8, mem_knn=2, mem_heads=1).train()
    assert m.usage_stats() == {}
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(3))
    _, rows = m.search(x)
    m(x)
    stats = m.usage_stats()
    counts = torch.bincount(rows.flatten(), minlength=64).double()
    p = counts / counts.sum()
    assert stats["hit_fraction"] == pytest.approx(float((counts > 0).double().mean()))
    assert stats["top_row_share"] == pytest.approx(float(p.max()))
    nz = p[p > 0]
    assert stats["kl_uniform"] == pytest.approx(float((nz * (nz * 64).log()).sum()))
    assert m.usage_stats() == {}  # reset after reading
    m.eval()
    m(x)
    assert m.usage_stats() == {}  # evaluation does not count


def test_tiny_pk_model_trains_and_logs_memory_statistics(corpus: Path, tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    pk = {"model.productkey_args.is_enabled": "true", "model.productkey_args.layers": "1",
          "model.productkey_args.mem_n_keys": 16, "model.productkey_args.mem_heads": 2,
          "model.productkey_args.mem_knn": 4, "model.productkey_args.mem_k_dim": 16}
    res = run_module("apps.main.train", tiny_overrides(corpus, dump, steps=16, **pk))
    assert res.returncode == 0, failure_report(res)
    losses = read_losses(dump)
    assert losses[16] < losses[1]
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    stats = {k: v for k, v in rows[-1].items() if k.startswith("memory/layers.1/")}
    assert set(stats) == {"memory/layers.1/hit_fraction", "memory/layers.1/kl_uniform",
                          "memory/layers.1/top_row_share"}
    assert 0 < stats["memory/layers.1/hit_fraction"] <= 1 and math.isfinite(stats["memory/layers.1/kl_uniform"])


@pytest.mark.parametrize("size, dense_params", [("373m", 373e6), ("1.3b", 1.36e9)])
def test_paper_configs_are_dense_and_memory_twins(size: str, dense_params: float) -> None:
    """The paper-scale twins load, have the stated size, and differ only by the memory: the
    Memory+ model adds the 1M-row shared pool as parameters but not as FLOPs per token."""
    from apps.main.train import TrainArgs
    from apps.main.transformer import LMTransformer
    from lingua.args import load_config

    models = {}
    for kind in ("dense", "memplus"):
        args = load_config(TrainArgs, [f"config=apps/main/configs/{kind}_{size}.yaml", "model.vocab_size=32000"])
        with torch.device("meta"):
            models[kind] = (LMTransformer(args.model), args)
    (dense, dargs), (mem, margs) = models["dense"], models["memplus"]
    n_dense = sum(p.numel() for p in dense.parameters())
    assert abs(n_dense - dense_params) / dense_params < 0.01
    assert mem.memory_layers == [4, 12, 20] and mem.memory_values.weight.shape == (1024**2, dargs.model.dim)
    # Parameters: the dense model, minus the three FFNs, plus three memories' own weights and one pool.
    ffn = sum(p.numel() for i in mem.memory_layers for p in dense.layers[i].feed_forward.parameters())
    own = sum(p.numel() for i in mem.memory_layers for p in mem.layers[i].feed_forward.parameters())
    assert sum(p.numel() for p in mem.parameters()) == n_dense - ffn + own + 1024**2 * dargs.model.dim
    ratio = mem.flops_per_token(margs.data.seq_len) / dense.flops_per_token(dargs.data.seq_len)
    assert 0.9 < ratio <= 1.0
    # Same training recipe apart from the memory.
    assert dargs.optim == margs.optim and dargs.data == margs.data and dargs.steps == margs.steps


def test_product_key_scores_stay_fp32_under_autocast():
    """bf16 scores under autocast changed the top-32 rows of most (token, head) pairs."""
    g = torch.Generator().manual_seed(0)
    q1, q2 = torch.randn(64, 4, 32, generator=g), torch.randn(64, 4, 32, generator=g)
    k1, k2 = torch.randn(4, 128, 32, generator=g), torch.randn(4, 128, 32, generator=g)
    scores, rows = product_key_topk(q1, q2, k1, k2, knn=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_scores, cast_rows = product_key_topk(q1, q2, k1, k2, knn=32)
    assert cast_scores.dtype == torch.float32
    assert torch.equal(cast_rows, rows) and torch.equal(cast_scores, scores)
