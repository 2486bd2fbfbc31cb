"""The seed trainers' commands, run as their users write them, on stand-in data made here.

The hybrid's commands run from a working directory holding datasets/io_pairs (made by the
seed's data_proc/prepare_io_data.py) and tokenizers/llama2/tokenizer.model (trained by
setup/download_tokenizer.py); llama_hybrid.yaml is a GPU-sized model, so the training commands
take the seed's arguments as written followed by SMALL (our keys, shrinking model and run).
The HMT command runs without --model_name: its default backbone is a tiny stand-in in the
Hugging Face cache layout under the default's hub id (the hub itself cannot be reached here).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, failure_report

SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seqlen=64", "data.seq_len=64",
         "model.segment_length=16", "model.memory_slots=4", "model.num_mem_heads=2", "model.external_memory_size=64",
         "model.retrieval_k=8", "model.retrieval_layer_index=1", "model.use_gpu_to_search=false",
         "distributed.model_dtype=fp32", "distributed.selective_activation_checkpointing=false", "steps=4",
         "checkpoint.dump.every=2", "checkpoint.eval.every=2", "eval.validation.max_steps=2", "logging.freq=1",
         "data.load_async=false", "optim.warmup=1"]


def run(cmd: list[str], cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """datasets/io_pairs from two line-aligned files, through the seed's prep command, and a
    SentencePiece tokenizer trained on them where llama_hybrid.yaml looks for Llama 2's."""
    work = tmp_path_factory.mktemp("seed")
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    (work / "in.txt").write_text("".join(" ".join(rng.choices(words, k=rng.randint(2, 12))) + " =>\n"
                                         for _ in range(80)))
    (work / "out.txt").write_text("".join(" ".join(rng.choices(words, k=rng.randint(1, 6))) + "\n" for _ in range(80)))
    proc = run([sys.executable, str(ROOT / "data_proc/prepare_io_data.py"), "--input_file", "in.txt",
                "--output_file", "out.txt", "--save_dir", "datasets/io_pairs"], work)
    assert proc.returncode == 0, failure_report(proc)
    assert (work / "datasets/io_pairs/io_pairs.chunk.00.jsonl").exists()
    assert list((work / "datasets/io_pairs/test").glob("*.jsonl"))
    return work


def with_tokenizer(work: Path) -> Path:
    if not (work / "tokenizers/llama2/tokenizer.model").exists():
        proc = run([sys.executable, str(ROOT / "setup/download_tokenizer.py"), "train", "--kind", "sp",
                    "--vocab_size", "300", "--data", "datasets/io_pairs", "tokenizers/llama2"], work)
        assert proc.returncode == 0, failure_report(proc)
    return work


def test_train_without_the_tokenizer_says_how_to_get_one(workdir):
    if (workdir / "tokenizers").exists():
        pytest.skip("the tokenizer was already trained in this module")
    proc = run([sys.executable, str(ROOT / "train.py"), "model=llama_hybrid", "train.batch_size=4",
                "train.learning_rate=1e-4"], workdir)
    assert proc.returncode == 2, failure_report(proc)
    error = proc.stderr.strip().splitlines()[-1]
    assert "tokenizers/llama2/tokenizer.model" in error and "setup/download_tokenizer.py train" in error
    assert not (workdir / "dump").exists()  # refused before any work


@pytest.fixture(scope="module")
def trained(workdir) -> Path:
    """`python train.py model=llama_hybrid train.batch_size=4 train.learning_rate=1e-4`."""
    work = with_tokenizer(workdir)
    proc = run([sys.executable, str(ROOT / "train.py"), "model=llama_hybrid", "train.batch_size=4",
                "train.learning_rate=1e-4", *SMALL], work)
    assert proc.returncode == 0, failure_report(proc)
    assert "train.batch_size=4 -> data.batch_size=4" in proc.stdout
    assert "train.learning_rate=1e-4 -> optim.lr=1e-4" in proc.stdout
    return work / "dump" / "llama_hybrid"


def test_train_maps_the_seed_keys_and_keeps_the_best_checkpoint(trained):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 4 and config["optim"]["lr"] == pytest.approx(1e-4)
    assert config["model"]["use_internal_memory"] and config["model"]["use_external_memory"]
    assert config["checkpoint"]["save_best"]
    assert (trained / "checkpoints/best/best.json").exists()


def test_eval_resolves_best_model_pt_to_the_best_checkpoint(trained):
    work = trained.parents[1]
    proc = run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", "checkpoints/best_model.pt",
                "--test_data", "datasets/io_pairs/test"], work)
    assert proc.returncode == 0, failure_report(proc)
    assert "ckpt_dir=dump/llama_hybrid/checkpoints/best" in proc.stdout
    rows = [json.loads(line) for line in open(trained / "metrics.eval.jsonl")]
    assert any(k.startswith("pairs/") for k in rows[-1]), rows[-1]


