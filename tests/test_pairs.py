"""Input/output pairs end to end: prepare_io_data's splits train a hybrid memory model on output
tokens only, and apps.main.eval pairs.path=... scores loss, exact match and ROUGE-L into
metrics.eval.jsonl, consistent with what generation actually produces."""

from __future__ import annotations

import json
import random

import pytest

from apps.main.pairs import PairsArgs, evaluate_pairs, read_pairs, rouge_l
from tests.conftest import read_losses, tiny_overrides

HYBRID = {"model.segment_length": 8, "model.use_internal_memory": "true", "model.memory_slots": 4,
          "model.num_mem_heads": 2, "model.use_external_memory": "true", "model.external_memory_size": 16,
          "model.chunk_size": 4, "model.retrieval_k": 8, "model.retrieval_layer_index": 1,
          "data.load_async": "false"}


@pytest.fixture(scope="module")
def io_pairs(tmp_path_factory):
    from setup.prepare_io_data import prepare

    d = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    words = "alpha beta gamma delta".split()
    ins, outs = [], []
    for _ in range(60):
        key, val = rng.choice(words), str(rng.randint(10, 99))
        ins.append(f"{key} is {val}. what is {key}? ")
        outs.append(val)
    (d / "in.txt").write_text("\n".join(ins) + "\n")
    (d / "out.txt").write_text("\n".join(outs) + "\n")
    prepare(d / "in.txt", d / "out.txt", d / "datasets/io_pairs", test_fraction=0.1, seed=1)
    return d / "datasets"


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat sat", "dog") == 0.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * (2 / 2 * 2 / 4) / (2 / 2 + 2 / 4))


def test_hybrid_trains_on_outputs_and_eval_scores_the_test_pairs(io_pairs, tmp_path):
    from apps.main.eval import main as eval_main
    from apps.main.eval import load_model_from_checkpoint, resolve_ckpt_dir
    from apps.main.generate import GeneratorArgs, generate
    from apps.main.train import TrainArgs, train
    from lingua.args import load_config

    dump = tmp_path / "run"
    args = load_config(TrainArgs, tiny_overrides(io_pairs, dump, steps=4, **HYBRID,
                                                 **{"data.sources": "{io_pairs: 1.0}"}))
    train(args)
    rows = [json.loads(line) for line in open(dump / "metrics.jsonl")]
    assert rows[-1]["data/tokens_trained"] < 0.5 * rows[-1]["data/tokens_read"], "trained on inputs too"
    assert len(read_losses(dump)) == 4

    results = eval_main([f"ckpt_dir={dump}", f"pairs.path={io_pairs}/io_pairs/test", "pairs.max_gen_len=8",
                         "validation.max_steps=1"])
    logged = [json.loads(line) for line in open(dump / "metrics.eval.jsonl")][-1]
    assert logged["pairs/pairs"] == 6 and logged["global_step"] == 4
    assert {"pairs/loss", "pairs/exact_match", "pairs/rouge_l"} <= set(logged)
    assert results["pairs"]["exact_match"] == logged["pairs/exact_match"]

    model, tokenizer, _ = load_model_from_checkpoint(resolve_ckpt_dir(str(dump)), "cpu")
    pairs = read_pairs(f"{io_pairs}/io_pairs/test")
    made = [generate(model, tokenizer, [p["input"]], GeneratorArgs(max_gen_len=8))[0] for p in pairs]
    expected_em = sum(m.strip() == p["output"].strip() for m, p in zip(made, pairs)) / len(pairs)
    expected_rouge = sum(rouge_l(p["output"], m) for m, p in zip(made, pairs)) / len(pairs)
    assert logged["pairs/exact_match"] == pytest.approx(expected_em)
    assert logged["pairs/rouge_l"] == pytest.approx(expected_rouge)
    again = evaluate_pairs(model, tokenizer, PairsArgs(path=f"{io_pairs}/io_pairs/test", max_gen_len=8),
                           args.data, "cpu")
    assert again["loss"] == pytest.approx(logged["pairs/loss"], rel=1e-6)


def test_rouge_l_scores_every_script():
    """rouge-score's default tokenizer drops all but [a-z0-9]: exact match 1 scored ROUGE-L 0."""
    assert rouge_l("東京は日本の首都です", "東京は日本の首都です") == 1.0
    assert rouge_l("Привет, мир", "привет мир") == 1.0
    assert 0.0 < rouge_l("東京は日本の首都です", "京都は日本の古都です") < 1.0
    assert 0.0 < rouge_l("Москва столица России", "Москва большой город") < 1.0
    assert rouge_l("the cat sat", "the cat") == pytest.approx(0.8)


def test_read_pairs_splits_records_at_newlines_only(tmp_path):
    records = [{"input": "a\u2028b ", "output": "c\x85d"}, {"input": "e\x0c", "output": "f"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                      encoding="utf-8")
    assert read_pairs(str(tmp_path / "p.jsonl")) == records
