"""lingua/cadence.py: when the loop logs, saves, validates and stops early."""

from __future__ import annotations

import pytest

from lingua.cadence import Cadence, CadenceArgs, EarlyStoppingArgs, check_metric, metric_value


def _cadence(patience=0, threshold=0.0, metric="loss", eval_every=4, state=None) -> Cadence:
    return Cadence(CadenceArgs(steps=20, log_every=5, dump_every=10, eval_every=eval_every,
                               early_stopping=EarlyStoppingArgs(patience, threshold, metric)), state)


def test_due_follows_each_cadence():
    c = _cadence()
    due = {s: c.at(s) for s in range(1, 21)}
    assert [s for s, d in due.items() if d.log] == [1, 5, 10, 15, 20]
    assert [s for s, d in due.items() if d.dump] == [10, 20]
    assert [s for s, d in due.items() if d.eval] == [4, 8, 12, 16, 20]
    assert [s for s, d in due.items() if d.save] == [4, 8, 10, 12, 16, 20]
    preempted = c.at(3, preempted=True)
    assert preempted.dump and not preempted.eval and preempted.preempted
    assert not any(d.eval for d in (_cadence(eval_every=None).at(s) for s in range(1, 21)))


def test_early_stopping_counts_evaluations_without_improvement_by_more_than_threshold():
    c = _cadence(patience=2, threshold=0.1)
    seen = []
    for step, loss in [(4, 3.0), (8, 2.95), (12, 2.8), (16, 2.79), (20, 2.85)]:
        best = c.validated(step, {"src": {"loss": loss, "bpb": 1.0}})
        seen.append((best, c.evals_without_improvement, c.stop_reason() is not None))
    # 2.95 is a new best but not by more than 0.1: the count still grows; 2.8 improves on 2.95
    # by 0.15 and resets it; 2.79 and 2.85 do not improve: patience 2 reached at step 20.
    assert seen == [(True, 0, False), (True, 1, False), (True, 0, False), (True, 1, False), (False, 2, True)]
    assert c.best == 2.79 and c.best_step == 16
    assert "step 16" in c.stop_reason() and "patience 2" in c.stop_reason()
    assert _cadence(patience=0).stop_reason() is None


def test_a_resumed_cadence_keeps_counting():
    c = _cadence(patience=3, threshold=10.0)
    for step in (4, 8):
        c.validated(step, {"src": {"loss": 2.0 - step / 100, "bpb": 1.0}})
    resumed = _cadence(patience=3, threshold=10.0, state=c.state_dict())
    assert (resumed.best, resumed.best_step, resumed.evals_without_improvement) == (1.92, 8, 1)
    resumed.validated(12, {"src": {"loss": 1.9, "bpb": 1.0}})
    assert resumed.stop_reason() is None
    resumed.validated(16, {"src": {"loss": 1.9, "bpb": 1.0}})
    assert resumed.stop_reason() is not None  # a fresh counter would need two more


def test_metric_names_a_source_or_the_mean():
    results = {"a": {"loss": 2.0, "bpb": 1.0}, "b": {"loss": 4.0, "bpb": 3.0}}
    assert metric_value("loss", results) == 3.0 and metric_value("b/bpb", results) == 3.0
    check_metric("a/loss", ["a", "b"])
    with pytest.raises(ValueError, match="early_stopping.metric.*'c'"):
        check_metric("c/loss", ["a", "b"])
    with pytest.raises(ValueError, match="early_stopping.metric"):
        check_metric("a/accuracy", ["a"])
