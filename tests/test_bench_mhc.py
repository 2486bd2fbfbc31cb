"""apps/bench/mhc.py at a tiny size: both models step on the same batches and the overhead is
derived from the step times measured in the same run."""

from __future__ import annotations

import json
import math
import statistics

from apps.bench.mhc import TARGET_OVERHEAD, main

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seqlen=32", "data.seq_len=32",
        "data.batch_size=2"]


def test_bench_reports_the_overhead_of_mhc_over_the_plain_model(capsys):
    result = main(["--steps", "1", "--warmup", "1", "--repeats", "3", "--modes", "eager", *TINY])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    eager = result["eager"]
    assert result["headline_mode"] == "eager" and result["overhead"] == result["overhead_eager"]
    assert len(eager["overhead_per_round"]) == 3
    assert math.isclose(eager["overhead"], statistics.median(eager["overhead_per_round"]))
    q1, q3 = eager["overhead_quartiles"]
    assert q1 <= eager["overhead"] <= q3
    assert all(s > 0 for s in eager["step_seconds"].values())
    assert result["targets"]["overhead"]["met"] == (result["overhead"] <= TARGET_OVERHEAD)
    assert result["config"]["mhc"] == {"n_streams": 4, "sinkhorn_iters": 20, "wrap": "sublayer"}
