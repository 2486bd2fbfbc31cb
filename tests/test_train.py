"""The training loop end to end on a tiny model: exact resume after SIGKILL, crash-safe
saves, grad accumulation, non-finite loss, finished runs, in-process validation."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apps.main.train import NonFiniteLoss, TrainArgs, train
from lingua.args import load_config
from lingua.checkpoint import CheckpointManager, list_checkpoints
from tests.conftest import ROOT, read_losses, run_module, tiny_overrides


def test_killed_run_resumes_with_identical_losses(corpus, tmp_path):
    """SIGKILL at a random step after the first checkpoint; the resumed run must log
    bit-identical losses to an uninterrupted one (async data loader, CPU, deterministic)."""
    a, b = tmp_path / "a", tmp_path / "b"
    # 60 fast steps, killed within the first half: margin enough that the kill always lands.
    argv = lambda d: tiny_overrides(corpus, d, steps=60, **{"data.load_async": "true"})  # noqa: E731
    done = run_module("apps.main.train", argv(a))
    assert done.returncode == 0, done.stderr[-2000:]

    kill_after = random.Random().randint(5, 30)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "apps.main.train", *argv(b)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if (b / "metrics.jsonl").exists() and max(read_losses(b), default=0) >= kill_after:
                break
        except json.JSONDecodeError:  # caught the trainer mid-line
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(read_losses(b))
    assert killed_at < 60, "the run finished before it could be killed"
    assert list_checkpoints(b / "checkpoints"), "no checkpoint before the kill"

    resumed = run_module("apps.main.train", argv(b))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    la, lb = read_losses(a), read_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 61))
    assert [la[s] for s in la] == [lb[s] for s in la], f"losses differ after resume (killed at step {killed_at})"


def _args(corpus: Path, dump: Path, **extra) -> TrainArgs:
    return load_config(TrainArgs, tiny_overrides(corpus, dump, **extra))


def test_crash_during_save_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    args = _args(corpus, tmp_path / "run", steps=4, **{"data.load_async": "false"})
    train(args)
    manager = CheckpointManager(args.checkpoint, args.dump_dir)
    assert [p.name for p in manager.existing()] == ["0000000004"]

    import lingua.checkpoint as ckpt_module

    real_save = ckpt_module.dcp.save

    def crashing_save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shards written ...
        raise OSError("disk went away")  # ... but the save never completes

    monkeypatch.setattr(ckpt_module.dcp, "save", crashing_save)
    args8 = _args(corpus, tmp_path / "run", steps=8, **{"data.load_async": "false"})
    with pytest.raises(OSError, match="disk went away"):
        train(args8)
    monkeypatch.setattr(ckpt_module.dcp, "save", real_save)
    assert [p.name for p in manager.existing()] == ["0000000004"], "a half-written save became visible"
    assert (tmp_path / "run/checkpoints/.tmp_0000000008").exists()

    # The next start ignores and removes the partial save, resumes from step 4 and finishes.
    state = train(args8)
    assert state.step == 8
    assert not (tmp_path / "run/checkpoints/.tmp_0000000008").exists()
    assert [p.name for p in manager.existing()] == ["0000000004", "0000000008"]


def test_grad_accumulation_matches_larger_batch(corpus, tmp_path):
    """2 micro-batches of B == 1 batch of 2B (same windows: the shuffle buffer holds the same
    number of windows, so the data order is the same)."""
    common = {"data.load_async": "false", "steps": 4, "optim.clip": 0}
    acc = _args(corpus, tmp_path / "acc", grad_acc_steps=2, **{"data.batch_size": 2, "data.prefetch_size": 8}, **common)
    big = _args(corpus, tmp_path / "big", grad_acc_steps=1, **{"data.batch_size": 4, "data.prefetch_size": 4}, **common)
    train(acc)
    train(big)
    la, lb = read_losses(tmp_path / "acc"), read_losses(tmp_path / "big")
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])
    # Parameters after 4 optimizer steps agree too.
    from lingua.checkpoint import load_model_and_optim
    from apps.main.transformer import build_model

    models = []
    for d, a in (("acc", acc), ("big", big)):
        m = build_model(a.model)
        load_model_and_optim(tmp_path / d / "checkpoints/0000000004", m)
        models.append(m)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=0), n


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    args = _args(corpus, tmp_path / "nan", steps=30, **{
        "data.load_async": "false", "optim.lr": 1e30, "optim.warmup": 0, "optim.clip": 0,
        "optim.scheduler": "constant", "checkpoint.dump.every": 1,
    })
    with pytest.raises(NonFiniteLoss, match="loss is"):
        train(args)
    losses = read_losses(tmp_path / "nan")
    saved = [int(p.name) for p in list_checkpoints(tmp_path / "nan/checkpoints")]
    assert saved and max(saved) < 30
    assert all(torch.isfinite(torch.tensor(losses[s])) for s in losses if s <= max(saved))


def test_finished_run_exits_cleanly(corpus, tmp_path):
    args = _args(corpus, tmp_path / "done", steps=3, **{"data.load_async": "false"})
    train(args)
    before = (tmp_path / "done/metrics.jsonl").read_text()
    again = run_module("apps.main.train", tiny_overrides(corpus, tmp_path / "done", steps=3))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout + again.stderr
    assert (tmp_path / "done/metrics.jsonl").read_text() == before
    # Fewer steps than already trained is also a clean exit, not a crash.
    assert run_module("apps.main.train", tiny_overrides(corpus, tmp_path / "done", steps=2)).returncode == 0


def test_eval_cadence_writes_validation_metrics(corpus, tmp_path):
    args = _args(corpus, tmp_path / "ev", steps=4, **{"data.load_async": "false", "checkpoint.eval.every": 2})
    train(args)
    rows = [json.loads(l) for l in open(tmp_path / "ev/metrics.validation.jsonl")]
    assert [r["global_step"] for r in rows] == [2, 4]
    assert all(0 < r["val/src/loss"] < 10 and r["val/src/bpb"] > 0 for r in rows)
    config = (tmp_path / "ev/config.yaml").read_text()
    assert "seq_len: 32" in config and "vocab_size: 258" in config


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.root_dir=/nonexistent/data", "data.root_dir"),
        ("data.sources={nosuch: 1.0}", "data.sources.nosuch"),
        ("data.seq_len=64", "model.max_seqlen"),
        ("steps=0", "steps"),
    ],
)
def test_bad_input_fails_before_work_and_touches_nothing(corpus, tmp_path, override, message):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "precious.txt").write_text("keep")
    out = run_module("apps.main.train", tiny_overrides(corpus, dump) + [override], timeout=120)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert sorted(p.name for p in dump.iterdir()) == ["precious.txt"]
    assert (dump / "precious.txt").read_text() == "keep"


def test_missing_config_file_is_named(tmp_path):
    out = run_module("apps.main.train", [f"config={tmp_path}/nope.yaml", f"dump_dir={tmp_path}/d"], timeout=120)
    assert out.returncode == 2 and "nope.yaml" in out.stderr
    assert not (tmp_path / "d").exists()


def test_compiled_training_matches_eager_and_saves_eager_names(corpus, tmp_path):
    common = {"data.load_async": "false", "steps": 3, "checkpoint.dump.every": 3}
    train(_args(corpus, tmp_path / "eager", **common))
    train(_args(corpus, tmp_path / "compiled", **common, **{"distributed.compile": "true"}))
    le, lc = read_losses(tmp_path / "eager"), read_losses(tmp_path / "compiled")
    for s in le:
        assert abs(le[s] - lc[s]) < 1e-3 * abs(le[s]), (s, le[s], lc[s])
    # Per-block compile keeps parameter names: the checkpoint loads into an eager model.
    from apps.main.transformer import build_model
    from lingua.checkpoint import load_model_and_optim

    args = _args(corpus, tmp_path / "x")
    args.model.vocab_size = 258
    load_model_and_optim(tmp_path / "compiled/checkpoints/0000000003", build_model(args.model))


def test_consolidated_checkpoint_loads_the_same_weights(corpus, tmp_path):
    from apps.main.transformer import build_model
    from lingua.checkpoint import consolidate_checkpoint, load_model_and_optim, load_model_weights

    args = _args(corpus, tmp_path / "c", steps=4, **{"data.load_async": "false"})
    train(args)
    ckpt = tmp_path / "c/checkpoints/0000000004"
    out = consolidate_checkpoint(ckpt)
    assert out == ckpt / "consolidated/consolidated.pth" and (out.parent / "params.json").exists()
    from_dcp, from_file, fresh = build_model(args.model), build_model(args.model), build_model(args.model)
    load_model_and_optim(ckpt, from_dcp)
    load_model_weights(out, from_file)
    x = torch.randint(0, 258, (2, 16))
    with torch.no_grad():
        assert torch.equal(from_dcp(x), from_file(x))
        assert not torch.allclose(fresh(x), from_file(x))
    with pytest.raises(FileNotFoundError, match="not a DCP checkpoint"):
        consolidate_checkpoint(tmp_path)
