"""LM2 memory slots on segments: document masks, causality (a token never sees a later one),
no leak across documents, bptt_depth truncation, and that the slots carry information."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from apps.main.transformer import LMTransformerArgs, build_model
from lingua.data import IGNORE_INDEX
from lingua.segments import document_ids, split_segments

BOS = 1


def _model(**extra):
    settings = dict(dim=32, n_layers=2, n_heads=2, vocab_size=40, max_seqlen=64, multiple_of=32, bos_id=BOS,
                    segment_length=4, use_internal_memory=True, memory_slots=6, num_mem_heads=2)
    args = LMTransformerArgs(**{**settings, **extra})
    return build_model(args).double()


def _tokens(seed: int, shape=(2, 16)) -> torch.Tensor:
    t = torch.randint(2, 40, shape, generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t


def test_segments_mark_documents_and_what_each_token_may_read():
    tokens = torch.tensor([[BOS, 5, 6, 7, 8, BOS, 9, 10], [3, 4, 5, 6, 7, 8, 9, 10]])
    doc = document_ids(tokens, BOS)
    assert doc.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [0] * 8]
    first, second = split_segments(doc, 4)
    assert not first.carried.any() and not first.continues.any()  # the window's start: nothing carried
    assert second.carried.tolist() == [[True, False, False, False], [True] * 4]
    assert second.continues.tolist() == [False, True]  # row 0's last document began in this segment
    assert second.last_doc.tolist() == [[False, True, True, True], [True] * 4]
    mask = second.attention_mask()[0, 0]
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, True, True, False], [False, True, True, True]]


def test_a_token_never_sees_a_later_token():
    model = _model()
    x = _tokens(0)
    base = model(x)
    for t in (2, 5, 11):
        y = x.clone()
        y[:, t] = (y[:, t] + 7) % 38 + 2
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t]), f"changing token {t} changed an earlier position"
        assert not torch.equal(out[:, t:], base[:, t:])


def test_the_slots_carry_information_to_later_segments():
    """Only through the slots can segment 0 reach segment 2: without them nothing changes."""
    x = _tokens(1)
    y = x.clone()
    y[:, 2] = (y[:, 2] + 5) % 38 + 2
    with_slots, without = _model(), _model(use_internal_memory=False)
    assert not torch.allclose(with_slots(x)[:, 8:], with_slots(y)[:, 8:])
    assert torch.equal(without(x)[:, 4:], without(y)[:, 4:])


@pytest.mark.parametrize("boundary", [6, 8, 13])  # mid-segment, at a segment start, in the last one
def test_no_leak_across_documents(boundary):
    """Change document A (same length): document B's logits are bit-identical."""
    model = _model()
    x = _tokens(2)
    x[:, 1:] = x[:, 1:].clamp(min=2)
    x[:, boundary] = BOS
    y = x.clone()
    y[:, 1:boundary] = (y[:, 1:boundary] + 3) % 38 + 2
    a, b = model(x), model(y)
    assert torch.equal(a[:, boundary:], b[:, boundary:])
    assert not torch.equal(a[:, :boundary], b[:, :boundary])


def _first_state_gradient(model, x, segment: int) -> float:
    """|d loss(segment) / d slots written after segment 0| for the first memory block."""
    slots = model.layers[0].memory_slots
    written = []
    real_write = slots.write

    def capture(*args, **kwargs):
        out = real_write(*args, **kwargs)
        if out.requires_grad:
            out.retain_grad()
        written.append(out)
        return out

    slots.write = capture
    try:
        target = torch.full_like(x, IGNORE_INDEX)
        L = model.args.segment_length
        target[:, segment * L : (segment + 1) * L - 1] = x[:, segment * L + 1 : (segment + 1) * L]
        logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX).backward()
    finally:
        del slots.write
    grad = written[0].grad
    return 0.0 if grad is None else grad.abs().sum().item()


