"""A local Hugging Face Llama directory -> a checkpoint of ours, to evaluate or to continue
pretraining from:

    python -m apps.main.import_hf hf_dir=./hf/llama dump_dir=./dump/from_llama
    python -m apps.main.train config=... checkpoint.init_ckpt_path=./dump/from_llama/checkpoints/0000000000 \\
        model.dim=... (the model keys it prints)

Reads config.json and model.safetensors (or the sharded model.safetensors.index.json), refuses
what our model cannot follow (rope scaling, biases, another activation or architecture) naming
the key, and writes a weights-only DCP checkpoint with its params.json into
<dump_dir>/checkpoints/<step>; an existing checkpoint there is never overwritten. The tokenizer:
config.json's lingua_tokenizer (our own exports), else the directory's tokenizer.model
(SentencePiece), else `tokenizer.name`/`tokenizer.path` given here.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, cli_main, from_dict
from lingua.checkpoint import save_model_checkpoint
from lingua.hf import NotLlama, args_summary, from_hf_state_dict, llama_model_keys
from lingua.logger import init_logger
from lingua.tokenizer import TokenizerArgs

logger = logging.getLogger(__name__)


@dataclass
class ImportArgs:
    hf_dir: str = ""
    dump_dir: str = ""
    step: int = 0  # the checkpoint's step number (its directory name)
    tokenizer: Optional[TokenizerArgs] = None  # None: from the HF directory (see the module doc)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or its index) in '{hf_dir}'")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(hf_dir / name)))
    return state


def hf_tokenizer(hf_dir: Path, config: dict, given: Optional[TokenizerArgs]) -> dict:
    if given is not None:
        return asdict(given)
    if "lingua_tokenizer" in config:
        return dict(config["lingua_tokenizer"])
    if (hf_dir / "tokenizer.model").exists():
        return {"name": "sp", "path": str((hf_dir / "tokenizer.model").resolve())}
    raise ConfigError(f"'{hf_dir}' has no tokenizer we can read (tokenizer.model): set tokenizer.name and "
                      "tokenizer.path")


def import_hf(args: ImportArgs) -> Path:
    if not args.hf_dir or not args.dump_dir:
        raise ConfigError("hf_dir and dump_dir are required")
    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"'{hf_dir / 'config.json'}' not found: hf_dir must be a Hugging Face model directory")
    ckpt = Path(args.dump_dir) / "checkpoints" / f"{args.step:010d}"
    if ckpt.exists():
        raise ConfigError(f"'{ckpt}' exists: not overwriting it (choose another dump_dir or step)")
    config = json.loads((hf_dir / "config.json").read_text())
    try:
        model_keys = llama_model_keys(config)
    except NotLlama as e:
        raise ConfigError(str(e)) from None
    model_args = from_dict(LMTransformerArgs, model_keys)
    tokenizer = hf_tokenizer(hf_dir, config, args.tokenizer)
    try:
        state = from_hf_state_dict(read_hf_weights(hf_dir), model_args)
    except NotLlama as e:
        raise ConfigError(str(e)) from None
    with torch.device("meta"):
        model = LMTransformer(model_args)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)
    if model_args.weight_tying:
        model.output.weight = model.tok_embeddings.weight
    params = {"model": asdict(model_args), "data": {"tokenizer": tokenizer}, "imported_from": str(hf_dir.resolve())}
    save_model_checkpoint(model, ckpt, params)
    print(f"imported {hf_dir} -> {ckpt}\n  continue pretraining: checkpoint.init_ckpt_path={ckpt} "
          f"{args_summary(model_keys)}")
    return ckpt


def main(argv: Optional[list[str]] = None) -> Path:
    args = cli_main(ImportArgs, argv)
    init_logger(0)
    try:
        return import_hf(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
