"""dump_dir and checkpoints on any fsspec filesystem: a `memory://` run resumes exactly like a
local one; `file://` is the local filesystem; remote saves commit with a marker, best swaps
survive a crash at every point; unknown or unreachable protocols fail before any work."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import torch

from apps.main.train import TrainArgs, check_storage, train
from lingua.args import ConfigError, load_config
from lingua.checkpoint import (
    BEST, BEST_INFO, BEST_OLD, COMMITTED, CheckpointArgs, CheckpointManager, SaveEvery, list_checkpoints,
    load_model_weights,
)
from lingua.storage import RemotePath, StagedFile, copy_dir, move_dir, resolve, rmtree
from tests.conftest import read_losses, tiny_overrides


@pytest.fixture
def memory_url():
    """A fresh memory:// directory, removed after the test."""
    url = f"memory://lingua-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _args(corpus, dump, **extra) -> TrainArgs:
    return load_config(TrainArgs, tiny_overrides(corpus, dump, **{"data.load_async": "false", **extra}))


def _remote_losses(url: str) -> dict[int, float]:
    with fsspec.open(f"{url}/metrics.jsonl", "r") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["global_step"]: r["loss/out"] for r in rows}


def _weights(ckpt) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (path or RemotePath), loaded into a model of its params."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from apps.main.transformer import LMTransformer, LMTransformerArgs
    from lingua.args import from_dict

    params = json.loads((ckpt / "params.json").read_text())
    model = LMTransformer(from_dict(LMTransformerArgs, params["model"]))
    load_model_weights(ckpt, model)
    return {k: v.clone() for k, v in get_model_state_dict(model).items()}


