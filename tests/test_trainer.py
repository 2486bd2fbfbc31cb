"""The trainer's stopping and keeping, end to end on a tiny model: early stopping (and its
counter across a resume), checkpoints/best, a disk that fills up during a save (a real
tmpfs), an out-of-memory step, and the precision of consolidated weights."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.main.train import TrainArgs, train
from lingua.args import load_config
from lingua.checkpoint import DiskFull, consolidate_checkpoint, list_checkpoints, load_model_and_optim
from tests.conftest import ROOT, failure_report, read_losses, tiny_overrides

FAST = {"data.load_async": "false", "logging.freq": 2}


def _args(corpus: Path, dump: Path, **extra) -> TrainArgs:
    return load_config(TrainArgs, tiny_overrides(corpus, dump, **{**FAST, **extra}))


def _validation(dump: Path) -> dict[int, float]:
    return {r["global_step"]: r["val/src/loss"] for r in map(json.loads, open(dump / "metrics.validation.jsonl"))}


def test_early_stopping_stops_at_the_right_step_and_resumes_its_counter(corpus, tmp_path):
    # threshold 10 nats: no evaluation improves that much, so each after the first counts.
    stop = {"checkpoint.eval.every": 2, "early_stopping.threshold": 10.0}
    state = train(_args(corpus, tmp_path / "a", steps=20, **{**stop, "early_stopping.patience": 2}))
    assert state.step == 6 and "early stopping" in state.stop_reason and "best" in state.stop_reason
    assert sorted(_validation(tmp_path / "a")) == [2, 4, 6] and max(read_losses(tmp_path / "a")) == 6
    assert list_checkpoints(tmp_path / "a/checkpoints")[-1].name == "0000000006"  # its last state is saved

    # Patience 3 over a run cut at step 4 (evals at 2: the first best, 4: one without improvement)
    # and resumed: 6 and 8 complete the count. A counter restarted at the resume would stop at 12.
    b = tmp_path / "b"
    assert train(_args(corpus, b, steps=4, **{**stop, "early_stopping.patience": 3})).stop_reason is None
    state = train(_args(corpus, b, steps=20, **{**stop, "early_stopping.patience": 3}))
    assert state.step == 8 and state.stop_reason
    # A run that stopped early stays stopped: started again it does nothing.
    again = train(_args(corpus, b, steps=20, **{**stop, "early_stopping.patience": 3}))
    assert again.step == 8 and max(read_losses(b)) == 8


def test_best_checkpoint_is_the_validation_minimum_and_survives_keep_n_and_resume(corpus, tmp_path):
    """Validation every 2 steps, one step checkpoint kept in all; a run of 8 steps resumed to 15:
    the last save (15) has no validation, so the best one's step checkpoint is removed while
    checkpoints/best, a full copy, stays and loads."""
    run = tmp_path / "run"
    keep = {"checkpoint.eval.every": 2, "checkpoint.save_best": "true", "checkpoint.dump.keep": 1,
            "checkpoint.eval.keep": 1, "checkpoint.total_limit": 1}

    def best_matches_validation() -> int:
        losses = _validation(run)
        best_step = min(losses, key=losses.get)
        info = json.loads((run / "checkpoints/best/best.json").read_text())
        assert info["step"] == best_step and abs(info["value"] - losses[best_step]) < 1e-9 and info["metric"] == "loss"
        return best_step

    train(_args(corpus, run, steps=8, **keep))
    best_matches_validation()
    train(_args(corpus, run, steps=15, **keep))
    best_step = best_matches_validation()
    assert sorted(_validation(run)) == [2, 4, 6, 8, 10, 12, 14]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000000015", "best"]
    best = run / "checkpoints/best"
    assert json.loads((best / "train_state_00000.json").read_text())["step"] == best_step
    assert (best / "params.json").exists()
    from apps.main.transformer import build_model

    model_args = _args(corpus, run).model
    model_args.vocab_size = 258  # the bytes tokenizer's, as train() sets it
    model = build_model(model_args)
    load_model_and_optim(best, model)


def test_a_crash_between_the_step_save_and_save_best_is_mended_on_resume(corpus, tmp_path, monkeypatch):
    """The step checkpoint records the new best (its cadence state) before save_best copies it:
    a crash in between left checkpoints/best at the older step for good, and the final message
    named a step best did not hold. The resumed run copies the recorded best first."""
    from lingua.checkpoint import CheckpointManager

    run = tmp_path / "run"
    keep = {"checkpoint.eval.every": 2, "checkpoint.dump.every": 2, "checkpoint.save_best": "true",
            "optim.lr": 3e-3}
    real = CheckpointManager.save_best
    crashed = []

    def crash_at_step_4(self, step_ckpt, info):
        if info["step"] == 4:
            crashed.append(4)
            raise RuntimeError("killed between the step save and save_best")
        return real(self, step_ckpt, info)

    monkeypatch.setattr(CheckpointManager, "save_best", crash_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        train(_args(corpus, run, steps=6, **keep))
    assert crashed, "step 4 was no new best: the test would check nothing"
    assert json.loads((run / "checkpoints/best/best.json").read_text())["step"] == 2
    monkeypatch.setattr(CheckpointManager, "save_best", real)
    # No evaluation after the resume, so none can copy a better best over the stale one.
    train(_args(corpus, run, steps=6, **{**keep, "checkpoint.eval.every": 1000}))
    losses = _validation(run)
    assert sorted(losses) == [2, 4]
    info = json.loads((run / "checkpoints/best/best.json").read_text())
    assert info["step"] == min(losses, key=losses.get)
    assert json.loads((run / "checkpoints/best/train_state_00000.json").read_text())["step"] == info["step"]


def _mount_tmpfs(path: Path, size_bytes: int) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    """On a real tmpfs with room for one checkpoint and a half: the second save fails with
    DiskFull naming path and bytes, leaves nothing partial, and the first loads and resumes."""
    probe = tmp_path / "probe"
    train(_args(corpus, probe, steps=4))
    size = sum(f.stat().st_size for f in (probe / "checkpoints/0000000004").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, int(size * 1.5) + 64 * 1024)
    try:
        run = disk / "run"
        with pytest.raises(DiskFull) as info:
            train(_args(corpus, run, steps=12))
        msg = str(info.value)
        assert "no space left on device" in msg and str(run / "checkpoints/0000000008") in msg
        assert f"({size}" in msg or "bytes" in msg
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000000004"]
        copy = tmp_path / "copy"
        shutil.copytree(run, copy)
    finally:
        # Lazily: a log handle the run left open would make a plain umount fail ("busy") and leak the mount.
        subprocess.run(["umount", "-l", str(disk)], check=False)
    state = train(_args(corpus, copy, steps=8))
    assert state.step == 8 and sorted(read_losses(copy)) == [1, 2, 4, 6, 8]


def test_out_of_memory_in_a_step_says_what_to_lower(corpus, tmp_path):
    """A step whose logits cannot be allocated (32768 tokens x 262144 vocab, 34 GB, under a
    16 GiB address-space limit): one clear message, exit 1, no checkpoint."""
    dump = tmp_path / "oom"
    argv = tiny_overrides(corpus, dump, **{**FAST, "data.batch_size": 1024, "model.dim": 8, "model.n_heads": 1,
                                           "model.vocab_size": 262144, "data.prefetch_size": 1})
    limit = 16 * 2**30

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "apps.main.train", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=cap_memory)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, failure_report(proc)
    assert "out of memory in step 1" in out, failure_report(proc)
    for advice in ("data.batch_size", "data.seq_len", "selective_activation_checkpointing", "dp_shard",
                   "1024 x 32", "Last good checkpoint: none"):
        assert advice in out, advice
    assert "Traceback" not in out
    assert not list_checkpoints(dump / "checkpoints")


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_consolidated_weights_in_save_precision(corpus, tmp_path, precision, dtype):
    train(_args(corpus, tmp_path / "run", steps=2, **{"checkpoint.dump.every": 2}))
    ckpt = tmp_path / "run/checkpoints/0000000002"
    full = torch.load(consolidate_checkpoint(ckpt, tmp_path / "fp32.pth"), weights_only=True)
    low = torch.load(consolidate_checkpoint(ckpt, tmp_path / "low.pth", precision=precision), weights_only=True)
    assert {v.dtype for v in full["model"].values()} == {torch.float32}
    assert {v.dtype for v in low["model"].values()} == {dtype}
    for k, v in full["model"].items():
        assert torch.equal(low["model"][k], v.to(dtype))
    with pytest.raises(ValueError, match="save_precision"):
        consolidate_checkpoint(ckpt, tmp_path / "x.pth", precision="int8")


PK = {"model.productkey_args.is_enabled": "true", "model.productkey_args.layers": "1",
      "model.productkey_args.mem_n_keys": 16, "model.productkey_args.mem_heads": 2,
      "model.productkey_args.mem_knn": 4, "model.productkey_args.mem_k_dim": 16}


def test_a_frozen_base_stays_bit_identical_while_the_memory_trains(corpus, tmp_path):
    """base_model_lr=0 on a model with a memory layer (and its auxiliary losses on): after 4
    steps every base weight equals its initial value bit for bit, every memory weight moved;
    metrics.jsonl logs each group's lr and each auxiliary term; MFU counts the base forward only."""
    from apps.main.transformer import build_model

    run = tmp_path / "run"
    extra = {**PK, "optim.base_model_lr": 0.0, "optim.memory_lr": 1e-2, "checkpoint.dump.every": 4,
             "model.productkey_args.load_balance_coef": 0.01, "model.productkey_args.z_loss_coef": 1e-3}
    args = _args(corpus, run, steps=4, **extra)
    train(args)
    args.model.vocab_size = 258
    init, trained = build_model(args.model), build_model(args.model)
    load_model_and_optim(run / "checkpoints/0000000004", trained)
    from lingua.optim import param_components

    memory = {n for n, c in param_components(trained).items() if c == "memory"}
    assert any(n.startswith("layers.1.feed_forward.") for n in memory) and any("values" in n for n in memory)
    for (name, p0), (_, p1) in zip(init.named_parameters(), trained.named_parameters()):
        if name in memory:
            assert not torch.equal(p0, p1), f"memory parameter {name} did not train"
        else:
            assert torch.equal(p0, p1), f"frozen base parameter {name} changed"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert rows[-1]["optim/lr_group/memory"] > 0 and "optim/lr_group/memory_values" in rows[-1]
    assert "optim/lr_group/base" not in rows[-1]  # frozen: not in the optimizer
    assert rows[-1]["loss/pk_load_balance"] > 0 and rows[-1]["loss/pk_z_loss"] > 0
    # The same model trained whole does 6 FLOPs per weight; frozen, the base does its forward's 2.
    frozen_flops = rows[-1]["speed/FLOPS"] / rows[-1]["speed/wps"]
    full = build_model(args.model)
    assert frozen_flops < full.flops_per_token(args.data.seq_len)


def test_validation_reads_the_text_field_documents_as_training_does(tmp_path):
    """data.text_field=[instruction, input, output]: validation scores the joined text, every
    token (without it these records would read as input/output, scoring the output only)."""
    from apps.main.eval import validate_file
    from apps.main.transformer import LMTransformerArgs, build_model
    from lingua.tokenizer import build_tokenizer

    records = [{"instruction": "Add.", "input": "2 + 2", "output": "4"},
               {"instruction": "Name a colour.", "input": "", "output": "blue"}]
    path = tmp_path / "sft.val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    model = build_model(LMTransformerArgs(dim=16, n_layers=1, n_heads=1, vocab_size=258, max_seqlen=64))
    fields = ["instruction", "input", "output"]
    sums = validate_file(model, build_tokenizer("bytes", None), path, 64, 2, None, torch.device("cpu"),
                         text_field=fields, separator=" | ")
    texts = [" | ".join(r[f] for f in fields) for r in records]
    assert sums["docs"] == 2 and sums["bytes"] == sum(len(t.encode()) for t in texts)
    assert sums["tokens"] == sums["bytes"] + 2  # every byte and each document's eos
