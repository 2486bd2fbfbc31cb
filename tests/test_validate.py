"""apps.main.validate: a healthy checkpoint passes; a NaN weight and a mixing matrix that is not
doubly stochastic fail, naming what broke; memory models get their own checks; config errors
exit 2 before any work. In-process (one import of torch), on tiny models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from apps.main.eval import load_model_from_checkpoint
from apps.main.train import TrainArgs, data_and_tokenizer, train
from apps.main.transformer import build_model
from apps.main.validate import main
from lingua.args import load_config, to_dict
from tests.conftest import ROOT, tiny_overrides, write_corpus

CONFIGS = ROOT / "apps/main/configs"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def checks(report_file: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(report_file.read_text())["checks"]}


def save_checkpoint(model, params: dict, dump: Path) -> Path:
    """A step checkpoint of `model` as training writes one (DCP shards + params.json), no optimizer."""
    ckpt = dump / "checkpoints" / "0000000001"
    ckpt.mkdir(parents=True)
    (ckpt / "params.json").write_text(json.dumps(params))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(ckpt))
    return ckpt


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """The dump dir of a 2-step tiny run (one checkpoint)."""
    dump = tmp_path_factory.mktemp("run")
    overrides = {"checkpoint.dump.every": 2, "data.load_async": "false"}
    train(load_config(TrainArgs, tiny_overrides(corpus, dump, steps=2, **overrides)))
    return dump


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory) -> Path:
    """A corpus under the source name the shipped debug configs read."""
    return write_corpus(tmp_path_factory.mktemp("data"), name="stdlib_shuffled", n_docs=4, n_val=2)


def test_healthy_checkpoint_passes_and_reports_next_to_the_run(trained, capsys):
    code, out, _ = run([f"ckpt_dir={trained}", "batch_size=2"], capsys)
    assert code == 0, out
    found = checks(trained / "validate.json")
    assert list(found) == ["parameters_finite", "forward_backward"]
    assert all(c["passed"] for c in found.values())
    assert found["forward_backward"]["figures"]["split"] == "val"
    assert 0 < found["forward_backward"]["figures"]["loss"] < 10
    for name in found:
        assert any(line.startswith(name) and " PASS " in line for line in out.splitlines()), out
    code, _, _ = run([f"ckpt_dir={trained}", "batch_size=1", "split=train"], capsys)  # its own report: rewritten
    assert code == 0 and checks(trained / "validate.json")["forward_backward"]["figures"]["split"] == "train"


def test_nan_parameter_fails_naming_it(trained, tmp_path, capsys):
    ckpt = sorted((trained / "checkpoints").iterdir())[-1]
    model, _, params = load_model_from_checkpoint(ckpt, torch.device("cpu"))
    with torch.no_grad():
        model.layers[0].attention.wq.weight[3, 5] = float("nan")
    save_checkpoint(model, params, tmp_path / "bad")
    code, out, _ = run([f"ckpt_dir={tmp_path / 'bad'}", f"out={tmp_path}", "batch_size=1"], capsys)
    assert code == 1
    assert "layers.0.attention.wq.weight: 1 non-finite of 1024" in out
    found = checks(tmp_path / "validate.json")
    assert found["parameters_finite"]["problems"] == ["layers.0.attention.wq.weight: 1 non-finite of 1024"]
    assert not found["forward_backward"]["passed"]  # the loss is NaN too


def test_mhc_matrix_that_is_not_doubly_stochastic_fails(corpus, tmp_path, capsys):
    args = load_config(TrainArgs, tiny_overrides(corpus, tmp_path, config=CONFIGS / "mhc_debug.yaml"))
    data_and_tokenizer(args)
    model = build_model(args.model)
    hc = model.layers[0].mhc_attention
    n = hc.n
    # Static H_res logits with zeros below the diagonal (e^-60): Sinkhorn-Knopp converges to the
    # identity only as 1/iterations, so 20 iterations leave columns off by ~0.07.
    upper = torch.ones(n, n).triu().bool()
    with torch.no_grad():
        hc.bias[2 * n :] = torch.where(upper, 0.0, -60.0).flatten()
    save_checkpoint(model, to_dict(args), tmp_path / "mhc")
    code, out, _ = run([f"ckpt_dir={tmp_path / 'mhc'}", f"out={tmp_path}", "batch_size=1"], capsys)
    assert code == 1, out
    found = checks(tmp_path / "validate.json")
    assert [name for name, c in found.items() if not c["passed"]] == ["mhc"]
    assert found["mhc"]["problems"][0].startswith("layers.0.mhc_attention: not doubly stochastic")
    assert found["mhc"]["figures"]["layers"]["layers.0.mhc_attention"]["col_sum_error"] > 0.01
    assert found["mhc"]["figures"]["layers"]["layers.1.mhc_feed_forward"]["col_sum_error"] < 1e-3
    # The same model within a tolerance it meets passes.
    code, _, _ = run([f"ckpt_dir={tmp_path / 'mhc'}", f"out={tmp_path}", "batch_size=1", "tolerance=0.2"], capsys)
    assert code == 0


@pytest.mark.parametrize("config, expected", [
    ("mhc_debug", ["mhc"]),
    ("pk_debug", ["product_key_usage"]),
    ("hybrid_debug", ["memory_slots", "memory_bank"]),
])
def test_fresh_memory_models_get_their_checks(config, expected, stdlib_corpus, tmp_path, capsys):
    code, out, _ = run([f"train_config={CONFIGS / config}.yaml", f"data_root={stdlib_corpus}", "batch_size=1",
                        "seq_len=128", f"out={tmp_path / 'v.json'}"], capsys)
    assert code == 0, out
    found = checks(tmp_path / "v.json")
    assert list(found) == ["parameters_finite", "forward_backward", *expected]
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in found}
    assert all(" PASS " in line for line in lines.values()), out
    figures = {name: found[name]["figures"] for name in expected}
    if config == "mhc_debug":
        assert figures["mhc"]["connections"] == 8 and figures["mhc"]["composite_amax_fwd"] == pytest.approx(1, abs=1e-3)
        assert "layers.0.mhc_attention" in figures["mhc"]["layers"]
    if config == "pk_debug":
        usage = figures["product_key_usage"]["layers"]["layers.2"]
        assert 0 < usage["hit_fraction"] <= 1 and usage["kl_uniform"] >= usage["kl_floor"] - 1e-6
    if config == "hybrid_debug":
        assert figures["memory_slots"]["blocks"] == 4 and 0 < figures["memory_slots"]["forget_gate"] < 1
        bank = figures["memory_bank"]["layers"]["layers.2"]
        assert bank["tokens"] > 0 and bank["read_share"] > 0  # the second segment read the first one's


@pytest.mark.parametrize("argv, message", [
    (["ckpt_dir={run}", "batch_sise=2"], "'batch_sise'; did you mean 'batch_size'"),
    (["ckpt_dir={tmp}/nothing"], "no checkpoint found at ckpt_dir="),
    ([], "give one of ckpt_dir"),
    (["ckpt_dir={run}", "data_root={tmp}/nodata"], "data.root_dir"),
    (["ckpt_dir={run}", "seq_len=4096"], "seq_len=4096 exceeds"),
    (["train_config={tmp}/missing.yaml"], "missing.yaml' does not exist"),
    (["ckpt_dir={run}", "out={tmp}/notes.txt"], "is not a validate.json"),
])
def test_config_errors_exit_2_naming_the_fault(argv, message, trained, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    code, out, err = run([a.format(run=trained, tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and message in err, err
    assert "check" not in out  # nothing ran
    assert (tmp_path / "notes.txt").read_text() == "keep me"
