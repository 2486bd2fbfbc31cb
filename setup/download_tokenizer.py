"""Get a tokenizer file: download a known one from the Hugging Face hub, or train one locally.

    python setup/download_tokenizer.py llama3 ./tokenizers/llama3 [--api_key hf_...]
    python setup/download_tokenizer.py <hub repo id> ./tokenizers/x [--filename tokenizer.model]
    python setup/download_tokenizer.py train --kind sp  --vocab_size 8000 --data ./data/stdlib_shuffled ./tokenizers/sp8k
    python setup/download_tokenizer.py train --kind bpe --vocab_size 8000 --data ./data/stdlib_shuffled ./tokenizers/bpe8k

Trained tokenizers need no hub access: `sp` writes a SentencePiece model (tokenizer.model,
byte fallback, bos=1 eos=2), `bpe` writes a byte-level BPE ranks file in tiktoken's format
(tokenizer.model) pre-split with the Llama 3 pattern. Use them with
`data.tokenizer.name=sp|tiktoken data.tokenizer.path=<SAVE_PATH>/tokenizer.model`.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

# Run as `python setup/download_tokenizer.py`: make the repository's lingua package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Hub repo and file of the tokenizers Meta Lingua names (gated repos need --api_key).
KNOWN = {
    "llama2": ("meta-llama/Llama-2-7b-hf", "tokenizer.model"),
    "llama3": ("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model"),
    "gemma": ("google/gemma-2-9b", "tokenizer.model"),
}
# Llama 3's pre-tokenizer split (the same one lingua.tokenizer uses to encode).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXT_SUFFIXES = (".jsonl", ".txt")


def download(name: str, save_path: Path, api_key: str | None, filename: str | None) -> Path:
    repo_id, default_file = KNOWN.get(name, (name, "tokenizer.model"))
    filename = filename or default_file
    from huggingface_hub import hf_hub_download

    save_path.mkdir(parents=True, exist_ok=True)
    path = Path(hf_hub_download(repo_id, filename, local_dir=str(save_path), token=api_key))
    final = save_path / "tokenizer.model"
    if path != final:
        os.replace(path, final)
    return final


def read_texts(data: Path, max_bytes: int) -> Iterator[str]:
    """Documents of *.jsonl and *.txt files under `data`, up to max_bytes. A JSONL record may be
    in any data mode training accepts (text, input/output, prompt/response, chat); all of its
    text is used, chat rendered with the training template."""
    from lingua.data import DataError, document_segments

    files = sorted(p for p in data.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"--data {data}: no {' or '.join(TEXT_SUFFIXES)} files found")
    seen = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".txt":
                lines = ({"text": f.read()},)
            else:
                lines = (json.loads(line) for line in f if line.strip())
            for i, doc in enumerate(lines):
                try:
                    text = "".join(piece for piece, _ in document_segments(doc, f"{path}:{i + 1}"))
                except DataError as e:
                    raise SystemExit(str(e)) from None
                yield text
                seen += len(text.encode("utf-8"))
                if seen >= max_bytes:
                    return


def train_sentencepiece(texts: Iterator[str], vocab_size: int, out: Path) -> Path:
    import sentencepiece as spm

    out.parent.mkdir(parents=True, exist_ok=True)
    # A private prefix: SentencePiece also writes <prefix>.vocab, which must not clobber a user's file.
    prefix = out.parent / f".{out.name}.tmp-{os.getpid()}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for t in texts for line in t.splitlines() if line.strip()),
        model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        # Code needs its whitespace: no NFKC, no collapsing of runs of spaces.
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.replace(f"{prefix}.model", out)
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return out


def train_bpe(texts: Iterator[str], vocab_size: int) -> list[bytes]:
    """Byte-level BPE: the 256 bytes, then merges in the order learned. Pre-tokens are counted
    once, so each merge costs a pass over the distinct pre-tokens, not the corpus."""
    import regex

    if vocab_size <= 256:
        raise SystemExit(f"--vocab_size {vocab_size}: a byte-level BPE needs more than 256 tokens")
    pattern = regex.compile(LLAMA3_PATTERN)
    counts: collections.Counter = collections.Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    words = {tuple(bytes([b]) for b in w.encode("utf-8")): n for w, n in counts.items()}
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < vocab_size:
        pairs: collections.Counter = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties: deterministic
        merged = best[0] + best[1]
        vocab.append(merged)
        new_words = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + n
        words = new_words
    return vocab


def write_tiktoken(vocab: list[bytes], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(vocab)))
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        p = argparse.ArgumentParser(prog="download_tokenizer.py train")
        p.add_argument("--kind", choices=("sp", "bpe"), required=True)
        p.add_argument("--vocab_size", type=int, required=True)
        p.add_argument("--data", type=Path, required=True, help="a folder of *.jsonl (any data mode: text, input/output, chat) or *.txt files")
        p.add_argument("--max_mb", type=float, default=50.0, help="train on at most this much text")
        p.add_argument("save_path", type=Path)
        args = p.parse_args(argv[1:])
        if not args.data.is_dir():
            raise SystemExit(f"--data {args.data} is not a directory")
        # SAVE_PATH ending in .model names the file itself; otherwise it is a folder that
        # receives tokenizer.model, like the downloads.
        out = args.save_path if args.save_path.suffix == ".model" else args.save_path / "tokenizer.model"
        if out.exists():
            raise SystemExit(f"{out} already exists: choose another SAVE_PATH or remove it yourself")
        t0 = time.time()
        texts = read_texts(args.data, int(args.max_mb * 1e6))
        if args.kind == "sp":
            train_sentencepiece(texts, args.vocab_size, out)
            name = "sp"
        else:
            write_tiktoken(train_bpe(texts, args.vocab_size), out)
            name = "tiktoken"
        print(f"trained {args.kind} tokenizer ({args.vocab_size} tokens) in {time.time() - t0:.1f}s -> {out}\n"
              f"use it with: data.tokenizer.name={name} data.tokenizer.path={out}")
        return out
    p = argparse.ArgumentParser(prog="download_tokenizer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"{', '.join(KNOWN)} or a hub repo id (or 'train ...')")
    p.add_argument("save_path", type=Path)
    p.add_argument("--api_key", default=None, help="hub token for gated repos (or HF_TOKEN in the environment)")
    p.add_argument("--filename", default=None, help="file in the repo (default: the known one, else tokenizer.model)")
    args = p.parse_args(argv)
    if args.name not in KNOWN and "/" not in args.name:
        raise SystemExit(f"unknown tokenizer '{args.name}': use one of {', '.join(KNOWN)}, a hub repo id "
                         "(owner/name), or 'train'")
    out = download(args.name, args.save_path, args.api_key, args.filename)
    kind = "tiktoken" if args.name == "llama3" else "sp"
    print(f"downloaded {args.name} -> {out}\nuse it with: data.tokenizer.name={kind} data.tokenizer.path={out}")
    return out


if __name__ == "__main__":
    main()
