"""apps/bench/data.py end to end on a small corpus: the JSON it prints and how its headline
is derived from the figures measured in the same run."""

from __future__ import annotations

import json
import math

from apps.bench.data import TARGET_HEADROOM, main


def test_bench_prints_headroom_of_the_slower_tokenizer(capsys, tmp_path):
    result = main(["--corpus_mb", "3", "--seconds", "0.5", "--steps", "2", "--sp_vocab", "500",
                   "--workdir", str(tmp_path / "work")])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))  # stdout is the JSON
    pipeline, step = result["pipeline_tokens_per_s"], result["step_tokens_per_s"]
    assert set(pipeline) == {"bytes", "sp"} and all(v > 0 and math.isfinite(v) for v in pipeline.values())
    assert step > 0
    assert result["headroom_tokenizer"] == min(pipeline, key=pipeline.get)
    assert math.isclose(result["headroom"], min(pipeline.values()) / step)
    assert result["targets"]["headroom"]["met"] == (result["headroom"] >= TARGET_HEADROOM)
    assert result["prep_mb_per_s"] > 0 and result["details"]["prep"]["source_mb"] > 2
    assert result["config"]["debug_config"] == "apps/main/configs/debug.yaml"
    # The corpus went through the real prep: chunks, a val file and the marker.
    prepared = tmp_path / "work" / "data" / "benchcorpus_shuffled"
    assert (prepared / ".done").exists() and len(list(prepared.glob("*.chunk.*.jsonl"))) == 8
