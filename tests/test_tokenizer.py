"""Tests for lingua/tokenizer.py: bytes, SentencePiece and tiktoken behind one interface.

The SentencePiece model and the tiktoken BPE file are made here from text the tests
write, so nothing is downloaded.
"""

from __future__ import annotations

import base64
import collections
import re
from pathlib import Path

import pytest

from lingua.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    TokenizerArgs,
    _split_for_tiktoken,
    build_tokenizer,
)

WORDS = (
    "memory layer product key value query attention residual stream token batch "
    "window gradient optimizer schedule warmup checkpoint shard rank node train eval "
    "the a of and to in is for with on model data loss step learning rate"
).split()


def corpus_lines(n: int = 400) -> list[str]:
    # A fixed pseudo-random word salad: enough distinct pieces for a 200-piece vocab.
    lines = []
    for i in range(n):
        k = 4 + (i * 7) % 9
        lines.append(" ".join(WORDS[(i * 13 + j * j * 5 + j) % len(WORDS)] for j in range(k)) + f" {i}.")
    return lines


MIXED_TEXT = "Héllo wörld — naïve café, 日本語 and emoji 🎉!\nline two\ttab"


# ---------------------------------------------------------------- bytes


def test_bytes_round_trip_and_framing() -> None:
    tok = build_tokenizer("bytes")
    assert isinstance(tok, Tokenizer) and isinstance(tok, ByteTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (256, 257, 258)
    ids = tok.encode(MIXED_TEXT)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == list(MIXED_TEXT.encode("utf-8"))
    assert tok.decode(ids) == MIXED_TEXT
    assert tok.encode("ab", add_bos=False, add_eos=False) == [97, 98]
    assert tok.encode("ab", add_bos=False) == [97, 98, 257]
    assert tok.encode("ab", add_eos=False) == [256, 97, 98]
    assert all(0 <= t < tok.n_words for t in ids)


def test_bytes_decode_half_character_does_not_crash() -> None:
    tok = build_tokenizer("bytes")
    ids = tok.encode("é", add_bos=False, add_eos=False)  # two bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode([256] + list(b"ok") + [257, 300]) == "ok"


def test_tokenizer_args_defaults() -> None:
    args = TokenizerArgs()
    assert (args.name, args.path) == ("bytes", None)
    assert isinstance(build_tokenizer(args.name, args.path), ByteTokenizer)


# ---------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    text = d / "corpus.txt"
    text.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    prefix = d / "tiny"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=200,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def test_sp_round_trip(sp_model: Path) -> None:
    tok = build_tokenizer("sp", str(sp_model))
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, 200)
    text = corpus_lines()[5]
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert 2 < len(ids) < len(text)  # pieces, not characters
    assert all(0 <= t < tok.n_words for t in ids)
    assert tok.decode(ids) == text
    # Characters the tiny model never saw map to <unk>; decoding must still work.
    assert isinstance(tok.decode(tok.encode(MIXED_TEXT)), str)
    # pad, negative and padded-vocab ids are dropped rather than crashing decode.
    assert tok.decode([3, -1, 500] + tok.encode(text, add_bos=False, add_eos=False)) == text


# ---------------------------------------------------------------- tiktoken


def train_bpe(text: str, n_merges: int) -> dict[bytes, int]:
    """Tiny byte-level BPE: ranks 0..255 are single bytes, then merges in learned order."""
    ranks = {bytes([i]): i for i in range(256)}
    words = collections.Counter(re.findall(r" ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]+|\s+", text))
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w, seq in seqs.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[w] = merged
    return ranks


def write_bpe(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text(
        "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks.items())
    )


@pytest.fixture(scope="module")
def bpe_text() -> str:
    return "\n".join(corpus_lines(200))


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory, bpe_text: str) -> tuple[Path, int]:
    pytest.importorskip("tiktoken")
    ranks = train_bpe(bpe_text, 60)
    path = tmp_path_factory.mktemp("tt") / "tiny.tiktoken"
    write_bpe(path, ranks)
    return path, len(ranks)


def test_tiktoken_special_layout_and_round_trip(bpe_file: tuple[Path, int], bpe_text: str) -> None:
    path, n_base = bpe_file
    assert n_base > 256
    tok = build_tokenizer("tiktoken", str(path))
    assert tok.bos_id == n_base and tok.eos_id == n_base + 1
    assert tok.n_words == n_base + 256
    ids = tok.encode(bpe_text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == bpe_text
    body = tok.encode(bpe_text, add_bos=False, add_eos=False)
    assert len(body) < len(bpe_text.encode("utf-8")) * 0.8  # merges are used
    assert all(0 <= t < n_base for t in body)
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT


def test_tiktoken_special_text_in_documents_is_ordinary(bpe_file: tuple[Path, int]) -> None:
    path, _ = bpe_file
    tok = build_tokenizer("tiktoken", str(path))
    text = "before <|end_of_text|> after <|begin_of_text|>"
    body = tok.encode(text, add_bos=False, add_eos=False)
    assert tok.bos_id not in body and tok.eos_id not in body
    assert tok.decode(body) == text


def test_tiktoken_rewritten_file_is_not_served_stale(tmp_path: Path, bpe_text: str) -> None:
    # tiktoken caches BPE files by path; a file replaced in place must load fresh.
    pytest.importorskip("tiktoken")
    path = tmp_path / "bpe.tiktoken"
    write_bpe(path, train_bpe(bpe_text, 10))
    assert build_tokenizer("tiktoken", str(path)).bos_id == 266
    write_bpe(path, train_bpe(bpe_text, 20))
    assert build_tokenizer("tiktoken", str(path)).bos_id == 276


def test_tiktoken_long_inputs(bpe_file: tuple[Path, int]) -> None:
    path, _ = bpe_file
    tok = build_tokenizer("tiktoken", str(path))
    text = "word " * 90_000 + " " * 30_000 + "x" * 30_000 + " tail"
    pieces = list(_split_for_tiktoken(text))
    assert "".join(pieces) == text
    assert max(len(p) for p in pieces) <= 400_000
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------- errors


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"'wordpiece'.*bytes, sp, tiktoken"):
        build_tokenizer("wordpiece")


@pytest.mark.parametrize("name", ["sp", "tiktoken"])
def test_missing_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer\.path"):
        build_tokenizer(name)
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as info:
        build_tokenizer(name, str(missing))
    assert "data.tokenizer.path" in str(info.value)