def test_eval_refuses_a_file_and_an_unknown_flag(trained, tmp_path):
    from apps.main.seed import map_eval_argv
    from lingua.args import ConfigError

    (tmp_path / "model.pt").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="is a file"):
        map_eval_argv(["--checkpoint", "model.pt"], cwd=tmp_path)
    with pytest.raises(ConfigError, match="did you mean --test_data"):
        map_eval_argv(["--checkpoint", "x", "--test_dat", "y"], cwd=tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint found"):
        map_eval_argv(["--checkpoint", "checkpoints/best_model.pt"], cwd=tmp_path)


def test_train_refuses_an_unknown_seed_key():
    from apps.main.seed import map_train_argv
    from lingua.args import ConfigError

    with pytest.raises(ConfigError, match="did you mean train.batch_size"):
        map_train_argv(["model=llama_hybrid", "train.batchsize=4"])
    with pytest.raises(ConfigError, match="did you mean model=llama_hybrid"):
        map_train_argv(["model=llama_hybrd"])


@pytest.mark.distributed
def test_torchrun_on_four_processes(workdir):
    """`torchrun --nproc_per_node=4 train.py model=llama_hybrid train.batch_size=2`: FSDP over 4
    ranks with validation (each rank's documents differ), the mapping printed once."""
    work = with_tokenizer(workdir)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", str(ROOT / "train.py"),
                "model=llama_hybrid", "train.batch_size=2", *SMALL, "dump_dir=dump/four"], work, timeout=240)
    assert proc.returncode == 0, failure_report(proc)
    assert proc.stdout.count("the seed's arguments as ours") == 1
    assert [json.loads(line)["global_step"] for line in open(work / "dump/four/metrics.jsonl")] == [1, 2, 3, 4]
    assert (work / "dump/four/checkpoints/best/best.json").exists()


def test_train_hybrid_script(workdir):
    """`bash scripts/train_hybrid.sh` (one process without a GPU), our keys after it."""
    work = with_tokenizer(workdir)
    proc = run(["bash", str(ROOT / "scripts/train_hybrid.sh"), *SMALL, "steps=2", "dump_dir=dump/script"], work)
    assert proc.returncode == 0, failure_report(proc)
    assert "torchrun --nproc_per_node=1 train.py model=llama_hybrid" in proc.stdout
    assert len(open(work / "dump/script/metrics.jsonl").readlines()) == 2


def test_hybrid_llama_config_imports_from_the_seed_path():
    import torch

    proc = run([sys.executable, "-c", "from src.models.hybrid_llama import HybridLlamaConfig, HybridLlama; "
                "print(HybridLlamaConfig().memory_slots)"], ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "128", failure_report(proc)
    from src.models.hybrid_llama import HybridLlama, HybridLlamaConfig

    config = HybridLlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               max_position_embeddings=64, segment_length=16, memory_slots=4, num_mem_heads=2,
                               external_memory_size=64, retrieval_k=8, retrieval_layer_index=1,
                               use_gpu_to_search=False)
    assert (config.dim, config.n_layers, config.bos_id) == (32, 2, 1)
    tokens = torch.randint(2, 64, (2, 48))
    tokens[:, 0] = 1
    loss = HybridLlama(config)(tokens, target=tokens)
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="did you mean hidden_size"):
        HybridLlamaConfig(hiden_size=32)


def tiny_opt_in_hub_cache(cache: Path, repo_id: str, texts: list[str]) -> Path:
    """A tiny OPT (random weights, a BPE tokenizer trained on `texts`) where huggingface_hub's
    cache keeps `repo_id`: offline, snapshot_download finds it as it would the real model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(snapshot)
    config = OPTConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(snapshot)
    return snapshot


def test_hmt_reference_command_with_fp16_and_the_default_backbone(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from apps.hmt.args import DEFAULT_BACKBONE

    texts = {split: [f"def {split}_{i}(x):\n    return x * {i} + {i % 3}\n" * 3 for i in range(n)]
             for split, n in (("train", 12), ("validation", 3), ("test", 3))}
    (tmp_path / "ds").mkdir()
    for split, docs in texts.items():
        (tmp_path / "ds" / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    flags = ["--task_name", "json", "--data_dir", "ds", "--batch_size", "1", "--segment_length", "16",
             "--bptt_depth", "2", "--num_sensory", "2", "--mem_recall_context", "4", "--mem_recall_hidden_dim", "8",
             "--training_step", "2", "--eval_step", "1", "--test_step", "1", "--learning_rate", "3e-6",
             "--lr_decay", "--lr_decay_gamma", "0.8", "--use_lora", "--fp16", "--save_ckpt", "./ckpt"]
    # Offline with nothing cached: one line naming the default and the local route.
    proc = run([sys.executable, str(ROOT / "hmt_src/main.py"), *flags], tmp_path, **offline)
    assert proc.returncode == 2
    assert f"--model_name {DEFAULT_BACKBONE} (the default)" in proc.stderr and "--model_name DIR" in proc.stderr
    tiny_opt_in_hub_cache(tmp_path / "hub", DEFAULT_BACKBONE, texts["train"])
    proc = run([sys.executable, str(ROOT / "hmt_src/main.py"), *flags], tmp_path, **offline)
    assert proc.returncode == 0, failure_report(proc)
    assert "--fp16: training in fp32 (a CPU trains in fp32" in proc.stderr
    assert (tmp_path / "ckpt/checkpoints/0000000002").is_dir()
    assert "test PPL" in proc.stderr + proc.stdout


def test_fp16_is_bf16_where_the_gpu_has_it_else_fp32():
    from apps.hmt.args import parse_hmt_args
    from apps.hmt.train import precision_of_flags

    fp16 = parse_hmt_args(["--fp16"])
    assert precision_of_flags(fp16, cuda=True, cuda_bf16=True) == "bf16"
    assert precision_of_flags(fp16, cuda=True, cuda_bf16=False) == "fp32"
    assert precision_of_flags(fp16, cuda=False, cuda_bf16=False) == "fp32"
    assert precision_of_flags(parse_hmt_args([]), cuda=True, cuda_bf16=True) == "fp32"
    assert precision_of_flags(parse_hmt_args(["--bf16"]), cuda=True, cuda_bf16=True) == "bf16"
