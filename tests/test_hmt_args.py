"""The HMT users' command line (apps/hmt/args.py): their commands as written, and each kind of
bad flag stopped with the flag named."""

from __future__ import annotations

import shlex

import pytest

from apps.hmt.args import parse_hmt_args
from lingua.args import ConfigError

TRAIN = """--task_name wikitext --task_config wikitext-103-raw-v1 --batch_size 1 --segment_length 128 --bptt_depth 2
 --num_sensory 32 --mem_recall_context 20 --mem_recall_hidden_dim 1024 --training_step 2000 --eval_step 200
 --learning_rate 3e-6 --lr_decay --lr_decay_gamma 0.8 --use_lora --fp16 --wandb_project wikitext
 --wandb_run opt13b_wiki103_train --num_epochs 5 --save_ckpt ./ckpt_wiki103"""
INFER = """--task_name wikitext --task_config wikitext-103-raw-v1 --batch_size 1 --segment_length 128
 --mem_recall_context 20 --load_from_ckpt ./ckpt_wiki103 --inference_only --test_step 100"""


def test_the_readme_commands_parse_as_written():
    train = parse_hmt_args(shlex.split(TRAIN))
    assert (train.task_name, train.task_config, train.batch_size, train.segment_length) == \
        ("wikitext", "wikitext-103-raw-v1", 1, 128)
    assert (train.num_sensory, train.mem_recall_context, train.mem_recall_hidden_dim) == (32, 20, 1024)
    assert (train.training_step, train.eval_step, train.learning_rate, train.lr_decay_gamma) == (2000, 200, 3e-6, 0.8)
    assert train.lr_decay and train.use_lora and train.fp16 and not train.bf16 and not train.inference_only
    assert (train.wandb_project, train.num_epochs, train.save_ckpt) == ("wikitext", 5, "./ckpt_wiki103")
    assert train.mode == "hmt"
    infer = parse_hmt_args(shlex.split(INFER))
    assert infer.inference_only and infer.load_from_ckpt == "./ckpt_wiki103" and infer.test_step == 100


def test_flag_forms_aliases_key_value_and_config_files(tmp_path):
    (tmp_path / "hmt.yaml").write_text("segment_length: 64\nnum_sensory: 8\n")
    args = parse_hmt_args([f"config={tmp_path / 'hmt.yaml'}", "--task_subset", "wikitext-2-raw-v1",
                           "--sum_fraction=0.25", "bptt_depth=5", "--rmt_only", "--mem_prune", "attention"])
    assert (args.segment_length, args.num_sensory, args.task_config) == (64, 8, "wikitext-2-raw-v1")
    assert (args.sum_fraction, args.bptt_depth, args.mode, args.mem_prune) == (0.25, 5, "rmt", "attention")
    assert parse_hmt_args(["task_subset=pg19"]).task_config == "pg19"


@pytest.mark.parametrize("argv, message", [
    (["--segment_lenght", "12"], "unknown flag --segment_lenght; did you mean --segment_length"),
    (["--bptt_depth", "two"], "bptt_depth"),
    (["--mem_prune", "lru"], "mem_prune"),
    (["--learning_rate"], "--learning_rate needs a value"),
    (["--rmt_only", "--baseline_only"], "exclude each other"),
    (["--fp16", "--bf16"], "exclude each other"),
    (["--inference_only"], "needs --load_from_ckpt"),
    (["--hmt_stage_2"], "stage 1"),
    (["--task_name", "json"], "--data_dir"),
])
def test_bad_flags_are_refused_naming_them(argv, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        parse_hmt_args(argv)
