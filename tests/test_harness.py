"""lm-eval harness on our models (apps/main/harness.py), offline: the tasks are YAMLs and JSON
files the tests write. Scores are checked against direct forwards of the same model."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from apps.main.eval import LMHarnessArgs  # noqa: E402
from apps.main.harness import LinguaLM, run_harness  # noqa: E402
from apps.main.transformer import LMTransformerArgs, build_model  # noqa: E402
from lingua.checkpoint import save_model_checkpoint  # noqa: E402
from lingua.tokenizer import ByteTokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from tests.conftest import failure_report, run_module, tiny_overrides  # noqa: E402

MAX_LEN = 32


def tiny_model(**overrides):
    args = LMTransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=258, max_seqlen=MAX_LEN, seed=3, **overrides)
    return build_model(args).eval()


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def direct_logprob(model, tokens: list[int], n_scored: int) -> float:
    """Sum of log p of the last n_scored tokens given everything before them, one forward."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).float()
    logprobs = F.log_softmax(logits[0], dim=-1)
    targets = torch.tensor(tokens[1:])
    return logprobs[-n_scored:].gather(-1, targets[-n_scored:, None]).sum().item()


def test_loglikelihood_equals_a_direct_forward_with_lm_evals_token_boundary():
    model, tok = tiny_model(), ByteTokenizer()
    lm = LinguaLM(model, tok, torch.device("cpu"), batch_size=2)
    pairs = [("3 + 4 = ", "7"), ("a long context that is cut on the left by max_seqlen ...", " yes"),
             ("", "hello"), ("x", "y")]
    got = lm.loglikelihood([request("loglikelihood", c, k) for c, k in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        assert isinstance(logprob, float) and isinstance(greedy, bool)
        context_ids, continuation_ids = lm.encode_pair(context, continuation)
        # the trailing space belongs to the continuation, as in lm-eval's HF model
        assert tok.decode(continuation_ids) == (" " + continuation if context.endswith(" ") else continuation)
        whole = (context_ids + continuation_ids)[-(MAX_LEN + 1):]
        assert logprob == pytest.approx(direct_logprob(model, whole, len(continuation_ids)), abs=1e-4)


def test_rolling_windows_score_every_token_once_with_full_context():
    model, tok = tiny_model(), ByteTokenizer()
    lm = LinguaLM(model, tok, torch.device("cpu"))
    text = "def rolling(window):\n    return sum(window) / len(window)  # " * 3
    tokens = tok.encode(text, add_bos=False, add_eos=False)
    windows = lm.rolling_windows(tokens)
    assert [t for _, predicted in windows for t in predicted] == tokens
    assert all(len(context) + len(predicted) - 1 <= MAX_LEN for context, predicted in windows)
    assert all(len(context) >= MAX_LEN // 2 for context, _ in windows[1:])  # later windows keep a context
    expected = sum(direct_logprob(model, c + p, len(p)) for c, p in windows)
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert type(got) is float and got == pytest.approx(expected, abs=1e-3)


def write_tasks(root: Path, gen_targets: list[str]) -> Path:
    """Three offline tasks: multiple choice (acc), rolling perplexity, generation (exact match)."""
    rng = random.Random(0)
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    with open(root / "mc.jsonl", "w") as f:
        for _ in range(12):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"question": f"{a} + {b} =", "choices": [f"{a + b}", f"{a * b}", "x", "ab"],
                                "label": rng.randint(0, 3)}) + "\n")
    with open(root / "ppl.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"import os\nprint(os.getcwd(), {i})\n" * (i + 1)}) + "\n")
    with open(root / "gen.jsonl", "w") as f:
        for i, target in enumerate(gen_targets):
            f.write(json.dumps({"prompt": f"q{i}:", "answer": target}) + "\n")

    def task(name: str, body: str) -> None:
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs: {{data_files: {{test: {root / name.split('_')[1]}.jsonl}}}}\ntest_split: test\n"
            f"{body}metadata: {{version: 1.0}}\n")

    task("tiny_mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
         "doc_to_target: label\nmetric_list: [{metric: acc}]\n")
    task("tiny_ppl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]\n")
    task("tiny_gen", 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
         'generation_kwargs: {until: ["\\n"], max_gen_toks: 6}\nmetric_list: [{metric: exact_match}]\n')
    return tasks


def greedy_answers(model, tok, n: int) -> list[str]:
    from apps.main.generate import GeneratorArgs, generate

    return generate(model, tok, [f"q{i}:" for i in range(n)], GeneratorArgs(max_gen_len=6, until=["\n"]))


