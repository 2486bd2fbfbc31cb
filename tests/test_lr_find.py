"""The lr range test (apps/main/lr_find.py): what it writes and leaves alone, its divergence
stop, its suggestion rule on known curves, its keys, and 2 ranks under torchrun.

Run as a script under torchrun it is the 2-rank worker: `torchrun ... tests/test_lr_find.py OUT
key=value ...` runs lr_find and writes each rank's result to OUT.rank{R}.json."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.main.lr_find import (
    DIVERGE_FACTOR,
    DIVISOR,
    LRFindArgs,
    exponential_lrs,
    lr_find,
    main,
    smooth,
    smoothing_beta,
    suggest_lr,
)
from apps.main.train import TrainArgs, train
from lingua.args import load_config
from tests.conftest import ROOT, failure_report, tiny_overrides

FAST = {"data.load_async": "false"}  # no loader child process: in-process runs start in milliseconds


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads
    wait on each other (a 30-step range test: 2 s on one, 14 s on two)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # so that set_cpu_threads leaves torch's count alone
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_json_and_png_and_leaves_the_run_alone(corpus, tmp_path, one_thread):
    dump = tmp_path / "run"
    train(load_config(TrainArgs, tiny_overrides(corpus, dump, steps=4, **FAST)))  # a real run: checkpoints/, metrics
    before = _tree(dump)
    assert any(k.startswith("checkpoints/") for k in before)

    find = LRFindArgs(lr_min=1e-4, lr_max=0.1, steps=30)
    result = lr_find(load_config(TrainArgs, tiny_overrides(corpus, dump, **FAST)), find)

    after = _tree(dump)
    assert {k: v for k, v in after.items() if not k.startswith("lr_find/")} == before, "the run's files changed"
    assert sorted(k for k in after if k.startswith("lr_find/")) == [
        "lr_find/lr_find.json", "lr_find/lr_find.log", "lr_find/lr_find.png"]

    saved = json.loads((dump / "lr_find/lr_find.json").read_text())
    assert saved == json.loads(json.dumps(result))
    lrs, losses = saved["lr"], saved["loss"]
    assert saved["stop"]["reason"] == "completed" and len(lrs) == len(losses) == 30
    # What the optimizer ran at: from lr_min, one constant factor per step, up to lr_max.
    assert math.isclose(lrs[0], 1e-4, rel_tol=1e-9) and math.isclose(lrs[-1], 0.1, rel_tol=1e-9)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert np.allclose(ratios, (0.1 / 1e-4) ** (1 / 29), rtol=1e-9)
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0] - 1.0  # it learned
    assert saved["smoothing"]["beta"] == pytest.approx(smoothing_beta(1e-4, 0.1, 30))
    assert saved["smoothed_loss"] == pytest.approx(smooth(losses, saved["smoothing"]["beta"]))
    assert 1e-4 <= saved["suggested_lr"] <= 0.1
    assert saved["suggestion"]["method"] == "end of the descent of the smoothed loss / 3"
    assert saved["suggested_lr"] == pytest.approx(saved["suggestion"]["end_of_descent_lr"] / DIVISOR)

    png = dump / "lr_find/lr_find.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05, "a blank image"


def test_stops_early_when_the_loss_diverges(corpus, tmp_path, one_thread):
    find = LRFindArgs(lr_min=1e-3, lr_max=1e4, steps=60)  # 7 decades: Adam without clipping blows up
    args = load_config(TrainArgs, tiny_overrides(corpus, tmp_path / "d", **FAST, **{"optim.clip": 0}))
    result = lr_find(args, find)
    n = len(result["loss"])
    assert n < 60 and result["stop"] == {"step": n, "reason": result["stop"]["reason"]}
    assert result["stop"]["reason"].startswith("diverged: smoothed loss")
    smoothed = result["smoothed_loss"]
    assert smoothed[-1] > DIVERGE_FACTOR * min(smoothed), smoothed
    for i in range(n - 1):
        assert smoothed[i] <= DIVERGE_FACTOR * min(smoothed[: i + 1]), f"it ran on past a divergence at {i + 1}"
    # The suggestion comes from the part before the divergence.
    assert result["suggested_lr"] < result["lr"][result["suggestion"]["min_index"]]


def test_every_param_group_follows_the_range_at_its_own_ratio():
    """A product-key memory's value table trains at its own lr (value_fixed_lr); the range test
    scales it by the same factor as optim.lr, so the ratio the config chose stays."""
    from apps.main.lr_find import exponential_scheduler
    from apps.main.train import setup_model
    from lingua.distributed import parallel_dims
    from lingua.optim import build_optimizer

    args = load_config(TrainArgs, [
        "dump_dir=/unused", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=64",
        "optim.lr=3e-3", "model.productkey_args.is_enabled=true", "model.productkey_args.layers=1",
        "model.productkey_args.mem_n_keys=8", "model.productkey_args.mem_heads=2", "model.productkey_args.mem_knn=4",
        "model.productkey_args.mem_k_dim=16", "model.productkey_args.value_fixed_lr=1e-2"])
    model = setup_model(args, None, parallel_dims(args.distributed, 1), torch.device("cpu"))
    optimizer, _ = build_optimizer(model, args.optim, 1000)  # cosine with warmup: replaced below
    lrs = exponential_lrs(1e-5, 1.0, 6)
    scheduler = exponential_scheduler(optimizer, args.optim.lr, lrs)
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == [3e-3, 1e-2]
    for lr in lrs:
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(lr * group["initial_lr"] / 3e-3, rel=1e-12)
        optimizer.step()  # no gradients: nothing moves, the schedule advances
        scheduler.step()


def _curve(loss_of_log_lr, lr_min=1e-6, lr_max=1.0, steps=100, noise=0.0, seed=0):
    """(lrs, losses, beta) of a range test whose loss at lr is loss_of_log_lr(log10 lr) + noise."""
    lrs = exponential_lrs(lr_min, lr_max, steps)
    rng = np.random.default_rng(seed)
    losses = [loss_of_log_lr(math.log10(lr)) + noise * rng.standard_normal() for lr in lrs]
    return lrs, losses, smoothing_beta(lr_min, lr_max, steps)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _lm(x):
    """A language model's curve, as the debug model's: a first fall (token frequencies) at 1e-4,
    steeper than the second (context), which ends at 4.4e-3 (95% of the whole fall made), then a
    plateau and divergence past 0.3."""
    return (2.5 + 1.5 * _sigmoid(-6 * (x + 4)) + 1.0 * _sigmoid(-8 * (x + 2.6))
            + (math.exp(4 * (x + 0.5)) if x > -0.5 else 0.0))


def test_suggestion_rule_on_synthetic_curves():
    s = suggest_lr(*_curve(_lm))
    # The end of the second fall, late by the average's lag (at most 3 time constants, 0.75 of a
    # decade), divided by 3; the steepest descent is the first fall, the minimum is on the plateau.
    assert 4.4e-3 <= s["end_of_descent_lr"] < 4.4e-3 * 10**0.75, s
    assert s["suggested_lr"] == pytest.approx(s["end_of_descent_lr"] / 3)
    assert s["steepest_descent_lr"] < 3e-4 and s["lr_at_min"] > 0.1 and not s["notes"], s

    # Noise of the size seen on the debug model's curve (0.15) and more moves it by less than 2x:
    # a tolerance of 5% of the fall alone would be within the noise of the plateau.
    for noise in (0.15, 0.3):
        for seed in range(5):
            noisy = suggest_lr(*_curve(_lm, noise=noise, seed=seed))
            assert s["suggested_lr"] / 2 < noisy["suggested_lr"] < s["suggested_lr"] * 2, (noise, seed, noisy)

    # The classic valley (one fall, then divergence): the end of the fall, before the minimum.
    valley = suggest_lr(*_curve(lambda x: 3 + 2 * _sigmoid(-5 * (x + 3)) + math.exp(3 * (x + 1))))
    assert 1e-3 < valley["end_of_descent_lr"] < valley["lr_at_min"] < 1e-1, valley

    # Still falling at lr_max: the suggestion stays in range and says so.
    falling = suggest_lr(*_curve(lambda x: 3 - 0.5 * x))
    assert falling["end_of_descent_lr"] <= 1.0 and falling["notes"] == [
        "the loss still falls at the last lr: raise lr_max (or steps, if it stopped early)"]

    # Rising from the first step: the range starts too high.
    rising = suggest_lr(*_curve(lambda x: 3 + math.exp(x + 6)))
    assert rising["index"] == 0 and rising["suggested_lr"] == pytest.approx(1e-6 / 3)
    assert rising["notes"] == ["the loss never fell: lower lr_min"]


def test_command_line_takes_its_own_keys_and_says_what_next(corpus, tmp_path, capsys, one_thread):
    dump = tmp_path / "cli"
    main(tiny_overrides(corpus, dump, **FAST, steps=12) + ["lr_min=1e-4", "lr_max=0.1"])  # steps=12: lr_find's
    saved = json.loads((dump / "lr_find/lr_find.json").read_text())
    assert saved["range"] == {"lr_min": 1e-4, "lr_max": 0.1, "steps": 12} and len(saved["lr"]) == 12
    out = capsys.readouterr().out
    assert f"results: {dump / 'lr_find/lr_find.json'}" in out
    assert f"next: python -m apps.main.train config={ROOT / 'apps/main/configs/debug.yaml'} dump_dir={dump}" in out
    assert out.rstrip().endswith(f"optim.lr={saved['suggested_lr']:.3g}") and "lr_min" not in out.split("next:")[1]


@pytest.mark.parametrize("argv, message", [
    (["modell.dim=64"], "unknown config key 'modell.dim'; did you mean 'model'?"),
    (["lr_mni=1e-5"], "unknown config key 'lr_mni'; did you mean lr_find's 'lr_min'?"),
    (["steps=many"], "config key 'steps' expects an int, got 'many'"),
    (["lr_min=1", "lr_max=0.1"], "lr_find needs 0 < lr_min < lr_max"),
])
def test_bad_keys_stop_before_any_work(corpus, tmp_path, capsys, argv, message):
    dump = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_:
        main(tiny_overrides(corpus, dump) + argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not dump.exists()


def test_two_ranks_take_the_same_decisions_and_rank0_writes_once(corpus, tmp_path):
    """FSDP over 2 gloo ranks, each reading its own data: the loss that decides is the global
    mean, so both stop at the same divergence step with the same suggestion (a rank that stopped
    alone would leave the other waiting in a collective)."""
    dump, out = tmp_path / "tr", tmp_path / "out"
    argv = tiny_overrides(corpus, dump, **FAST, **{"distributed.dp_shard": 2, "optim.clip": 0})
    argv = [a for a in argv if not a.startswith("steps=")] + ["lr_min=1e-3", "lr_max=1e4", "steps=60"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests/test_lr_find.py"), str(out), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure_report(proc)
    r0, r1 = (json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1, "the ranks disagree"
    assert r0["world_size"] == 2 and r0["stop"]["reason"].startswith("diverged") and len(r0["loss"]) < 60
    assert sorted(p.name for p in dump.rglob("*") if p.is_file()) == ["lr_find.json", "lr_find.log", "lr_find.png"]
    assert json.loads((dump / "lr_find/lr_find.json").read_text()) == r0
    assert proc.stdout.count("lr_find: suggested optim.lr=") == 1  # rank 0's summary only


if __name__ == "__main__":  # the torchrun worker of the test above
    from apps.main.lr_find import split_argv
    from lingua.distributed import shutdown_distributed

    find, train_argv = split_argv(sys.argv[2:])
    result = lr_find(load_config(TrainArgs, train_argv), find)
    Path(f"{sys.argv[1]}.rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    shutdown_distributed()


def test_explicit_component_lrs_sweep_and_suggest_the_group_that_trains(corpus, tmp_path, capsys, one_thread):
    """base_model_lr=0, memory_lr=1e-3: only the memory trains. The axis is the memory group's
    lr (it was optim.lr's, a group that does not exist) and `next:` sets optim.memory_lr (it
    changed optim.lr alone, which trains nothing here)."""
    dump = tmp_path / "memory"
    slots = {"model.segment_length": 8, "model.use_internal_memory": "true", "model.memory_slots": 4,
             "model.num_mem_heads": 2, "model.bptt_depth": 2, "optim.base_model_lr": 0.0, "optim.memory_lr": 1e-3}
    main(tiny_overrides(corpus, dump, **FAST, **slots, steps=8) + ["lr_min=1e-4", "lr_max=0.1"])
    saved = json.loads((dump / "lr_find/lr_find.json").read_text())
    assert saved["lr_key"] == "optim.memory_lr" and saved["config_lr"] == 1e-3
    assert saved["lr"][0] == pytest.approx(1e-4) and saved["lr"][-1] == pytest.approx(0.1)  # the memory's own lr
    factor = saved["suggested_lr"] / 1e-3
    assert saved["suggested"]["optim.memory_lr"] == pytest.approx(saved["suggested_lr"])
    assert "optim.base_model_lr" not in saved["suggested"]  # frozen stays frozen
    nxt = capsys.readouterr().out.split("next:")[1]
    assert f"optim.memory_lr={saved['suggested_lr']:.3g}" in nxt and "optim.base_model_lr=0.0" in nxt
    assert nxt.count("optim.memory_lr=") == 1
    from apps.main.train import TrainArgs
    from lingua.args import load_config

    config_lr = load_config(TrainArgs, tiny_overrides(corpus, dump, **slots)).optim.lr
    assert saved["suggested"]["optim.lr"] == pytest.approx(config_lr * factor)  # ratios as tested
