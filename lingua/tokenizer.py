"""Tokenizers behind one interface: raw UTF-8 bytes, SentencePiece and tiktoken BPE.

Owns `TokenizerArgs` (config key `data.tokenizer`), the `Tokenizer` interface
(`n_words`, `bos_id`, `eos_id`, `encode`, `decode`) and `build_tokenizer`.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

# The config key users set to point at a tokenizer file; named in every error so
# that a failing run says which line of the YAML to fix.
PATH_KEY = "data.tokenizer.path"

TOKENIZER_NAMES = ("bytes", "sp", "tiktoken", "hf")


@dataclass
class TokenizerArgs:
    """`data.tokenizer` in configs; field names as in Meta Lingua."""

    name: str = "bytes"  # "bytes" | "sp" | "tiktoken" | "hf" (a Hugging Face tokenizer directory)
    path: Optional[str] = None


class Tokenizer(abc.ABC):
    """What the data pipeline and the generator need from any tokenizer."""

    n_words: int
    bos_id: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos."""

    @abc.abstractmethod
    def decode(self, tokens: list[int]) -> str:
        """Text of `tokens`; special and out-of-range ids are dropped, never raised on."""

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte; bos/eos sit just above the byte range (as Meta Lingua)."""

    def __init__(self) -> None:
        self.bos_id = 256
        self.eos_id = 257
        self.n_words = 258

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return self._frame(list(text.encode("utf-8")), add_bos, add_eos)

    def decode(self, tokens: list[int]) -> str:
        # errors="replace": a window can cut a multi-byte character in half, and
        # decoding a sample must never crash because of it.
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


def _check_file(name: str, path: Optional[str]) -> str:
    if not path:
        raise FileNotFoundError(
            f"tokenizer '{name}' needs a model file: set {PATH_KEY} (it is empty)"
        )
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
        # The folder setup/download_tokenizer.py saves into.
        return os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer '{name}': file not found: {path!r} (from {PATH_KEY}). {how_to_get(name, path)}")
    return path


def how_to_get(name: str, path: str) -> str:
    """How to get the tokenizer file `path` names: setup/download_tokenizer.py's commands."""
    folder = os.path.dirname(path) if os.path.basename(path) == "tokenizer.model" else path
    known = os.path.basename(os.path.normpath(folder))
    kind = "bpe" if name == "tiktoken" else "sp"
    hub = (f"python setup/download_tokenizer.py {known} {folder} --api_key hf_... (from the hub; gated), or "
           if known in ("llama2", "llama3", "gemma") else "")
    return (f"Get one: {hub}train one on your data, no hub needed: python setup/download_tokenizer.py train "
            f"--kind {kind} --vocab_size 32000 --data <your data dir> {folder}; or use data.tokenizer.name=bytes")


def _import_optional(module: str, tokenizer_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"tokenizer '{tokenizer_name}' needs the '{module.split('.')[0]}' package: "
            f"pip install {module.split('.')[0]}"
        ) from e


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model file; bos/eos ids are the model's own."""

    def __init__(self, path: Optional[str]) -> None:
        path = _check_file("sp", path)
        spm = _import_optional("sentencepiece", "sp")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.n_words = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        # SentencePiece reports -1 for a disabled piece; the data pipeline would then
        # write -1 into token windows, so refuse the model up front.
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {path!r} (from {PATH_KEY}) has no bos or eos piece "
                f"(bos_id={self.bos_id}, eos_id={self.eos_id}); train it with bos_id and eos_id >= 0"
            )
        self._drop = {self.bos_id, self.eos_id, int(self.sp.pad_id())}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return self._frame(list(self.sp.encode(text)), add_bos, add_eos)

    def decode(self, tokens: list[int]) -> str:
        # ids >= n_words appear when the model's embedding is padded past the vocab.
        kept = [t for t in tokens if 0 <= t < self.n_words and t not in self._drop]
        return self.sp.decode(kept)


# Llama 3's pre-tokenizer split: contractions, letter runs, up to 3 digits,
# punctuation runs, newlines, whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256

