"""Keep-N of CheckpointManager.clean_up, on real step directories."""

from __future__ import annotations

from pathlib import Path

from lingua.checkpoint import CheckpointArgs, CheckpointManager, SaveEvery


def _clean(tmp_path: Path, args: CheckpointArgs, steps, eval_enabled: bool) -> list[int]:
    root = tmp_path / ("eval" if eval_enabled else "noeval")
    for s in steps:
        (root / "checkpoints" / f"{s:010d}").mkdir(parents=True)
    manager = CheckpointManager(args, root, eval_enabled=eval_enabled)
    manager.clean_up()
    return [int(p.name) for p in manager.existing()]


def test_keep_n_without_eval_ignores_the_eval_cadence(tmp_path):
    """dump every 500, keep 1, 10000 steps, no eval: the eval defaults (every 1000, keep all)
    used to pin every 1000th checkpoint (ten kept)."""
    args = CheckpointArgs(dump=SaveEvery(every=500, keep=1))
    assert _clean(tmp_path, args, range(500, 10001, 500), eval_enabled=False) == [10000]


def test_keep_n_with_eval_keeps_each_cadence(tmp_path):
    args = CheckpointArgs(dump=SaveEvery(every=500, keep=2), eval=SaveEvery(every=2000, keep=0))
    kept = _clean(tmp_path, args, list(range(500, 10001, 500)) + [10250], eval_enabled=True)
    assert kept == [2000, 4000, 6000, 8000, 9500, 10000, 10250]
    args = CheckpointArgs(dump=SaveEvery(every=500, keep=1), eval=SaveEvery(every=2000, keep=2))
    assert _clean(tmp_path / "b", args, range(500, 10001, 500), eval_enabled=True) == [8000, 10000]


def test_keep_all_removes_nothing(tmp_path):
    args = CheckpointArgs(dump=SaveEvery(every=500, keep=0), eval=SaveEvery(every=1000, keep=0))
    steps = [500, 1000, 1234, 1500]
    assert _clean(tmp_path, args, steps, eval_enabled=False) == steps
    assert _clean(tmp_path, args, steps, eval_enabled=True) == steps


def test_total_limit_caps_step_checkpoints_and_never_touches_best(tmp_path):
    """keep-all cadences, total_limit 3: the newest three step checkpoints stay; `best` (not a
    step checkpoint) and user files are untouched."""
    args = CheckpointArgs(dump=SaveEvery(every=500, keep=0), eval=SaveEvery(every=1000, keep=0), total_limit=3)
    root = tmp_path / "run"
    (root / "checkpoints/best").mkdir(parents=True)
    (root / "checkpoints/notes.txt").write_text("mine")
    assert _clean(tmp_path, args, range(500, 3001, 500), eval_enabled=True) == [2000, 2500, 3000]
    assert (root / "checkpoints/best").is_dir() and (root / "checkpoints/notes.txt").read_text() == "mine"
    # With keep-N too: the limit applies to what keep-N keeps.
    args = CheckpointArgs(dump=SaveEvery(every=500, keep=0), eval=SaveEvery(every=1000, keep=2), total_limit=1)
    assert _clean(tmp_path / "b", args, range(500, 3001, 500), eval_enabled=True) == [3000]


def test_an_interrupted_best_swap_is_undone_at_start(tmp_path):
    """A crash between save_best's two renames leaves the previous best as .best_old: the next
    start puts it back (or drops it when the new best made it)."""
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".best_old").mkdir(parents=True)
    (ckpts / ".best_old/best.json").write_text('{"step": 4}')
    manager = CheckpointManager(CheckpointArgs(), tmp_path)
    manager.remove_stale_tmp()
    assert (ckpts / "best/best.json").read_text() == '{"step": 4}' and not (ckpts / ".best_old").exists()
    (ckpts / ".best_old").mkdir()
    manager.remove_stale_tmp()
    assert (ckpts / "best").is_dir() and not (ckpts / ".best_old").exists()
