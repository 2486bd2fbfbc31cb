"""Train and evaluate HMT with the HMT users' command line, on apps/main's training loop:

    python -m apps.hmt.train --task_name json --data_dir ./ds --model_name ./dump/debug --batch_size 1 \\
        --segment_length 128 --bptt_depth 2 --num_sensory 32 --mem_recall_context 20 \\
        --mem_recall_hidden_dim 64 --training_step 40 --eval_step 20 --learning_rate 1e-3 --lr_decay \\
        --lr_decay_gamma 0.8 --save_ckpt ./ckpt
    python -m apps.hmt.train --task_name json --data_dir ./ds --model_name ./dump/debug --segment_length 128 \\
        --mem_recall_context 20 --mem_recall_hidden_dim 64 --load_from_ckpt ./ckpt --inference_only --test_step 5

The flags become an HMTTrainArgs (apps/main's TrainArgs plus `hmt`, `backbone` and `task`), run
by apps.main.train.train with HMT's model, loader and tokenizer: the same steps, checkpoints
(DCP, exact resume: `--save_ckpt` is the dump dir), metrics and failures as any run. A training
window holds bptt_depth segments of one document. After training, or with --inference_only, the
validation (--eval_step batches) and test (--test_step batches) splits are scored
(apps/hmt/eval.py): PPL = exp(mean loss per token), to metrics.eval.jsonl.

The backbone (`--model_name`) is an apps/main dump dir or checkpoint (dense, product keys, mHC),
or a Hugging Face causal LM: a local directory or a hub id (downloaded into --cache_dir).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from apps.hmt.args import DEFAULT_BACKBONE, HMTCliArgs, flags_to_dotlist, parse_hmt_args
from apps.hmt.data import DocumentBatches, document_windows, load_texts, split_documents
from apps.hmt.model import HF_LORA_TARGETS, HMT, HFBackbone, HMTArgs, LinguaBackbone, add_lora
from apps.main.eval import resolve_ckpt_dir
from apps.main.train import NonFiniteLoss, StepOutOfMemory, TrainArgs, model_tokenizer, train
from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, choice, from_dict, load_params
from lingua.checkpoint import DiskFull
from lingua.data import DataArgs, DataError
from lingua.tokenizer import TokenizerArgs
from lingua.distributed import shutdown_distributed

logger = logging.getLogger(__name__)



CONFIG_ARGS = HMTCliArgs  # what lingua.stool checks a config against (script=apps.hmt.train)


@dataclass
class HMTTaskArgs:
    task_name: str = "wikitext"
    task_config: Optional[str] = None
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    train_set_split: Optional[str] = None
    shuffle: bool = False
    streaming: bool = False
    interleave_dataset: bool = False
    interleave_len: int = 100
    dilate_dataset: bool = False
    dilate_len: int = 888
    dilate_str: str = "$"


@dataclass
class HMTTrainArgs(TrainArgs):
    hmt: HMTArgs = field(default_factory=HMTArgs)
    backbone: str = ""  # the backbone's checkpoint or HF directory (its weights start the run)
    backbone_kind: str = choice("lingua", ("lingua", "hf"))
    init_from: str = ""  # an HMT checkpoint the run starts from (--load_from_ckpt; stage 2: without recall)
    init_skip: list[str] = field(default_factory=list)  # its keys not loaded (stage 2: recall.)
    task: HMTTaskArgs = field(default_factory=HMTTaskArgs)

    def max_window(self) -> Optional[int]:
        return None  # HMT reads segment_length at a time (HMTArgs.check, against the backbone)


def resolve_backbone(model_name: str, cache_dir: Optional[str]) -> tuple[str, str]:
    """("lingua", checkpoint dir) for an apps/main dump dir or checkpoint; ("hf", directory) for
    a Hugging Face model directory or hub id (downloaded into cache_dir by huggingface_hub)."""
    if not model_name:
        raise ConfigError("--model_name is empty (the backbone: an apps/main dump dir or checkpoint, a Hugging "
                          f"Face model directory or hub id; by default {DEFAULT_BACKBONE})")
    path = Path(model_name)
    if (path / "config.json").exists() and not (path / "params.json").exists():
        return "hf", str(path)
    if path.exists():
        try:
            return "lingua", str(resolve_ckpt_dir(model_name))
        except FileNotFoundError as e:
            raise ConfigError(f"--model_name: {e}") from None
    from huggingface_hub import snapshot_download

    try:  # the real hub code; offline, or a name that is no model, fails here
        return "hf", snapshot_download(model_name, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds; the user needs the name
        raise ConfigError(f"--model_name {model_name}{' (the default)' if model_name == DEFAULT_BACKBONE else ''}: "
                          "not a local checkpoint or model directory, and the hub gave "
                          f"{type(e).__name__}: {e}. Offline, give a local backbone: --model_name DIR (an apps/main "
                          "dump dir, or a Hugging Face model directory)") from None


def hf_model_keys(config: dict) -> dict:
    """Our model keys describing an HF backbone (for the loop's checks and logs; the HF model
    itself is built by transformers)."""
    return {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"], "vocab_size": config["vocab_size"],
            "max_seqlen": config.get("max_position_embeddings") or 2048}


def precision_of_flags(cli: HMTCliArgs, cuda: Optional[bool] = None, cuda_bf16: Optional[bool] = None) -> str:
    """distributed.model_dtype for --fp16 / --bf16. The shared loop has no loss scaling, which
    fp16 needs, so --fp16 trains in bf16 where the GPU has it (the same speed, fp32's range),
    and in fp32 elsewhere (a CPU trains in fp32 whatever the flags); a warning says which."""
    if not (cli.fp16 or cli.bf16):
        return "fp32"
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda_bf16 is None:
        cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    if cli.bf16:
        return "bf16"
    if cuda_bf16:
        logger.warning("--fp16: training in bf16 instead (this GPU has it; fp16 would need loss scaling, bf16 "
                       "does not). Give --bf16 to say so")
        return "bf16"
    logger.warning("--fp16: training in fp32 (%s; fp16 would need loss scaling, which this trainer does not do)",
                   "this GPU has no bf16" if cuda else "a CPU trains in fp32")
    return "fp32"


def window_length(hmt: HMTArgs) -> int:
    """Tokens of a training window: bptt_depth segments of text (2 without truncation), as the reference."""
    return max(hmt.bptt_depth, 1 if hmt.bptt_depth else 2) * hmt.content_length


def to_train_args(cli: HMTCliArgs) -> HMTTrainArgs:
    """The HMT flags as a training config (the backbone's model and tokenizer keys)."""
    kind, ckpt = resolve_backbone(cli.model_name, cli.cache_dir)
    if kind == "lingua":
        model = load_params(Path(ckpt) / "params.json", LMTransformerArgs, "model")
        tokenizer = load_params(Path(ckpt) / "params.json", DataArgs, "data").tokenizer
    else:
        config = json.loads((Path(ckpt) / "config.json").read_text())
        model = from_dict(LMTransformerArgs, hf_model_keys(config))
        # our own exports say which of our tokenizers they use; others bring an HF tokenizer
        tokenizer = from_dict(TokenizerArgs, config["lingua_tokenizer"]) if "lingua_tokenizer" in config \
            else TokenizerArgs(name="hf", path=ckpt)
    hmt = HMTArgs(mode=cli.mode, segment_length=cli.segment_length, num_sensory=cli.num_sensory,
                  mem_recall_context=cli.mem_recall_context, mem_recall_hidden_dim=cli.mem_recall_hidden_dim,
                  sum_fraction=cli.sum_fraction, bptt_depth=cli.bptt_depth, mem_prune=cli.mem_prune, summary=cli.summary,
                  use_lora=cli.use_lora, dynamic=cli.dynamic)
    try:
        hmt.check()
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
    if cli.segment_length > model.max_seqlen:
        raise ConfigError(f"--segment_length {cli.segment_length} exceeds the backbone's max_seqlen "
                          f"{model.max_seqlen} ({ckpt})")
    if cli.load_from_ckpt and not cli.inference_only:  # continue from it; stage 2 adds recall to stage 1
        try:
            args_init = str(resolve_ckpt_dir(cli.load_from_ckpt))
        except FileNotFoundError as e:
            raise ConfigError(f"--load_from_ckpt: {e}") from None
    else:
        args_init = ""
    steps = cli.training_step * cli.num_epochs
    args = HMTTrainArgs(
        name=cli.wandb_run or "hmt",
        dump_dir=cli.save_ckpt or cli.dump_dir or f"./dump/hmt_{cli.task_name.replace('/', '_')}",
        seed=cli.seed, steps=steps, model=model, hmt=hmt, backbone=str(ckpt), backbone_kind=kind,
        init_from=args_init, init_skip=["recall."] if cli.hmt_stage_2 else [],
        task=HMTTaskArgs(cli.task_name, cli.task_config, cli.data_dir, cli.cache_dir, cli.train_set_split, cli.shuffle,
                         cli.streaming, cli.interleave_dataset, cli.interleave_len, cli.dilate_dataset, cli.dilate_len,
                         cli.dilate_str),
    )
    args.data.seq_len = window_length(hmt)
    args.data.batch_size, args.data.tokenizer, args.data.load_async = cli.batch_size, tokenizer, False
    args.optim.lr, args.optim.warmup, args.optim.weight_decay = cli.learning_rate, 0, 0.01
    args.optim.scheduler = "step" if cli.lr_decay else "constant"
    if cli.use_lora:  # the backbone's own weights stay as they are; its adapters and HMT's parameters train
        args.optim.base_model_lr, args.optim.lora_lr, args.optim.memory_lr = 0.0, cli.learning_rate, cli.learning_rate
    args.optim.step_size, args.optim.step_gamma = 100, cli.lr_decay_gamma
    args.distributed.model_dtype = precision_of_flags(cli)
    args.distributed.dp_shard = -1  # torchrun / srun: FSDP over every process
    args.checkpoint.dump.every = args.checkpoint.eval.every = max(1, steps)
    args.logging.freq = max(1, min(50, steps // 10 or 1))
    if cli.wandb_project:
        args.logging.wandb = {"project": cli.wandb_project, "name": cli.wandb_run, "entity": cli.wandb_entity}
    return args


def build_hmt(args: HMTTrainArgs, device: torch.device | str = "cpu") -> HMT:
    """The HMT model on `device` (meta: the loop shards, materialises and initialises it; its
    backbone's initialisation is the backbone checkpoint's weights)."""
    with torch.device(device):
        if args.backbone_kind == "hf":
            from transformers import AutoConfig, AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.backbone), torch_dtype=torch.float32)
            if args.hmt.use_lora:
                add_lora(model, args.hmt, HF_LORA_TARGETS)
            return HMT(HFBackbone(model, weights=args.backbone), args.hmt, args.init_from or None,
                       tuple(args.init_skip))
        model = LMTransformer(args.model)
        if args.hmt.use_lora:
            add_lora(model, args.hmt)
        return HMT(LinguaBackbone(model, weights=args.backbone), args.hmt, args.init_from or None,
                   tuple(args.init_skip))


def hmt_loader(split: str = "train"):
    """The loop's build_loader_fn: this rank's windows of one split's documents."""
    def build(args: HMTTrainArgs, dp_rank: int, dp_size: int, state: Optional[dict]) -> DocumentBatches:
        tokenizer = model_tokenizer(args)
        t = args.task
        # a stream is read as far as the run needs: at least one window per document
        limit = args.steps * args.data.batch_size * dp_size if t.streaming else None
        docs = split_documents(t, split, tokenizer, limit)
        batches = DocumentBatches(document_windows(docs, args.data.seq_len), args.data.batch_size, dp_rank, dp_size,
                                  seed=args.seed, shuffle=t.shuffle or split == "train")
        if state is not None:
            batches.load_state_dict(state)
        return batches
    return build


# What a trained HMT is made of: its parameters' shapes (mode, recall width, LoRA) and how it
# reads a document (segment size, sensory tokens, summary share, recall cache and its pruning).
STRUCTURE = ("mode", "mem_recall_hidden_dim", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "segment_length",
             "num_sensory", "sum_fraction", "mem_recall_context", "mem_prune", "summary")
MODE_FLAGS = ("rmt_only", "baseline_only", "hmt_stage_1", "hmt_stage_2")


def with_trained_structure(cli: HMTCliArgs, ckpt, given: frozenset[str] = frozenset()) -> HMTCliArgs:
    """The command line with the checkpoint's STRUCTURE where the command does not say it: the
    users' inference command need not repeat it. A flag in `given` (said on the command line)
    that differs from the checkpoint is a ConfigError naming it: evaluating num_sensory 0 on a
    model trained with 32 would report a model that was never trained."""
    if not (ckpt / "params.json").exists():
        return cli
    trained = load_params(ckpt / "params.json", HMTArgs, "hmt")
    for key in STRUCTURE:
        ours, theirs = getattr(cli, key, None), getattr(trained, key)
        if not hasattr(cli, key) and key != "mode":
            continue  # lora_r / alpha / dropout: no flags; to_train_args' defaults, then trained_lora
        if ours == theirs:
            continue
        said = [f for f in MODE_FLAGS if f in given] if key == "mode" else [key] if key in given else []
        if said:
            raise ConfigError(f"--{said[0]} gives {key} {ours}, but {ckpt} was trained with {theirs}: drop the flag "
                              "(the checkpoint's is used) or evaluate another checkpoint")
        logger.info("%s=%s from the checkpoint (the default is %s)", key, theirs, ours)
        if key == "mode":
            for flag, mode in zip(MODE_FLAGS, ("rmt", "baseline", "stage1", "hmt")):
                setattr(cli, flag, mode == theirs and flag != "hmt_stage_2")
        else:
            setattr(cli, key, theirs)
    return cli


def trained_lora(hmt: HMTArgs, ckpt) -> HMTArgs:
    """LoRA's rank, alpha and dropout as trained (they have no flags)."""
    if (ckpt / "params.json").exists():
        trained = load_params(ckpt / "params.json", HMTArgs, "hmt")
        hmt.lora_r, hmt.lora_alpha, hmt.lora_dropout = trained.lora_r, trained.lora_alpha, trained.lora_dropout
    return hmt


def main(argv: Optional[list[str]] = None) -> dict:
    from apps.hmt.eval import evaluate_splits
    from lingua.logger import init_logger

    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        cli = parse_hmt_args(argv)
        if cli.inference_only:
            ckpt = resolve_ckpt_dir(cli.load_from_ckpt)
            cli = with_trained_structure(cli, ckpt, frozenset(kv.partition("=")[0] for kv in flags_to_dotlist(argv)))
        args = to_train_args(cli)
        if cli.generate and not Path(cli.generate).is_file():
            raise ConfigError(f"--generate {cli.generate}: no such prompt file")
        # the datasets must load before any work (a missing one fails here, naming it)
        load_texts(args.task.task_name, "test" if cli.inference_only else "train", args.task.task_config,
                   args.task.data_dir, args.task.cache_dir, args.task.train_set_split, limit=1,
                   streaming=args.task.streaming)
        if cli.inference_only:
            init_logger(0)
            ckpt = resolve_ckpt_dir(cli.load_from_ckpt)
            args.hmt = trained_lora(args.hmt, ckpt)
        else:
            train(args, build_model_fn=lambda _, device: build_hmt(args, device), build_loader_fn=hmt_loader(),
                  tokenizer_fn=model_tokenizer)
            ckpt = resolve_ckpt_dir(args.dump_dir)
        # on the saved checkpoint, a whole model per rank, each reading its share of the documents
        results = evaluate_splits(args, ckpt, eval_batches=cli.eval_step, test_batches=cli.test_step,
                                  splits=("test",) if cli.inference_only else ("validation", "test"),
                                  plot_hist=cli.plot_hist, generate_from=cli.generate)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except StepOutOfMemory as e:
        logger.error("%s\nWith HMT: lower --batch_size, --segment_length (the backbone input per segment) or "
                     "--mem_recall_context (memories recall attends over), or --bptt_depth (segments per window)", e)
        raise SystemExit(1) from None
    except (NonFiniteLoss, DiskFull) as e:
        logger.error("%s", e)
        raise SystemExit(1) from None
    shutdown_distributed()
    return results


if __name__ == "__main__":
    main()
