"""Manifold-constrained hyper-connections: Sinkhorn-Knopp, equivalence with the plain pre-norm
model at initialisation and for one stream, gradients, Amax gains, training, FSDP, SAC, compile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from apps.main.transformer import LMTransformerArgs, build_model
from lingua.mhc import HyperConnection, MHCArgs, amax_gains, amax_stats, composite, sinkhorn_knopp
from tests.conftest import failure_report, decode_step_by_step, read_losses, run_module, tiny_overrides


def tiny_args(**mhc) -> LMTransformerArgs:
    return LMTransformerArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, max_seqlen=16, seed=7,
                             mhc=MHCArgs(**mhc))


def tokens(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))


# ---- Sinkhorn-Knopp ----------------------------------------------------------------------

def test_sinkhorn_rows_and_columns_sum_to_one():
    g = torch.Generator().manual_seed(0)
    typical = torch.randn(4096, 4, 4, generator=g)
    # Large logits: exp() of these overflows fp32 (e^89 > 3.4e38) without the shift to the max.
    large = torch.randn(4096, 4, 4, generator=g) + torch.tensor([90.0, 1000.0]).repeat(2048)[:, None, None]
    for logits in (typical, large, typical.bfloat16()):
        h = sinkhorn_knopp(logits, 20)
        assert h.dtype == torch.float32 and torch.isfinite(h).all() and (h >= 0).all()
        assert (h.sum(-1) - 1).abs().max() < 1e-3
        assert (h.sum(-2) - 1).abs().max() < 1e-3
    # Widely spread logits converge slowly (a known property of Sinkhorn-Knopp: 20 iterations
    # leave columns off by up to ~0.4 at std 10); the last step normalises rows, so they are
    # exact, nothing is NaN, and more iterations close the gap.
    spread = torch.randn(512, 4, 4, generator=g) * 10
    h20, h2000 = sinkhorn_knopp(spread, 20), sinkhorn_knopp(spread, 2000)
    assert torch.isfinite(h20).all() and (h20.sum(-1) - 1).abs().max() < 1e-5
    assert (h2000.sum(-2) - 1).abs().max() < 1e-3 < (h20.sum(-2) - 1).abs().max()


def test_sinkhorn_gradients_stay_finite_for_widely_spread_logits():
    # Formulations that carry the row and column scale vectors instead of the matrix produce the
    # same forward but overflow in backward here (the reciprocal's derivative squares scales of
    # up to e^60): normalising the matrix itself keeps every intermediate in [0, 1].
    g = torch.Generator().manual_seed(0)
    for std in (1.0, 30.0, 1000.0):
        logits = (torch.randn(256, 4, 4, generator=g) * std).requires_grad_()
        weights = torch.randn(256, 4, 4, generator=g)
        (grad,) = torch.autograd.grad((sinkhorn_knopp(logits, 20) * weights).sum(), logits)
        assert torch.isfinite(grad).all(), std


def test_sinkhorn_gradient_is_autograd_through_the_iterations():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: sinkhorn_knopp(z, 5), (logits,))
    # A loss that depends only on a column sum's deviation has a non-zero gradient: the backward
    # sees every normalisation, not just the last one.
    z = torch.randn(4, 4, requires_grad=True)
    (sinkhorn_knopp(z, 3).sum(0) ** 2).sum().backward()
    assert z.grad.abs().sum() > 0


# ---- Equivalence with the plain model -------------------------------------------------------

@pytest.mark.parametrize("wrap", ["sublayer", "block"])
def test_at_initialisation_the_mhc_model_is_the_plain_prenorm_model(wrap):
    plain = build_model(tiny_args())
    mhc = build_model(tiny_args(enabled=True, n_streams=4, wrap=wrap))
    mhc.load_state_dict(plain.state_dict(), strict=False)  # same weights; mHC parameters keep their init
    x = tokens()
    # The blocks see four equal copies of the plain residual stream; their sum is 4x its value.
    emb = plain.tok_embeddings(x)
    torch.testing.assert_close(mhc.forward_blocks(emb) / 4, plain.forward_blocks(emb), atol=1e-5, rtol=1e-5)
    # After the final RMSNorm only its epsilon sees the factor 4.
    torch.testing.assert_close(mhc(x), plain(x), atol=1e-4, rtol=1e-4)


def test_one_stream_equals_the_plain_residual_model():
    plain = build_model(tiny_args())
    one = build_model(tiny_args(enabled=True, n_streams=1))
    one.load_state_dict(plain.state_dict(), strict=False)
    x, y = tokens(), tokens().roll(1, dims=1)
    torch.testing.assert_close(one(x), plain(x), atol=1e-5, rtol=1e-5)  # fp32 rounding of a different op order (logits ~1)
    l1, l2 = one(x, target=y), plain(x, target=y)
    l1.backward(), l2.backward()
    assert abs(l1.item() - l2.item()) < 1e-6
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dict(one.named_parameters())[name].grad, p.grad, atol=1e-6, rtol=1e-5)


def test_gradients_reach_phi_bias_and_alpha():
    model = build_model(tiny_args(enabled=True, n_streams=4))
    x, y = tokens(), tokens().roll(1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        model(x, target=y).backward()
        hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
        assert len(hcs) == 6
        for hc in hcs:
            assert hc.phi.grad.abs().sum() > 0 and hc.bias.grad.abs().sum() > 0
            # alpha scales x' phi, which is exactly 0 at initialisation (phi = 0); from the
            # first update on, its gradient flows too.
            if step == 1:
                assert (hc.alpha.grad.abs() > 0).all(), hc.alpha.grad
        opt.step()


def test_static_only_mhc_has_no_phi_and_still_trains_its_bias():
    model = build_model(tiny_args(enabled=True, dynamic=False))
    hc = model.layers[0].mhc_attention
    assert hc.phi is None
    model(tokens(), target=tokens()).backward()
    assert hc.bias.grad.abs().sum() > 0


def test_bad_mhc_config_names_the_key():
    with pytest.raises(ValueError, match="model.mhc.n_streams"):
        build_model(tiny_args(enabled=True, n_streams=0))


# ---- Amax ------------------------------------------------------------------------------------

def test_composite_amax_of_a_deep_stack_stays_below_two_only_when_constrained():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 4, generator=g) for _ in range(32)]
    constrained = composite(sinkhorn_knopp(z, 20) for z in logits)
    # Unconstrained hyper-connections: H_res = I + the same learned logits, scaled as the
    # dynamic part would be after some training.
    unconstrained = composite(torch.eye(4) + 0.1 * z for z in logits)
    fwd, bwd = amax_gains(constrained)
    assert fwd < 2 and bwd < 2 and abs(fwd - 1) < 1e-2
    assert max(amax_gains(unconstrained)) > 2


def test_model_amax_stats_after_a_forward():
    model = build_model(tiny_args(enabled=True))
    assert amax_stats(model.hyper_connections()) == {}
    model(tokens())
    stats = amax_stats(model.hyper_connections())
    assert {"amax_forward", "amax_backward", "composite_amax_forward", "composite_amax_backward",
            "layers.0.mhc_attention/amax_forward", "layers.2.mhc_feed_forward/amax_backward"} <= set(stats)
    assert all(abs(v - 1) < 1e-3 for v in stats.values())  # doubly stochastic at init


# ---- Training, FSDP, activation checkpointing, compile --------------------------------------

MHC = {"model.mhc.enabled": "true", "model.mhc.n_streams": 4}


def test_tiny_mhc_model_trains_and_logs_amax(corpus: Path, tmp_path: Path):
    dump = tmp_path / "dump"
    res = run_module("apps.main.train", tiny_overrides(corpus, dump, steps=16, **MHC))
    assert res.returncode == 0, failure_report(res)
    losses = read_losses(dump)
    assert losses[16] < losses[1]
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    amax = {k: v for k, v in rows[-1].items() if k.startswith("mhc/")}
    assert {"mhc/amax_forward", "mhc/amax_backward", "mhc/composite_amax_forward",
            "mhc/composite_amax_backward"} <= set(amax)
    assert all(0.5 < v < 2 and math.isfinite(v) for v in amax.values())


def test_mhc_under_activation_checkpointing_and_compile_matches_eager():
    from lingua.distributed import compile_blocks

    x, y = tokens(), tokens().roll(1, dims=1)
    results = []
    for mode in ("eager", "sac", "compile"):
        model = build_model(tiny_args(enabled=True))
        if mode == "sac":
            for block in model.layers:
                block.activation_checkpointing = True
        if mode == "compile":
            compile_blocks(model)
        loss = model(x, target=y)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), *others = results
    for loss, grads in others:
        assert abs(loss - ref_loss) < 1e-5
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4)


MHC_WORKER = ["model.mhc.enabled=true", "model.mhc.n_streams=4"]


@pytest.fixture(scope="module")
def single_mhc(tmp_path_factory) -> dict:
    from tests.test_distributed import run_worker

    return run_worker(tmp_path_factory.mktemp("single_mhc") / "out.pt", *MHC_WORKER)


@pytest.mark.parametrize("layout", ["distributed.dp_shard=2", "distributed.tp_size=2"], ids=["fsdp", "tp"])
def test_mhc_on_two_ranks_matches_one_process(single_mhc, tmp_path, layout):
    from tests.test_distributed import assert_matches, run_worker

    single = single_mhc
    got = run_worker(tmp_path / "out.pt", *MHC_WORKER, layout, nproc=2)
    assert any(".mhc_attention.phi" in n for n in got["grads"][0])
    # Losses and all gradients (mHC's included) match every step. Parameters are compared
    # outside mHC only: while the streams are still near-equal copies, H_pre only scales the
    # input of a pre-normed sublayer, so its logits' gradients are ~0 (the norm's epsilon aside),
    # and Adam's normalisation turns their rounding differences into visible steps (seen:
    # 1.6e-4 after 5 steps, against < 1e-5 elsewhere).
    assert_matches(single, got, compare_param=lambda name: ".mhc_" not in name)


def test_1b_config_follows_the_rlm_mhc_layout():
    from apps.main.train import TrainArgs
    from apps.main.transformer import LMTransformer
    from lingua.args import load_config

    args = load_config(TrainArgs, ["config=apps/main/configs/mhc_1b.yaml", "model.vocab_size=32000"])
    m = args.model
    assert (m.dim, m.n_layers, m.n_heads, m.mhc.n_streams, m.mhc.sinkhorn_iters) == (2048, 24, 16, 4, 20)
    with torch.device("meta"):
        model = LMTransformer(m)
        plain = LMTransformer(load_config(TrainArgs, ["config=apps/main/configs/dense_1.3b.yaml",
                                                      "model.vocab_size=32000"]).model)
    hcs = model.hyper_connections()
    assert len(hcs) == 48  # attention and FFN of 24 blocks
    width = 2 * 4 + 4 * 4
    added = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert added == 48 * (4 * 2048 * width + width + 3)


def test_kv_cache_decoding_matches_the_full_forward():
    model = build_model(tiny_args(enabled=True))
    with torch.no_grad():  # move phi off zero so every coefficient depends on the token
        for hc in (m for m in model.modules() if isinstance(m, HyperConnection)):
            hc.phi.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    x = tokens(1, 16)
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(decode_step_by_step(model, x, prefix=6, cache_len=16), full, atol=1e-5, rtol=1e-5)


# ---- bf16 -------------------------------------------------------------------------------


def _hyper_connection(dim: int) -> HyperConnection:
    from lingua.transformer import ParamInit

    hc = HyperConnection(dim, MHCArgs(enabled=True))
    hc.reset_parameters(ParamInit(0))
    with torch.no_grad():  # a trained-looking, token-dependent phi
        hc.phi.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    return hc


def test_bf16_streams_are_mixed_with_the_fp32_coefficients():
    """Coefficients rounded to bf16 bias every layer alike (H_res row sums 1.0012 at init), which
    bf16's unbiased rounding of the result alone does not: summed over many entries, what a bf16
    connection applies must equal H x computed in fp64 from the fp32 coefficients."""
    hc = _hyper_connection(64)
    x = (torch.rand(8, 64, 4, 64, generator=torch.Generator().manual_seed(0)) + 0.5).bfloat16()
    seen = {}

    def sublayer(h):
        seen["input"] = h
        return torch.zeros_like(h)

    with torch.no_grad():
        out = hc(x, sublayer)
        h_pre, _, h_res = hc.coefficients(x)
    assert out.dtype == seen["input"].dtype == torch.bfloat16
    mixed = h_res.double() @ x.double()
    pre = (h_pre.double().unsqueeze(-2) @ x.double()).squeeze(-2)
    res_bias = float(out.double().sum() / mixed.sum() - 1)
    pre_bias = float(seen["input"].double().sum() / pre.sum() - 1)
    assert abs(res_bias) < 1e-4 and abs(pre_bias) < 1e-4, (res_bias, pre_bias)


def test_bf16_hyper_connection_saves_fewer_bytes_than_fp32():
    """An fp32 copy of the streams kept for backward made bf16 save about as much as fp32 (0.95x)."""
    from tests.device_checks import LiveStorages

    retained = {}
    for dtype in (torch.float32, torch.bfloat16):
        hc = _hyper_connection(1024)
        x = torch.randn(2, 64, 4, 1024, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
        with LiveStorages() as live:
            out = hc(x, lambda h: 2 * h)
        retained[dtype] = live.bytes()
        out.float().sum().backward()  # the saved tensors were enough for a backward
        assert x.grad is not None and torch.isfinite(x.grad).all() and hc.phi.grad.abs().sum() > 0
    assert retained[torch.bfloat16] < 0.7 * retained[torch.float32], retained


def test_fp32_matmul_gradients_equal_autograd():
    from lingua.mhc import matmul_fp32

    a = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(matmul_fp32, (a, b))
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(matmul_fp32, (a.detach().flatten(0, 1).requires_grad_(), w))


def test_mix_stays_fp32_under_autocast():
    """Training without FSDP runs under autocast: the coefficient projection and the stream mix
    must still be fp32 (autocast turned them into bf16 matmuls)."""
    hc = _hyper_connection(64)
    x = torch.randn(4, 16, 4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = hc(x, lambda h: 2 * h)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = hc(x, lambda h: 2 * h)
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)
