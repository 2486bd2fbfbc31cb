"""The HMT users' command line, accepted as the reference's README writes it:

    python -m apps.hmt.train --task_name wikitext --task_config wikitext-103-raw-v1 --batch_size 1 \\
        --segment_length 128 --bptt_depth 2 --num_sensory 32 --lr_decay --use_lora ...

`--flag value`, `--flag=value` and, for the switches, a bare `--flag`; the same keys as
`key=value` (stool, YAML configs: `config=hmt.yaml`). Everything goes through lingua.args, so
values are type-checked and an unknown flag is an error naming the closest one. `--task_subset`
is the reference's name for `--task_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Optional

from lingua.args import ConfigError, choice, load_config

ALIASES = {"task_subset": "task_config"}
# The reference's default backbone (hmt_src/main.py): a hub id, downloaded into --cache_dir.
DEFAULT_BACKBONE = "facebook/opt-2.7b"


@dataclass
class HMTCliArgs:
    # data
    task_name: str = "wikitext"  # a hub dataset, or json | parquet | text with --data_dir
    task_config: Optional[str] = None  # the dataset's config, e.g. wikitext-103-raw-v1 (--task_subset)
    data_dir: Optional[str] = None  # local train / validation / test files
    # where hub datasets and models are downloaded; None: the Hugging Face cache (~/.cache/huggingface),
    # not the reference's "." (which fills the working directory with dataset caches)
    cache_dir: Optional[str] = None
    train_set_split: Optional[str] = None  # e.g. "2%" or "1000": the head of the training split
    streaming: bool = False
    shuffle: bool = False
    interleave_dataset: bool = False  # mix every two samples: context switches
    interleave_len: int = 100
    dilate_dataset: bool = False  # insert dilate_len copies of dilate_str into each sample
    dilate_len: int = 888
    dilate_str: str = "$"
    # model
    # an apps/main dump dir, a local HF directory, or a hub id; the default is the reference's
    model_name: str = DEFAULT_BACKBONE
    segment_length: int = 256  # backbone input per segment (text + 2 memory tokens + num_sensory)
    bptt_depth: int = 2
    num_sensory: int = 0
    mem_recall_context: int = 100
    mem_recall_hidden_dim: int = 4096
    sum_fraction: float = 0.5
    mem_prune: str = choice("fifo", ("fifo", "attention"))
    # what recall's query summarises: "previous" segment (causal) or "current" (the paper's, which
    # lets each position see later tokens of its segment: optimistic loss and PPL)
    summary: str = choice("previous", ("previous", "current"))
    dynamic: bool = False  # segments of varying length in training (reading speed varies)
    rmt_only: bool = False
    baseline_only: bool = False
    hmt_stage_1: bool = False
    hmt_stage_2: bool = False
    use_lora: bool = False
    # training
    batch_size: int = 2
    training_step: int = 500  # steps per epoch
    num_epochs: int = 1
    eval_step: int = 100  # validation batches
    test_step: int = 100  # test batches
    learning_rate: float = 1e-5
    lr_decay: bool = False  # StepLR(step_size=100, gamma=lr_decay_gamma)
    lr_decay_gamma: float = 0.8
    fp16: bool = False  # trains in bf16 where the GPU has it (no loss scaling needed), else fp32: a warning says which
    bf16: bool = False
    seed: int = 3407
    save_ckpt: Optional[str] = None  # the run's dump dir
    dump_dir: Optional[str] = None  # the same, as stool and YAML configs name it
    load_from_ckpt: Optional[str] = None
    # inference
    inference_only: bool = False
    generate: Optional[str] = None  # a prompt file: generate with the memory carried over segments
    plot_hist: bool = False  # PNG histogram of which cached memories recall attends to
    wandb_project: Optional[str] = None
    wandb_run: Optional[str] = None
    wandb_entity: Optional[str] = None

    def check(self) -> None:
        picked = [f for f in ("rmt_only", "baseline_only", "hmt_stage_1", "hmt_stage_2") if getattr(self, f)]
        if len(picked) > 1:
            raise ConfigError(f"--{' and --'.join(picked)} exclude each other: pick one")
        if self.save_ckpt and self.dump_dir and os.path.abspath(self.save_ckpt) != os.path.abspath(self.dump_dir):
            raise ConfigError(f"--save_ckpt {self.save_ckpt} and dump_dir={self.dump_dir} name two dump dirs: give one")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 exclude each other")
        if self.inference_only and not self.load_from_ckpt:
            raise ConfigError("--inference_only needs --load_from_ckpt (the checkpoint to evaluate)")
        if self.hmt_stage_2 and not self.load_from_ckpt:
            raise ConfigError("--hmt_stage_2 starts from stage 1: give its checkpoint with --load_from_ckpt")
        if self.plot_hist and self.mode != "hmt":
            raise ConfigError("--plot_hist draws what memory recall attends to: not with --rmt_only, "
                              "--baseline_only or --hmt_stage_1, which have no recall")
        if self.task_name in ("json", "parquet", "text") and not self.data_dir:
            raise ConfigError(f"--task_name {self.task_name} reads local files: give --data_dir")

    @property
    def mode(self) -> str:
        return ("rmt" if self.rmt_only else "baseline" if self.baseline_only
                else "stage1" if self.hmt_stage_1 else "hmt")


def switches(cls: type = HMTCliArgs) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")}


def flags_to_dotlist(argv: list[str], cls: type = HMTCliArgs) -> list[str]:
    """`--flag value` / `--flag=value` / `--switch` -> `flag=value`; `key=value` stays as it is.
    ConfigError naming an unknown flag and the closest known one."""
    names = [f.name for f in dataclasses.fields(cls)]
    on_off = switches(cls)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            key, eq, value = arg.partition("=")
            out.append(f"{ALIASES.get(key, key)}{eq}{value}")
            continue
        name, has_value, value = arg[2:].partition("=")
        name = ALIASES.get(name, name)
        if name not in names:
            close = difflib.get_close_matches(name, names + list(ALIASES), n=1, cutoff=0.5)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"unknown flag --{name}{hint}")
        if not has_value:
            if name in on_off:
                value = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                raise ConfigError(f"--{name} needs a value")
        out.append(f"{name}={value}")
    return out


def parse_hmt_args(argv: list[str]) -> HMTCliArgs:
    args = load_config(HMTCliArgs, flags_to_dotlist(argv))
    args.check()
    return args