def test_simple_evaluate_on_offline_tasks_gives_the_directly_computed_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny_model(), ByteTokenizer()
    greedy = greedy_answers(model, tok, 4)
    targets = [greedy[0], greedy[1], greedy[2] + "!", "never"]  # exactly half are the model's own output
    tasks = write_tasks(tmp_path, targets)
    args = LMHarnessArgs(tasks=["tiny_mc", "tiny_ppl", "tiny_gen"], include_path=str(tasks), bootstrap_iters=10,
                         log_samples=False, verbosity="WARNING")
    results = run_harness(args, model, tok, torch.device("cpu"))["results"]

    lm = LinguaLM(model, tok, torch.device("cpu"))
    docs = [json.loads(line) for line in open(tmp_path / "mc.jsonl")]
    right = 0
    for doc in docs:
        # lm-eval puts its target_delimiter, a space, before each choice
        scores = [lm.score([lm.encode_pair(doc["question"], " " + c)])[0][0] for c in doc["choices"]]
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(right / len(docs))
    assert results["tiny_gen"]["exact_match,none"] == 0.5

    texts = [json.loads(line)["text"] for line in open(tmp_path / "ppl.jsonl")]
    nll = -sum(lm.loglikelihood_rolling([request("loglikelihood_rolling", t)])[0] for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert results["tiny_ppl"]["byte_perplexity,none"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


def test_unknown_task_is_refused_naming_the_key(tmp_path):
    tasks = write_tasks(tmp_path, ["a"])
    args = LMHarnessArgs(tasks=["tiny_mc", "tiny_typo"], include_path=str(tasks))
    from lingua.args import ConfigError

    with pytest.raises(ConfigError, match=r"harness.tasks: \['tiny_typo'\]"):
        run_harness(args, tiny_model(), ByteTokenizer(), torch.device("cpu"))


def eval_rows(dump: Path) -> dict:
    rows = [json.loads(line) for line in open(dump / "metrics.eval.jsonl") if line.strip()]
    return {task: {k: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
            for task, metrics in rows[-1].items() if isinstance(metrics, dict)}


def test_eval_command_on_two_ranks_equals_one(tmp_path):
    model, tok = tiny_model(), ByteTokenizer()
    tasks = write_tasks(tmp_path, greedy_answers(model, tok, 3) + ["no"])
    ckpt = save_model_checkpoint(model, tmp_path / "run/checkpoints/0000000007",
                                 {"model": asdict(model.args), "data": {"tokenizer": {"name": "bytes"}}})
    argv = [f"ckpt_dir={ckpt}", "validation=null", "harness.tasks=[tiny_mc,tiny_ppl,tiny_gen]",
            f"harness.include_path={tasks}", "harness.bootstrap_iters=10", "harness.log_samples=false"]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    one = run_module("apps.main.eval", [*argv, f"dump_dir={tmp_path / 'one'}"], timeout=240, env=env)
    assert one.returncode == 0, failure_report(one)
    two = run_module("torch.distributed.run", ["--nproc-per-node", "2", "-m", "apps.main.eval", *argv,
                                              f"dump_dir={tmp_path / 'two'}"], timeout=240, env=env)
    assert two.returncode == 0, failure_report(two)
    a, b = eval_rows(tmp_path / "one"), eval_rows(tmp_path / "two")
    assert set(a) == {"tiny_mc", "tiny_ppl", "tiny_gen"} and a["tiny_gen"]["exact_match,none"] == 0.75
    for task in a:
        assert b[task] == pytest.approx(a[task], rel=1e-6), task
    results = json.loads((tmp_path / "two/evals/0000000007/results.json").read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == a["tiny_mc"]["acc,none"]


def test_training_loop_on_two_ranks_runs_the_harness_on_whole_replicas(tmp_path, corpus):
    """FSDP on 2 ranks: the in-loop harness scores on unsharded replicas, and its figures equal
    those of the eval command (one process) on the checkpoint saved at the same step."""
    tasks = write_tasks(tmp_path, ["a", "b"])
    dump = tmp_path / "dump"
    harness = {"eval.harness.tasks": "[tiny_mc,tiny_ppl]", "eval.harness.include_path": str(tasks),
               "eval.harness.log_samples": "false", "eval.harness.bootstrap_iters": 10}
    argv = tiny_overrides(corpus, dump, steps=2, **{"checkpoint.eval.every": 2, "checkpoint.dump.every": 2,
                                                    "distributed.dp_shard": 2, "data.load_async": "false",
                                                    **harness})
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = run_module("torch.distributed.run", ["--nproc-per-node", "2", "-m", "apps.main.train", *argv],
                      timeout=300, env=env)
    assert proc.returncode == 0, failure_report(proc)
    rows = [json.loads(line) for line in open(dump / "metrics.eval.jsonl") if line.strip()]
    assert [r["global_step"] for r in rows] == [2]
    assert (dump / "evals/0000000002/results.json").exists()
    again = run_module("apps.main.eval", [f"ckpt_dir={dump}", "validation=null", f"dump_dir={tmp_path / 'again'}",
                                          *[f"{k.removeprefix('eval.')}={v}" for k, v in harness.items()]],
                       timeout=240, env=env)
    assert again.returncode == 0, failure_report(again)
    in_loop, command = eval_rows(dump), eval_rows(tmp_path / "again")
    assert set(in_loop) == {"tiny_mc", "tiny_ppl"}
    for task in in_loop:
        assert in_loop[task] == pytest.approx(command[task], rel=1e-5), task


class RecordingBytes(ByteTokenizer):
    """Bytes, remembering the last token list it decoded (what generation produced)."""

    def decode(self, tokens):
        self.last = list(tokens)
        return super().decode(tokens)


def test_generation_leaves_room_for_the_answer_after_a_long_prompt():
    model, tok = tiny_model(), RecordingBytes()
    with torch.no_grad():
        model.output.weight[tok.eos_id] = 0.0  # no early stop: every answer runs to max_gen_toks
    lm = LinguaLM(model, tok, torch.device("cpu"))
    lm.generate_until([request("generate_until", "z" * 40, {"until": [], "max_gen_toks": 10})])
    assert len(tok.last) == 10  # the prompt kept its last 32 - 10 tokens, as lm-eval's HF model does


def test_a_continuation_longer_than_the_window_is_scored_on_its_tail():
    model, tok = tiny_model(), ByteTokenizer()
    lm = LinguaLM(model, tok, torch.device("cpu"))
    (logprob, _), = lm.loglikelihood([request("loglikelihood", "ab", "c" * 40)])
    whole = tok.encode("ab" + "c" * 40, add_bos=True, add_eos=False)[-(MAX_LEN + 1):]
    assert logprob == pytest.approx(direct_logprob(model, whole, MAX_LEN), abs=1e-4)


def test_the_boundary_is_that_of_the_whole_encoding_with_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from lingua.tokenizer import build_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the function_{i} returns value_{i % 9}" for i in range(400)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=150,
                                   model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0, minloglevel=2)
    tok = build_tokenizer("sp", str(tmp_path / "sp.model"))
    lm = LinguaLM(tiny_model(), tok, torch.device("cpu"))
    text = "the function_3 returns value_3"

    def encodings(cut):
        context, continuation = text[:cut], text[cut:]
        separate = tok.encode(context, add_bos=True, add_eos=False) + tok.encode(continuation, add_bos=False,
                                                                               add_eos=False)
        return context, continuation, separate, tok.encode(text, add_bos=True, add_eos=False)

    # a cut inside a merged piece (not at a space): separate encodings differ from the whole one
    crossing = [c for c in range(4, len(text) - 2) if text[c - 1] != " " and text[c] != " "
                and encodings(c)[2] != encodings(c)[3]]
    assert crossing
    for cut in crossing:
        context, continuation, _, whole = encodings(cut)
        context_ids, continuation_ids = lm.encode_pair(context, continuation)
        own = tok.encode(context, add_bos=True, add_eos=False)
        if len(own) < len(whole):
            assert context_ids + continuation_ids == whole, cut  # lm-eval's boundary: the whole encoding
        else:  # the whole encoding leaves the continuation nothing: the two encoded apart
            assert (context_ids, continuation_ids) == (own, tok.encode(continuation, add_bos=False, add_eos=False))
        assert continuation_ids, cut


def test_a_bad_harness_task_in_a_training_config_stops_before_training(tmp_path, corpus):
    from apps.main.train import TrainArgs, validate_args
    from lingua.args import ConfigError, load_config

    tasks = write_tasks(tmp_path, ["a"])
    args = load_config(TrainArgs, tiny_overrides(corpus, tmp_path / "dump", **{
        "eval.harness.tasks": "[tiny_mcq]", "eval.harness.include_path": str(tasks)}))
    with pytest.raises(ConfigError, match="tiny_mcq"):
        validate_args(args)
    assert not (tmp_path / "dump").exists()