@pytest.mark.parametrize("depth, flows", [(0, {1: True, 2: True, 3: True}), (2, {1: True, 2: False, 3: False}),
                                          (3, {1: True, 2: True, 3: False})])
def test_bptt_depth_detaches_older_state(depth, flows):
    model = _model(bptt_depth=depth)
    x = _tokens(3)
    x[:, 1:] = x[:, 1:].clamp(min=2)  # one document per row: the state carries throughout
    for segment, expected in flows.items():
        assert (_first_state_gradient(model, x, segment) > 0) == expected, (depth, segment)


def test_segments_without_memory_are_independent_windows():
    """segment_length alone: each segment is its own attention window (the no-memory baseline)."""
    model = _model(use_internal_memory=False)
    x = _tokens(4)
    full = model(x)
    for start in range(0, 16, 4):
        piece = x[:, start : start + 4]
        assert torch.allclose(model(piece)[:, :], full[:, start : start + 4], atol=1e-12)


def test_memory_settings_are_checked():
    with pytest.raises(ValueError, match="model.segment_length"):
        build_model(LMTransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=40, bos_id=BOS,
                                      use_internal_memory=True))
    with pytest.raises(ValueError, match="model.bos_id"):
        build_model(LMTransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=40, segment_length=4,
                                      use_internal_memory=True))
    with pytest.raises(ValueError, match="model.memory_layers"):
        _model(memory_layers=[5])


SLOT_RUN = {"model.segment_length": 8, "model.use_internal_memory": "true", "model.memory_slots": 4,
            "model.num_mem_heads": 2, "model.bptt_depth": 2, "data.load_async": "false"}


def test_training_with_slots_resumes_exactly(corpus, tmp_path, monkeypatch):
    """Checkpoints hold no memory contents: a run killed after its step-4 save and resumed logs
    the same losses as an uninterrupted one; bos_id comes from the tokenizer."""
    from apps.main.train import TrainArgs, train
    from lingua.args import load_config
    from tests.conftest import read_losses, tiny_overrides, train_killed_after_first_save_then_resumed

    args = lambda d: load_config(TrainArgs, tiny_overrides(corpus, d, steps=8, **SLOT_RUN,  # noqa: E731
                                                            **{"checkpoint.eval.every": 4}))
    whole = args(tmp_path / "whole")
    train(whole)
    assert whole.model.bos_id == 256  # the bytes tokenizer's

    train_killed_after_first_save_then_resumed(monkeypatch, lambda: args(tmp_path / "cut"))
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "whole")
    assert len(read_losses(tmp_path / "whole")) == 8
    validation = [json.loads(line) for line in open(tmp_path / "cut/metrics.validation.jsonl")]
    assert [r["global_step"] for r in validation] == [4, 8] and all(r["val/src/loss"] > 0 for r in validation)


@pytest.mark.parametrize("override, message", [
    ({"data.add_bos": "false"}, "needs data.add_bos=true"),
    ({"distributed.tp_size": 2}, "does not run under tensor parallelism yet"),
    ({"model.segment_length": 0}, "model.use_internal_memory needs model.segment_length > 0"),
    ({"model.memory_layers": "[7]"}, "model.memory_layers [7] are not blocks"),
    # detached before the next segment's read: the write path would never get a gradient
    ({"model.bptt_depth": 1}, "model.bptt_depth=1 detaches the memory after every segment"),
    # segment attention stays within the segment: the window would be ignored silently
    ({"model.sliding_window": 4}, "model.sliding_window=4 is not applied by a segment model"),
])
def test_bad_memory_settings_fail_before_work(corpus, tmp_path, override, message):
    from apps.main.train import TrainArgs, train
    from lingua.args import ConfigError, load_config
    from tests.conftest import tiny_overrides

    args = load_config(TrainArgs, tiny_overrides(corpus, tmp_path / "d", **{**SLOT_RUN, **override}))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train(args)
    assert not (tmp_path / "d").exists()