# tiktoken's regex pass can be very slow or overflow its stack on huge inputs and
# on long runs of only whitespace or only non-whitespace, so inputs are cut first.
_MAX_PIECE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_RUN_CHARS + 1, _MAX_RUN_CHARS + 1))


def _split_for_tiktoken(text: str) -> Iterator[str]:
    """Pieces of `text`, each at most 400k chars with no same-class run over 25k chars."""
    for start in range(0, len(text), _MAX_PIECE_CHARS):
        piece = text[start : start + _MAX_PIECE_CHARS]
        pos = 0
        for m in _LONG_RUN.finditer(piece):
            if m.start() > pos:
                yield piece[pos : m.start()]
            for s in range(m.start(), m.end(), _MAX_RUN_CHARS):
                yield piece[s : min(s + _MAX_RUN_CHARS, m.end())]
            pos = m.end()
        if pos < len(piece):
            yield piece[pos:]


class TikTokenizer(Tokenizer):
    """A tiktoken BPE ranks file with Llama 3's split pattern and special-token layout.

    The n_base mergeable ranks come first; 256 special tokens follow:
    <|begin_of_text|> (bos) = n_base, <|end_of_text|> (eos) = n_base + 1, then
    <|reserved_special_token_{i}|>. Llama 3's tokenizer.model gives bos 128000, eos 128001.
    """

    def __init__(self, path: Optional[str]) -> None:
        path = _check_file("tiktoken", path)
        tiktoken = _import_optional("tiktoken", "tiktoken")
        tiktoken_load = _import_optional("tiktoken.load", "tiktoken")

        self.path = path
        # load_tiktoken_bpe caches files by *path* in a temp dir; passing the hash of
        # the current contents makes a file rewritten at the same path load fresh
        # instead of silently returning the stale cached ranks.
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        try:
            ranks = tiktoken_load.load_tiktoken_bpe(path, expected_hash=digest)
        except ValueError as e:
            raise ValueError(f"cannot parse tiktoken BPE file {path!r} (from {PATH_KEY}): {e}") from e
        if not ranks:
            raise ValueError(f"tiktoken BPE file {path!r} (from {PATH_KEY}) holds no ranks")
        n_base = len(ranks)
        specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [
            f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - 2)
        ]
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(specials)}
        self.model = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.n_base = n_base
        self.n_words = n_base + NUM_RESERVED_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        # encode_ordinary: "<|end_of_text|>" written inside a document is plain text,
        # never a control token injected by the data.
        ids: list[int] = []
        for piece in _split_for_tiktoken(text):
            ids.extend(self.model.encode_ordinary(piece))
        return self._frame(ids, add_bos, add_eos)

    def decode(self, tokens: list[int]) -> str:
        return self.model.decode([t for t in tokens if 0 <= t < self.n_base])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory (`AutoTokenizer`), e.g. an HF backbone's (apps/hmt):
    its own text -> ids, framed with its bos/eos here (a model without a bos uses its eos)."""

    def __init__(self, path: Optional[str]) -> None:
        transformers = _import_optional("transformers", "hf")
        if not path:
            raise ValueError("data.tokenizer.path must name the Hugging Face tokenizer directory for name=hf")
        self.path = path
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        self.n_words = len(self.tok)
        eos = self.tok.eos_token_id
        bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else eos
        if bos is None or eos is None:
            raise ValueError(f"the tokenizer in '{path}' has neither a bos nor an eos token")
        self.bos_id, self.eos_id = int(bos), int(eos)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return self._frame(self.tok(text, add_special_tokens=False)["input_ids"], add_bos, add_eos)

    def decode(self, tokens: list[int]) -> str:
        return self.tok.decode([t for t in tokens if 0 <= t < self.n_words], skip_special_tokens=True)


def build_tokenizer(name: str, path: Optional[str] = None) -> Tokenizer:
    """Tokenizer `name` ("bytes" | "sp" | "tiktoken" | "hf"), loading its file from `path`."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "hf":
        return HFTokenizer(path)
    if name == "sp":
        return SentencePieceTokenizer(path)
    if name == "tiktoken":
        return TikTokenizer(path)
    raise ValueError(
        f"unknown tokenizer {name!r} (data.tokenizer.name); valid: {', '.join(TOKENIZER_NAMES)}"
    )