def test_memory_run_resumes_exactly(corpus, tmp_path, memory_url, monkeypatch):
    """8 steps in one go on local disk == a memory:// run killed right after its step-4 save and
    resumed: same losses at every step, bit-identical final weights; every output is remote."""
    local = tmp_path / "local"
    train(_args(corpus, local, steps=8))

    real_save = CheckpointManager.save

    def save_then_die(self, *args, **kwargs):
        saved = real_save(self, *args, **kwargs)
        raise KeyboardInterrupt(f"killed after saving {saved}")

    monkeypatch.setattr(CheckpointManager, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt, match="0000000004"):
        train(_args(corpus, memory_url, steps=8))
    monkeypatch.setattr(CheckpointManager, "save", real_save)
    assert max(_remote_losses(memory_url)) == 4, "metrics.jsonl was not synced with the checkpoint"
    resumed = train(_args(corpus, memory_url, steps=8))
    assert resumed.step == 8

    assert _remote_losses(memory_url) == read_losses(local)
    remote_ckpts = list_checkpoints(f"{memory_url}/checkpoints")
    assert [p.name for p in remote_ckpts] == ["0000000004", "0000000008"]
    assert all(isinstance(p, RemotePath) and (p / COMMITTED).exists() for p in remote_ckpts)
    a, b = _weights(local / "checkpoints/0000000008"), _weights(remote_ckpts[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    root = resolve(memory_url)
    names = {p.name for p in root.iterdir()}
    assert {"config.yaml", "train.log", "metrics.jsonl", "checkpoints"} <= names
    log = (root / "train.log").read_text()
    assert "resumed from" in log and log.count("model:") == 2, "train.log lost the first run's lines"
    assert not any(p.name.startswith(".tmp_") for p in (root / "checkpoints").iterdir())


def test_file_url_is_the_local_filesystem(corpus, tmp_path):
    """file:// runs write plain directories, renamed into place (no marker), resumable by path."""
    train(_args(corpus, f"file://{tmp_path}/run", steps=4))
    ckpts = list_checkpoints(tmp_path / "run/checkpoints")
    assert [p.name for p in ckpts] == ["0000000004"]
    assert not (ckpts[0] / COMMITTED).exists()
    assert train(_args(corpus, tmp_path / "run", steps=6)).step == 6
    assert sorted(read_losses(tmp_path / "run")) == list(range(1, 7))


def test_remote_best_keep_n_validation_profiler_and_eval(corpus, memory_url):
    """Data, dump_dir and all on memory://: best is a copy of the best validated step,
    total_limit removes old steps, the profiler's trace is uploaded, and apps.main.eval
    validates the remote checkpoint on the remote validation files."""
    data = resolve(f"{memory_url}/data")
    for f in sorted(corpus.rglob("*")):
        if f.is_file():
            (data / f.relative_to(corpus).as_posix()).write_bytes(f.read_bytes())
    state = train(_args(str(data), memory_url, steps=8, **{
        "checkpoint.eval.every": 2, "checkpoint.dump.every": 2, "checkpoint.save_best": "true",
        "checkpoint.total_limit": 2, "profiling.run": "true", "profiling.profile_warmup": 1,
        "profiling.profile_steps": 1}))
    assert state.step == 8
    traces = [p.name for p in (resolve(memory_url) / "profiling").iterdir()]
    assert traces and all(t.startswith("trace_rank0_") for t in traces), traces
    ckpts = resolve(f"{memory_url}/checkpoints")
    assert [p.name for p in list_checkpoints(ckpts)] == ["0000000006", "0000000008"]
    info = json.loads((ckpts / BEST / BEST_INFO).read_text())
    with fsspec.open(f"{memory_url}/metrics.validation.jsonl", "r") as f:
        losses = {r["global_step"]: r["val/src/loss"] for r in map(json.loads, f)}
    assert sorted(losses) == [2, 4, 6, 8] and info["step"] == min(losses, key=losses.get)
    best, of_step = _weights(ckpts / BEST), info["step"]
    if of_step in (6, 8):  # still kept: best is a copy of it
        kept = _weights(ckpts / f"{of_step:010d}")
        assert all(torch.equal(best[k], kept[k]) for k in best)

    from apps.main.eval import main as eval_main

    results = eval_main([f"ckpt_dir={memory_url}", "validation.max_steps=2"])
    with fsspec.open(f"{memory_url}/metrics.validation.jsonl", "r") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["checkpoint"].endswith("checkpoints/0000000008") and last["global_step"] == 8
    assert abs(last["val/src/loss"] - losses[8]) < 1e-6 and results["src"]["loss"] == last["val/src/loss"]


def _manager(url: str) -> CheckpointManager:
    return CheckpointManager(CheckpointArgs(dump=SaveEvery(every=1)), url)


def _fake_ckpt(path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "data.distcp").write_text(text)


@pytest.mark.parametrize("where", ["memory", "local"])
def test_best_swap_recovers_from_a_crash_at_every_point(where, memory_url, tmp_path):
    """Interrupt move_dir after each file copy or removal of a best swap: the next start leaves
    a complete best, the old or the new one, never a mix."""
    url = memory_url if where == "memory" else str(tmp_path / "run")
    root = resolve(url) / "checkpoints"
    outcomes = set()
    for crash_after in range(0, 12):
        manager = _manager(url)
        for p in (root / BEST, root / BEST_OLD, root / ".tmp_best"):
            if p.exists():
                rmtree(p)
        _fake_ckpt(root / BEST, "old")
        (root / BEST / BEST_INFO).write_text('{"step": 1}')
        _fake_ckpt(root / "0000000002", "new")
        (root / "0000000002" / COMMITTED).write_text("")
        if where == "local":  # a local swap is two renames: a crash falls between them or not at all
            if crash_after > 1:
                continue
            if crash_after == 1:
                copy_dir(root / "0000000002", root / ".tmp_best")
                (root / ".tmp_best" / BEST_INFO).write_text('{"step": 2}')
                move_dir(root / BEST, root / BEST_OLD)
            else:
                manager.save_best(root / "0000000002", {"step": 2})
        else:
            calls = {"n": 0}
            fs = root.fs
            real_copy, real_rm_file = fs.copy, fs.rm_file

            def counted(real):
                def wrapper(*a, **k):
                    if calls["n"] >= crash_after:
                        raise OSError("node lost")
                    calls["n"] += 1
                    return real(*a, **k)
                return wrapper

            fs.copy, fs.rm_file = counted(real_copy), counted(real_rm_file)
            try:
                manager.save_best(root / "0000000002", {"step": 2})
            except OSError:
                pass
            finally:
                del fs.copy, fs.rm_file  # back to the class's methods
        _manager(url).remove_stale_tmp()
        best = root / BEST
        assert (best / BEST_INFO).exists(), f"no complete best after a crash after {crash_after} operations"
        step = json.loads((best / BEST_INFO).read_text())["step"]
        assert (best / "data.distcp").read_text() == {1: "old", 2: "new"}[step], "best mixes two copies"
        assert not (root / BEST_OLD).exists() and not (root / ".tmp_best").exists()
        outcomes.add(step)
    assert outcomes == {1, 2}, "the crash points never reached (or never passed) the swap"


def test_uncommitted_remote_checkpoint_is_not_resumed_and_is_removed(memory_url):
    root = resolve(memory_url) / "checkpoints"
    _fake_ckpt(root / "0000000004", "complete")
    (root / "0000000004" / COMMITTED).write_text("")
    _fake_ckpt(root / "0000000008", "half written")  # a save cut off before its commit
    manager = _manager(memory_url)
    assert [p.name for p in manager.existing()] == ["0000000004"]
    manager.remove_stale_tmp()
    assert not (root / "0000000008").exists() and (root / "0000000004").exists()


def test_staged_file_appends_to_the_remote_content(memory_url):
    target = resolve(memory_url) / "metrics.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("row 1\n")
    staged = StagedFile(target)
    with open(staged.local, "a") as f:
        f.write("row 2\n")
    assert target.read_text() == "row 1\n", "uploaded before a sync"
    staged.sync()
    assert target.read_text() == "row 1\nrow 2\n"
    staged.close()
    assert not staged.local.exists(), "the local copy outlived close()"


@pytest.mark.parametrize("key", ["dump_dir", "checkpoint.path", "checkpoint.init_ckpt_path"])
@pytest.mark.parametrize("url, message", [
    ("nosuchproto://bucket/run", "Protocol not known: nosuchproto"),
    ("s3://bucket/run", "Install s3fs"),
])
def test_unknown_or_unavailable_protocol_fails_before_work(corpus, tmp_path, key, url, message):
    dump = tmp_path / "dump"
    args = _args(corpus, url if key == "dump_dir" else dump, **({} if key == "dump_dir" else {key: url}))
    with pytest.raises(ConfigError, match=f"{key}='{url}'.*{message}"):
        train(args)
    assert not dump.exists(), "a run that could not start created its dump_dir"


def test_memory_url_is_refused_for_several_processes(corpus, tmp_path, memory_url):
    args = _args(corpus, memory_url)
    check_storage(args, None, world_size=1)
    with pytest.raises(ConfigError, match="dump_dir=.*one process's memory"):
        check_storage(args, None, world_size=2)
    with pytest.raises(ConfigError, match="async_eval_gpus .* shared filesystem"):
        check_storage(_args(corpus, memory_url, async_eval_gpus=1), None, world_size=1)


def test_lr_find_writes_its_report_to_a_remote_dump_dir(corpus, memory_url):
    from apps.main.lr_find import LRFindArgs, lr_find

    result = lr_find(_args(corpus, memory_url), LRFindArgs(lr_min=1e-4, lr_max=0.1, steps=12))
    out = resolve(memory_url) / "lr_find"
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.log", "lr_find.png"]
    assert json.loads((out / "lr_find.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lr range test" in (out / "lr_find.log").read_text()
