"""Export a checkpoint for use outside this codebase.

    python -m apps.main.export ckpt_dir=./dump/debug out=./hf/debug            # Hugging Face Llama
    python -m apps.main.export ckpt_dir=./dump/hybrid_debug out=./pt format=pretrained

format=hf writes what `transformers.LlamaForCausalLM.from_pretrained(out)` loads: config.json,
model.safetensors, generation_config.json, and a SentencePiece tokenizer (tokenizer.model +
tokenizer_config.json) when the run used one. A model with parts Llama cannot hold (product-key
memory, mHC, memory slots or bank, segments, a sliding window) is refused with those keys named;
format=pretrained saves any model with LMTransformer.save_pretrained (config.yaml +
model.safetensors), which LMTransformer.from_pretrained loads. `ckpt_dir` may be a step
checkpoint, a dump dir (its newest checkpoint) or a consolidated one; `precision` defaults to the
run's checkpoint.save_precision. `out` must not exist or be empty: nothing is overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from apps.main.eval import load_model_from_checkpoint, resolve_ckpt_dir
from lingua.args import ConfigError, choice, cli_main
from lingua.checkpoint import SAVE_DTYPES
from lingua.hf import NotLlama, check_dense, hf_config, to_hf_state_dict
from lingua.logger import init_logger
from lingua.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ExportArgs:
    ckpt_dir: str = ""
    out: str = ""
    format: str = choice("hf", ("hf", "pretrained"))
    precision: Optional[str] = None  # fp32 | bf16 | fp16; None: the run's checkpoint.save_precision


def check_out_dir(out: str) -> Path:
    if not out:
        raise ConfigError("out is required (the directory to write)")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"out='{out}' exists and is not an empty directory: not overwriting it")
    return path


def export(args: ExportArgs) -> Path:
    if not args.ckpt_dir:
        raise ConfigError("ckpt_dir is required (a checkpoint dir or a training dump_dir)")
    out = check_out_dir(args.out)
    if args.precision is not None and args.precision not in SAVE_DTYPES:
        raise ConfigError(f"precision must be one of {list(SAVE_DTYPES)}, got {args.precision!r}")
    ckpt = resolve_ckpt_dir(args.ckpt_dir)
    model, _, config = load_model_from_checkpoint(ckpt, torch.device("cpu"))
    dtype = SAVE_DTYPES[args.precision or config.get("checkpoint", {}).get("save_precision", "fp32")]
    if args.format == "pretrained":
        model.save_pretrained(out, dtype)
        logger.info("saved %s with save_pretrained to %s (LMTransformer.from_pretrained loads it)", ckpt, out)
        return out
    try:
        check_dense(model.args)
    except NotLlama as e:
        raise ConfigError(str(e)) from None
    write_hf(model, config, out, dtype)
    logger.info("exported %s to %s (transformers.LlamaForCausalLM.from_pretrained loads it)", ckpt, out)
    return out


def write_hf(model, train_config: dict, out: Path, dtype: torch.dtype) -> None:
    """The HF files, written into a sibling tmp dir and renamed into place when complete."""
    from safetensors.torch import save_file

    tokenizer = dict(train_config.get("data", {}).get("tokenizer", {"name": "bytes"}))
    tok = build_tokenizer(tokenizer.get("name", "bytes"), tokenizer.get("path"))
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in
             to_hf_state_dict(model.state_dict(), model.args).items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.args, tok.bos_id, tok.eos_id, dtype, tokenizer)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "max_length": model.args.max_seqlen}, indent=2))
    if tokenizer.get("name") == "sp":  # the SentencePiece model HF's LlamaTokenizer reads
        shutil.copy(tokenizer["path"], tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": tok.sp.id_to_piece(tok.bos_id),
            "eos_token": tok.sp.id_to_piece(tok.eos_id), "add_bos_token": True, "add_eos_token": False,
            "model_max_length": model.args.max_seqlen, "legacy": False}, indent=2))
    else:
        logger.warning("tokenizer '%s' has no Hugging Face class: exporting the model only (import_hf reads "
                       "config.json's lingua_tokenizer)", tokenizer.get("name"))
    if out.exists():
        out.rmdir()  # empty (check_out_dir)
    os.replace(tmp, out)


def main(argv: Optional[list[str]] = None) -> Path:
    args = cli_main(ExportArgs, argv)
    init_logger(0)
    try:
        return export(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
