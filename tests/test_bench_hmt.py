"""apps.bench.hmt at the smallest shapes: it runs all three variants on both parts and prints
the JSON the acceptance check reads (the figures themselves come from the full run)."""

from __future__ import annotations

import json
import math

from apps.bench.hmt import main


def test_bench_prints_ppl_and_recall_for_every_variant(capsys):
    out = main(["--steps", "2", "--backbone_steps", "2", "--recall_steps", "2", "--eval_every", "1",
                "--n_train", "3", "--n_test", "1", "--test_tokens", "80", "--n_eval", "8", "--batch_size", "2",
                "--dim", "32", "--n_heads", "2", "--content_length", "16", "--num_sensory", "2",
                "--recall_segment_length", "8", "--n_filler", "16", "--min_doc_tokens", "2000"])
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == json.loads(json.dumps(out))  # stdout is the JSON alone
    assert printed.lstrip().startswith("{")
    for part in ("ppl", "recall", "seconds_per_segment"):
        assert set(out[part]) == {"baseline", "rmt", "hmt", "hmt_paper_summary"}
    assert all(math.isfinite(v) and v > 1 for v in out["ppl"].values())
    assert all(0 <= v <= 1 for v in out["recall"].values()) and out["chance"] == 1 / 16
    assert [c["step"] for c in out["recall_curves"]["hmt"]] == [1, 2]
    assert isinstance(out["goal"]["hmt_below_baseline_and_rmt"], bool)
