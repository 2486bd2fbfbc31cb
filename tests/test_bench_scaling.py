"""apps/bench/scaling.py end to end on a tiny model: three real training runs (1 process,
2-rank FSDP, 2-rank TP under torchrun) and the JSON it prints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apps.bench.scaling import CONFIGS, main
from tests.conftest import write_corpus

pytestmark = pytest.mark.distributed

TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--seq_len", "32", "--steps", "4", "--warmup", "1",
        "--repeats", "1", "--source", "src"]


def _positive_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_main_prints_one_json_object_with_the_figures(tmp_path, capsys):
    data = write_corpus(tmp_path / "data")
    result = main([*TINY, "--data_dir", str(data)])
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(json.dumps(result))  # stdout is exactly the JSON

    assert set(result["tokens_per_s"]) == set(CONFIGS) == {"single", "fsdp", "tp"}
    for name in CONFIGS:
        assert _positive_finite(result["tokens_per_s"][name]), name
        assert len(result["tokens_per_s_per_repeat"][name]) == 1
        assert result["relative_spread"][name] == 0.0  # one repeat
        assert _positive_finite(result["step_time_s"][name])
    assert [r["config"] for r in result["runs"]] == list(CONFIGS)  # one repeat, in order
    for run in result["runs"]:
        assert run["timed_steps"] == 3  # steps 2..4 after 1 warmup step
        share = run["other_processes_cpu_share"]
        assert share is None or 0.0 <= share <= 1.0
    assert result["tokens_per_s_best"] == result["tokens_per_s"]  # one repeat
    tps = result["tokens_per_s"]
    assert math.isclose(result["fsdp_ratio"], tps["fsdp"] / tps["single"])
    assert math.isclose(result["tp_ratio"], tps["tp"] / tps["single"])
    target = result["targets"]["fsdp_ratio"]
    assert target["target"] == 0.8 and target["value"] == result["fsdp_ratio"]
    assert target["met"] == (result["fsdp_ratio"] >= 0.8)

    # The commands are the real loop, with the thread and rank layout asked for.
    cmds = result["commands"]
    assert "OMP_NUM_THREADS=2" in cmds["single"] and "apps.main.train" in cmds["single"]
    assert "torch.distributed.run" not in cmds["single"]
    for name, flag in (("fsdp", "distributed.dp_shard=2"), ("tp", "distributed.tp_size=2")):
        assert "OMP_NUM_THREADS=1" in cmds[name] and "--nproc-per-node 2" in cmds[name] and flag in cmds[name]
    assert "data.batch_size=4" in cmds["fsdp"] and "data.batch_size=8" in cmds["tp"]
    for cmd in cmds.values():
        assert "eval=null" in cmd and "model.dim=32" in cmd and "data.seq_len=32" in cmd and "steps=4" in cmd

    assert result["config"]["tokens_per_step"] == 8 * 32
    assert result["torch"] == torch.__version__
    assert result["machine"]["cpu_count"] >= 1 and "arch" in result["machine"]
    assert result["load_avg_at_start"] is None or len(result["load_avg_at_start"]) == 3


def test_bad_arguments_fail_before_any_run():
    with pytest.raises(ValueError, match="steps > warmup"):
        main(["--steps", "3", "--warmup", "3"])
    with pytest.raises(ValueError, match="batch_size"):
        main(["--batch_size", "3"])
