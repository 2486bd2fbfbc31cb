"""Tests for apps/bench/train_step.py: the JSON it prints, and that its plain-PyTorch
reference is a real language model of the same size as ours."""

from __future__ import annotations

import json
import math

import torch

from apps.bench.train_step import BenchShape, build_reference, main, n_params
from apps.main.transformer import build_model

TINY = ["--steps", "2", "--warmup", "1", "--repeats", "1", "--no-compile",
        "--dim", "64", "--n_layers", "2", "--n_heads", "2", "--seq_len", "32", "--batch_size", "2"]
TINY_SHAPE = BenchShape(dim=64, n_layers=2, n_heads=2, seq_len=32, batch_size=2)


def _positive_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_main_prints_one_json_object_with_the_figures(capsys):
    result = main(TINY)
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(json.dumps(result))  # stdout is exactly the JSON

    for key in ("tokens_per_s", "reference_tokens_per_s", "speedup_vs_reference", "mfu", "reference_mfu",
                "flops_per_token", "peak_flops", "threads"):
        assert _positive_finite(result[key]), (key, result[key])
    for model in ("ours", "reference"):
        assert _positive_finite(result["step_time_s"][model])
        assert _positive_finite(result["best_step_time_s"][model])
        assert math.isfinite(result["relative_spread"][model]) and result["relative_spread"][model] >= 0
    assert isinstance(result["peak_source"], str) and result["peak_source"]
    assert result["peak_flops"] == max(result["peak_flops_start"], result["peak_flops_end"])
    assert result["torch"] == torch.__version__
    assert result["machine"]["cpu_count"] >= 1 and "arch" in result["machine"]
    assert result["config"]["dim"] == 64 and result["config"]["seq_len"] == 32
    assert result["n_params"]["ours"] == result["n_params"]["reference"]
    # The loop's own step reads nothing back from the device (the reference does not either).
    assert result["syncs_per_step"] == 0 and result["syncs_per_step_by_variant"] == {"ours": 0, "reference": 0}
    assert result["sync_sites"] == []

    tokens = result["config"]["batch_size"] * result["config"]["seq_len"]
    assert math.isclose(result["tokens_per_s"], tokens / result["step_time_s"]["ours"])
    assert math.isclose(result["speedup_vs_reference"], result["tokens_per_s"] / result["reference_tokens_per_s"])
    assert math.isclose(result["mfu"], result["tokens_per_s"] * result["flops_per_token"] / result["peak_flops"])

    targets = result["targets"]
    assert targets["speedup_vs_reference"]["target"] == 1.0 and targets["mfu"]["target"] == 0.5
    assert targets["speedup_vs_reference"]["met"] == (result["speedup_vs_reference"] >= 1.0)
    assert targets["mfu"]["met"] == (result["mfu"] >= 0.5)


def test_reference_has_our_parameter_count_at_the_default_shape():
    shape = BenchShape()
    assert n_params(build_reference(shape)) == n_params(build_model(shape.model_args()))


def test_reference_is_a_language_model():
    shape = TINY_SHAPE
    model = build_reference(shape)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (4, shape.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        init_loss = float(model(x, y))
    assert abs(init_loss - math.log(shape.vocab_size)) < 0.1, init_loss

    # It learns: a few AdamW steps on one batch bring the loss well down.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        opt.step()
    final = loss.item()
    assert final < init_loss - 1.0, (init_loss, final)


def test_reference_is_causal():
    # Changing the tokens after position 20 must not change the loss on the first 20
    # positions (the later targets are ignored with cross_entropy's default -100).
    shape = TINY_SHAPE
    model = build_reference(shape)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, shape.vocab_size, (1, shape.seq_len), generator=gen)
    b = a.clone()
    b[:, 20:] = (a[:, 20:] + 1) % shape.vocab_size
    target = torch.roll(a, -1, dims=1)
    target[:, 20:] = -100
    with torch.no_grad():
        same_prefix = model(a, target), model(b, target)
        target_all = torch.roll(a, -1, dims=1)
        changed = model(a, target_all), model(b, target_all)
    torch.testing.assert_close(same_prefix[0], same_prefix[1])
    assert not torch.allclose(changed[0], changed[1])  # the tail does reach later positions


def test_compiled_variants_are_measured_and_named():
    """The compiled runners exist, the headline is the compiled step, like-for-like ratios sit beside it."""
    result = main(TINY[:6] + TINY[7:])  # TINY without --no-compile
    assert set(result["step_time_s"]) == {"ours", "reference", "ours_compiled", "reference_compiled"}
    assert result["headline"].startswith("ours_compiled")
    assert result["speedup_vs_reference"] == result["tokens_per_s"] / result["reference_tokens_per_s"]
    for key in ("speedup_vs_reference_eager", "speedup_vs_reference_both_compiled"):
        assert _positive_finite(result[key]), key
