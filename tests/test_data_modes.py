"""Input/output and chat data: which tokens are trained on, through parsing, packing, the
loss normalisation of a training step and validation.

The data is JSONL written here; prompts use only upper-case letters and answers only
lower-case ones, so with the bytes tokenizer a label's byte says which part it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.main.eval import validate_file
from apps.main.train import StepResult, train_step
from apps.main.transformer import LMTransformerArgs, build_model
from lingua.data import (
    IGNORE_INDEX,
    DataArgs,
    DataError,
    PackedBatches,
    document_segments,
    encode_document,
    parse_document,
)
from lingua.optim import OptimArgs, build_optimizer
from lingua.tokenizer import ByteTokenizer, TokenizerArgs
from tests.conftest import failure_report, read_losses, run_module, tiny_overrides

TOK = ByteTokenizer()


def pair(i: int) -> tuple[str, str]:
    """A prompt (upper case) and an answer (lower case); some answers span several windows."""
    prompt = "Q" + "ABCDEFG"[i % 7] * (3 + i % 5) + ":"
    answer = "abcdefgh"[i % 8] * (2 + (i * 5) % 40)
    return prompt.upper(), answer


def write_pairs(root: Path, name: str = "sft", n: int = 60, style: str = "input") -> list[tuple[str, str]]:
    pairs = [pair(i) for i in range(n)]
    keys = {"input": ("input", "output"), "prompt": ("prompt", "response")}[style]
    (root / name).mkdir(parents=True, exist_ok=True)
    for split, rows in (("chunk.00", pairs), ("val", pairs[:8])):
        lines = [json.dumps({keys[0]: p, keys[1]: a, "id": k}) for k, (p, a) in enumerate(rows)]
        (root / name / f"{name}.{split}.jsonl").write_text("\n".join(lines) + "\n")
    return pairs


def is_answer_label(t: int) -> bool:
    return ord("a") <= t <= ord("z") or t == TOK.eos_id


# ---------------------------------------------------------------- parsing


def test_every_mode_parses_to_trained_and_untrained_segments() -> None:
    where = "f.jsonl:3"
    assert document_segments({"text": "hi", "id": 1}, where) == [("hi", True)]
    assert document_segments({"input": "Q:", "output": "a"}, where) == [("Q:", False), ("a", True)]
    assert document_segments({"prompt": "Q:", "response": "a"}, where) == [("Q:", False), ("a", True)]
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"}]
    assert document_segments({"messages": chat}, where) == [
        ("<|system|>\nS<|end|>\n", False), ("<|user|>\nU<|end|>\n", False),
        ("<|assistant|>\n", False), ("A<|end|>\n", True),
        ("<|user|>\nU2<|end|>\n", False), ("<|assistant|>\n", False), ("A2<|end|>\n", True),
    ]
    share_gpt = [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]
    assert document_segments({"conversations": share_gpt}, where) == document_segments(
        {"messages": chat[1:3]}, where)


@pytest.mark.parametrize("doc, needle", [
    ({"id": 3}, "no data field"),
    ({"text": 5}, "no data field"),
    ({"input": "Q"}, "'input' and 'output' must both be strings"),
    ({"prompt": "Q", "response": None}, "'prompt' and 'response' must both be strings"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "'messages'[0]"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"conversations": [{"from": "gpt", "value": 7}]}, "'conversations'[0]"),
])
def test_a_record_without_the_expected_fields_names_file_and_line(doc: dict, needle: str) -> None:
    with pytest.raises(DataError) as e:
        parse_document(json.dumps(doc).encode(), "data/sft.chunk.00.jsonl", 41)
    assert "data/sft.chunk.00.jsonl:42" in str(e.value) and needle in str(e.value)


def test_supervised_encoding_masks_bos_and_prompt_trains_answer_and_eos() -> None:
    tokens, mask = encode_document(TOK, [("QA:", False), ("ab", True)], add_bos=True, add_eos=True)
    assert tokens.tolist() == [TOK.bos_id, *b"QA:ab", TOK.eos_id]
    assert mask.tolist() == [False, False, False, False, True, True, True]
    tokens, mask = encode_document(TOK, [("xy", True)], add_bos=True, add_eos=True)
    assert mask.all() and len(tokens) == 4  # pretraining text trains every token


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("style", ["input", "prompt"])
def test_packing_keeps_masks_aligned_and_splits_long_documents(tmp_path: Path, style: str) -> None:
    pairs = write_pairs(tmp_path, style=style)
    seq_len = 16  # many answers are longer than a window
    assert max(len(a) for _, a in pairs) > 2 * seq_len
    args = DataArgs(root_dir=str(tmp_path), sources={"sft": 1.0}, batch_size=4, seq_len=seq_len,
                    prefetch_size=2, load_async=False, tokenizer=TokenizerArgs(name="bytes"))
    loader = PackedBatches(args)
    stream = loader.streams["sft"]
    # Exactly one epoch of windows, in stream order (the shuffle buffer only reorders them).
    n_tokens = sum(len(encode_document(TOK, [(p, False), (a, True)], True, True)[0]) for p, a in pairs)
    windows = [stream.window(seq_len) for _ in range(n_tokens // seq_len)]
    labels = np.concatenate([np.where(m[1:], t[1:], IGNORE_INDEX) for t, m in windows])
    targets = np.concatenate([t[1:] for t, _ in windows])
    trained = labels != IGNORE_INDEX
    # Every label that is trained is an answer byte or eos, and every answer byte or eos is trained.
    assert all(is_answer_label(int(t)) for t in labels[trained])
    assert all(is_answer_label(int(t)) == bool(k) for t, k in zip(targets, trained))
    # No answer is lost: the trained labels spell every answer, in order, each ended by eos.
    trained_text = bytes(t if t != TOK.eos_id else ord("|") for t in labels[trained].tolist()).decode()
    expected = "".join(a + "|" for _, a in pairs)
    assert trained_text == expected[: len(trained_text)] and len(trained_text) >= len(expected) - seq_len

    # And the shuffled batches follow the same rule.
    for x, y in (next(loader) for _ in range(8)):
        assert x.shape == y.shape == (4, seq_len)
        kept = y[y != IGNORE_INDEX]
        assert kept.size and all(is_answer_label(int(t)) for t in kept)
        masked_targets = x[:, 1:][y[:, :-1] == IGNORE_INDEX]
        assert not any(ord("a") <= int(t) <= ord("z") for t in masked_targets)


def test_chat_documents_train_only_assistant_turns(tmp_path: Path) -> None:
    (tmp_path / "chat").mkdir()
    rows = [{"messages": [{"role": "user", "content": "HELLO" * (1 + i % 3)},
                          {"role": "assistant", "content": "hi" * (1 + i % 4)}]} for i in range(20)]
    (tmp_path / "chat" / "chat.chunk.00.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArgs(root_dir=str(tmp_path), sources={"chat": 1.0}, batch_size=2, seq_len=32,
                    prefetch_size=2, load_async=False)
    x, y = next(PackedBatches(args))
    trained = bytes(t for t in y[y != IGNORE_INDEX].tolist() if t < 256).decode()
    assert trained and set(trained) <= set("hi<|end>\n")
    assert "HELLO" not in trained and "user" not in trained and "assistant" not in trained


# ---------------------------------------------------------------- training and eval


def tiny_model(vocab: int = TOK.n_words) -> torch.nn.Module:
    args = LMTransformerArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab, max_seqlen=64, seed=3)
    return build_model(args)


def test_masked_positions_get_zero_gradient(tmp_path: Path) -> None:
    write_pairs(tmp_path)
    args = DataArgs(root_dir=str(tmp_path), sources={"sft": 1.0}, batch_size=4, seq_len=32,
                    prefetch_size=2, load_async=False)
    x, y = (torch.from_numpy(a) for a in next(PackedBatches(args)))
    model = tiny_model()
    logits = model(x)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, model(x, target=y))
    loss.backward()
    masked = y == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert logits.grad[masked].abs().max() == 0  # no gradient from prompt positions
    assert (logits.grad[~masked].abs().amax(-1) > 0).all()  # every answer position gets one


def test_step_loss_is_the_mean_over_all_trained_labels_of_all_micro_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 24), generator=gen)
    y = torch.randint(0, 256, (4, 24), generator=gen)
    y[:2, :20] = IGNORE_INDEX  # the first micro-batch trains far fewer labels than the second

    def one_step(micro_batches) -> tuple[StepResult, dict]:
        model = tiny_model()
        opt, sched = build_optimizer(model, OptimArgs(lr=1e-3, warmup=0), 10)
        step = train_step(model, opt, sched, micro_batches, clip=1e9)
        return step, {n: p.detach().clone() for n, p in model.named_parameters()}

    split, p_split = one_step([(x[:2], y[:2]), (x[2:], y[2:])])
    whole, p_whole = one_step([(x, y)])
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(tiny_model()(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert int(split.tokens_trained) == int(whole.tokens_trained) == int((y != IGNORE_INDEX).sum())
    assert float(split.loss) == pytest.approx(float(reference), rel=1e-5)
    assert float(whole.loss) == pytest.approx(float(reference), rel=1e-5)
    for name in p_whole:
        torch.testing.assert_close(p_split[name], p_whole[name], rtol=1e-4, atol=1e-6)


def test_validation_scores_only_answer_tokens(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path)
    model = tiny_model().eval()
    sums = validate_file(model, TOK, tmp_path / "sft" / "sft.val.jsonl", seq_len=16, batch_size=4,
                         max_steps=None, device=torch.device("cpu"))
    answers = [a for _, a in pairs[:8]]
    assert sums["docs"] == 8
    assert sums["tokens"] == sum(len(a) + 1 for a in answers)  # answer bytes + eos
    assert sums["bytes"] == sum(len(a) for a in answers)


def test_input_output_training_logs_trained_and_read_tokens(tmp_path: Path) -> None:
    write_pairs(tmp_path / "data", n=200)
    dump = tmp_path / "dump"
    argv = tiny_overrides(tmp_path / "data", dump, steps=12, **{"data.sources": "{sft: 1.0}",
                                                                 "data.load_async": "false"})
    res = run_module("apps.main.train", argv)
    assert res.returncode == 0, failure_report(res)
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    read, trained = last["data/tokens_read"], last["data/tokens_trained"]
    assert read == last["optim/total_tokens"] > 0
    assert 0.2 * read < trained < 0.95 * read  # prompts and bos are not trained
    losses = read_losses(dump)
    assert losses[12] < losses[1]
