"""setup/download_tokenizer.py: tokenizers trained on a local corpus load through
lingua.tokenizer and round-trip; hub downloads go to the right repo and file (hub mocked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lingua.tokenizer import build_tokenizer
from tests.conftest import ROOT, write_corpus

SCRIPT = str(ROOT / "setup" / "download_tokenizer.py")
HELD_OUT = "def held_out(x):\n    return {'ünïcode': x ** 2}  # 12345\n\n\tif x: pass\n"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("tokdata"), n_docs=30) / "src"


@pytest.mark.parametrize("kind, name", [("bpe", "tiktoken"), ("sp", "sp")])
def test_trained_tokenizer_round_trips_and_compresses(data, tmp_path, kind, name):
    out = run("train", "--kind", kind, "--vocab_size", "500", "--data", str(data), str(tmp_path / "tok"))
    assert out.returncode == 0, out.stderr
    path = tmp_path / "tok/tokenizer.model"
    assert f"data.tokenizer.name={name}" in out.stdout
    tok = build_tokenizer(name, str(path))
    ids = tok.encode(HELD_OUT, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == HELD_OUT
    sample = (data / "src.chunk.00.jsonl").read_text()[:5000]
    assert len(tok.encode(sample, add_bos=False, add_eos=False)) < 0.7 * len(sample.encode())


def test_bpe_training_is_deterministic(data, tmp_path):
    for d in ("a", "b"):
        assert run("train", "--kind", "bpe", "--vocab_size", "300", "--data", str(data), str(tmp_path / d)).returncode == 0
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "b/tokenizer.model").read_bytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--kind", "bpe", "--vocab_size", "200", "--data", "DATA", "OUT"], "needs more than 256"),
        (["train", "--kind", "sp", "--vocab_size", "300", "--data", "/nonexistent", "OUT"], "is not a directory"),
        (["llama7", "OUT"], "unknown tokenizer 'llama7'"),
        (["train", "--kind", "bpe", "--vocab_size", "300", "--data", "DATA", "EXISTING"], "already exists"),
    ],
)
def test_bad_input_is_named(data, tmp_path, argv, message):
    existing = tmp_path / "existing"
    (existing).mkdir()
    (existing / "tokenizer.model").write_text("mine")
    subst = {"DATA": str(data), "OUT": str(tmp_path / "out"), "EXISTING": str(existing)}
    out = run(*[subst.get(a, a) for a in argv])
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert (existing / "tokenizer.model").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_download_asks_the_hub_for_the_known_file(tmp_path, monkeypatch):
    """The hub cannot be reached here: hf_hub_download is replaced by a stand-in that records
    the request and writes a file where the real one would."""
    import huggingface_hub

    sys.path.insert(0, str(ROOT / "setup"))
    import download_tokenizer

    asked = []

    def fake_download(repo_id, filename, local_dir, token):
        asked.append((repo_id, filename, token))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("model bytes")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = download_tokenizer.main(["llama3", str(tmp_path / "l3"), "--api_key", "hf_x"])
    assert asked == [("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model", "hf_x")]
    assert out == tmp_path / "l3/tokenizer.model" and out.read_text() == "model bytes"
    download_tokenizer.main(["someone/their-model", str(tmp_path / "other")])
    assert asked[-1] == ("someone/their-model", "tokenizer.model", None)


def test_trains_on_input_output_and_chat_records_and_names_a_bad_line(tmp_path):
    data = tmp_path / "sft"
    data.mkdir()
    rows = [{"input": f"question {i}: what is {i} squared?", "output": f" {i * i}"} for i in range(200)]
    rows += [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}]
    (data / "sft.chunk.00.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run("train", "--kind", "bpe", "--vocab_size", "300", "--data", str(data), str(tmp_path / "tok"))
    assert out.returncode == 0, out.stderr
    tok = build_tokenizer("tiktoken", str(tmp_path / "tok/tokenizer.model"))
    assert tok.decode(tok.encode("question 7: squared", add_bos=False, add_eos=False)) == "question 7: squared"

    (data / "sft.chunk.01.jsonl").write_text(json.dumps({"question": "no known field"}) + "\n")
    bad = run("train", "--kind", "bpe", "--vocab_size", "300", "--data", str(data), str(tmp_path / "tok2"))
    assert bad.returncode != 0 and "sft.chunk.01.jsonl:1" in bad.stderr and "no data field" in bad.stderr
    assert not (tmp_path / "tok2").exists()


def test_save_path_ending_in_model_is_the_file_and_a_folder_path_loads(data, tmp_path):
    (tmp_path / "sp.vocab").write_text("the user's own file")
    out = run("train", "--kind", "sp", "--vocab_size", "400", "--data", str(data), str(tmp_path / "sp.model"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sp.model").is_file()
    assert (tmp_path / "sp.vocab").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp.model", "sp.vocab"]  # no temp files left
    folder = run("train", "--kind", "sp", "--vocab_size", "400", "--data", str(data), str(tmp_path / "dir"))
    assert folder.returncode == 0, folder.stderr
    # data.tokenizer.path may name the folder that holds tokenizer.model.
    assert build_tokenizer("sp", str(tmp_path / "dir")).encode("x = 1") == build_tokenizer(
        "sp", str(tmp_path / "dir" / "tokenizer.model")).encode("x = 1")
