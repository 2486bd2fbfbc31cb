"""apps/bench/recall.py at a tiny size: the task puts the answer segments before the question,
every variant trains on the same batches, and the JSON has the figures the acceptance reads."""

from __future__ import annotations

import json

import torch

from apps.bench.recall import BOS, KEY, QUERY, RecallTask, main
from apps.main.train import IGNORE_INDEX


def test_the_answer_lies_in_the_first_segment_and_only_it_is_a_label():
    task = RecallTask(segment_length=8, segments=4, n_values=5, n_filler=10)
    x, labels, answers = task.batch(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 32) and (x[:, 0] == BOS).all() and (x[:, -1] == QUERY).all()
    key_pos = (x == KEY).int().argmax(1)
    assert (key_pos < 7).all() and torch.equal(x[torch.arange(64), key_pos + 1], answers)
    assert (x[:, 8:-1] >= 4 + 5).all(), "a value or special token in the filler"
    assert (labels[:, :-1] == IGNORE_INDEX).all() and torch.equal(labels[:, -1], answers)


def test_bench_prints_accuracy_per_variant_and_chance(capsys):
    result = main(["--steps", "2", "--eval_every", "1", "--n_eval", "8", "--batch_size", "4", "--segment_length", "8",
                   "--n_values", "4", "--n_filler", "8", "--variants", "baseline,slots,bank,hybrid,full_attention"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert set(result["accuracy"]) == {"baseline", "slots", "bank", "hybrid", "full_attention"}
    assert result["chance"] == 0.25 and all(0 <= a <= 1 for a in result["accuracy"].values())
    assert [p["step"] for p in result["curves"]["slots"]] == [1, 2]
    assert result["saved_activation_bytes"]["hybrid"] > result["saved_activation_bytes"]["baseline"] > 0
