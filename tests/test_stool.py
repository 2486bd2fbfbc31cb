"""lingua.stool without a cluster: what it refuses to delete, how it resolves a config's
relative paths and applies training overrides, and what it checks before submitting.

Every job here runs with launcher=bash (the real submit.slurm, run on this machine), so no
SLURM is needed; tests/test_slurm.py submits real jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import failure_report, ROOT, read_losses, write_corpus
from tests.test_slurm import tiny_config

BASH_JOB = ["nodes=1", "ngpu=0", "ncpu=1", "launcher=bash"]


def stool(argv: list[str], cwd: Path = ROOT, code: Path = ROOT, **env) -> subprocess.CompletedProcess:
    """`python -m lingua.stool` run in `cwd`, with lingua/apps imported from `code`."""
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1", **env)
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "lingua.stool", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def fake_repo(path: Path) -> Path:
    for name in ("lingua", "apps", "setup"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    return path


def small_config(corpus: Path, dump: Path, path: Path, **top) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tiny_config(corpus, dump, path, steps=2, **{"checkpoint.dump.every": 2, **top})


# --- override=true / dirs_exists_ok=true must not delete what stool did not write ----------

@pytest.mark.parametrize("protected, mode", [("repo", "override"), ("repo", "dirs_exists_ok"),
                                             ("cwd", "override"), ("home", "override")])
def test_existing_dump_dir_holding_the_repo_cwd_or_home_is_refused(corpus, tmp_path, protected, mode):
    """dump_dir is (a parent of) the code tree, the launch dir or $HOME: even when it holds a
    file stool writes (config.yaml is a common name), nothing in it is deleted or written."""
    dump = tmp_path / "parent"
    dump.mkdir()
    (dump / "config.yaml").write_text("mine: 1\n")
    (dump / "notes.txt").write_text("keep")
    cwd, code, env = ROOT, ROOT, {}
    if protected == "repo":
        cwd = code = fake_repo(dump / "repo")
    elif protected == "cwd":
        cwd = dump / "sub"
        cwd.mkdir()
    else:
        env["HOME"] = str(dump)
    config = small_config(corpus, dump, tmp_path / "cfg/c.yaml")
    before = files_under(dump)
    out = stool([f"config={config}", *BASH_JOB, f"{mode}=true"], cwd=cwd, code=code, **env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"dump_dir {dump}" in out.stderr, out.stderr
    assert files_under(dump) == before


def test_override_refuses_a_dir_that_is_not_a_dump_dir(corpus, tmp_path):
    dump = tmp_path / "mine"
    (dump / "sub").mkdir(parents=True)
    (dump / "notes.txt").write_text("keep")
    (dump / "sub/table.csv").write_text("a,b\n")
    config = small_config(corpus, dump, tmp_path / "c.yaml")
    out = stool([f"config={config}", *BASH_JOB, "override=true"])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"dump_dir {dump}" in out.stderr and "does not look like a dump dir" in out.stderr, out.stderr
    assert files_under(dump) == {"notes.txt", "sub", "sub/table.csv"}


def test_dirs_exists_ok_keeps_a_code_dir_that_stool_did_not_write(corpus, tmp_path):
    """A dump_dir that training wrote (no submit.slurm) but that holds the user's own code/."""
    dump = tmp_path / "run"
    (dump / "code").mkdir(parents=True)
    (dump / "code/analysis.py").write_text("print('mine')\n")
    (dump / "metrics.jsonl").write_text("")
    config = small_config(corpus, dump, tmp_path / "c.yaml")
    out = stool([f"config={config}", *BASH_JOB, "dirs_exists_ok=true"])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"dump_dir {dump}" in out.stderr and "code" in out.stderr, out.stderr
    assert files_under(dump) == {"code", "code/analysis.py", "metrics.jsonl"}


def test_override_replaces_a_previous_dump_dir_and_dirs_exists_ok_resumes_it(corpus, tmp_path):
    dump = tmp_path / "run"
    config = small_config(corpus, dump, tmp_path / "c.yaml")
    first = stool([f"config={config}", *BASH_JOB])
    assert first.returncode == 0, failure_report(first)
    (dump / "stale.txt").write_text("from the first run")

    again = stool([f"config={config}", *BASH_JOB, "override=true"])
    assert again.returncode == 0, failure_report(again)
    assert not (dump / "stale.txt").exists()
    assert sorted(read_losses(dump)) == [1, 2] and (dump / "code/lingua/stool.py").is_file()

    more = stool([f"config={config}", *BASH_JOB, "dirs_exists_ok=true", "steps=4", "checkpoint.dump.every=4"])
    assert more.returncode == 0, failure_report(more)
    assert "resumed from" in more.stdout + more.stderr
    assert sorted(read_losses(dump)) == [1, 2, 3, 4]


# --- shipped configs: relative paths, training overrides, the data check ------------------

def test_relative_config_paths_resolve_against_the_launch_dir(tmp_path):
    """A config written like the shipped ones (./data, ./dump/...) used from the directory it
    names them from: the job runs in its code snapshot, yet reads and writes those paths."""
    launch = tmp_path / "launch"
    write_corpus(launch / "data")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    pre = tiny_config(launch / "data", launch / "pre", tmp_path / "pre.yaml", steps=2,
                      **{"checkpoint.dump.every": 2})
    out = subprocess.run([sys.executable, "-m", "apps.main.train", f"config={pre}"], cwd=launch, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, failure_report(out)

    values = yaml.safe_load(tiny_config(launch / "data", launch / "x", tmp_path / "t.yaml", steps=2).read_text())
    values["dump_dir"] = "./dump/run"
    values["data"]["root_dir"] = "./data"
    values["data"]["tokenizer"]["path"] = "tok/bytes.model"  # the bytes tokenizer never opens it
    values["checkpoint"].update(path="./ckpts", init_ckpt_path="pre/checkpoints/0000000002")
    values["checkpoint"]["dump"]["every"] = 2
    values["eval"] = {"validation": {"root_dir": "./data", "max_steps": 1}}
    (launch / "configs").mkdir()
    (launch / "configs/run.yaml").write_text(yaml.safe_dump(values))

    out = stool(["config=configs/run.yaml", *BASH_JOB], cwd=launch)
    assert out.returncode == 0, failure_report(out)
    dump = launch / "dump/run"
    base = yaml.safe_load((dump / "base_config.yaml").read_text())
    assert base["dump_dir"] == str(dump)
    assert base["data"]["root_dir"] == str(launch / "data")
    assert base["data"]["tokenizer"]["path"] == str(launch / "tok/bytes.model")
    assert base["checkpoint"]["path"] == str(launch / "ckpts")
    assert base["checkpoint"]["init_ckpt_path"] == str(launch / "pre/checkpoints/0000000002")
    assert base["eval"]["validation"]["root_dir"] == str(launch / "data")
    assert sorted(read_losses(dump)) == [1, 2]
    assert (launch / "ckpts/0000000002").is_dir()
    assert f"initialised from {launch / 'pre/checkpoints/0000000002'}" in out.stdout + out.stderr


def test_training_overrides_follow_the_stool_keys(corpus, tmp_path):
    config = small_config(corpus, tmp_path / "unused", tmp_path / "c.yaml")
    dump = tmp_path / "sweep/lr0.01"
    out = stool([f"config={config}", *BASH_JOB, f"dump_dir={dump}", "steps=3", "checkpoint.dump.every=3",
                 "optim.lr=0.01"])
    assert out.returncode == 0, failure_report(out)
    base = yaml.safe_load((dump / "base_config.yaml").read_text())
    assert base["steps"] == 3 and base["optim"]["lr"] == 0.01 and base["dump_dir"] == str(dump)
    assert sorted(read_losses(dump)) == [1, 2, 3] and (dump / "checkpoints/0000000003").is_dir()
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("override, message", [
    ("data.root_dirr=/x", "unknown config key 'data.root_dirr'; did you mean 'data.root_dir'?"),
    ("stepz=3", "unknown config key 'stepz'; did you mean 'steps'?"),
    ("nodez=2", "unknown config key 'nodez'; did you mean 'nodes'?"),
    ("steps=many", "config key 'steps' expects an int, got 'many'"),
    ("modell.dim=8", "unknown config key 'modell.dim'; did you mean 'model'?"),
    ("dump_dir=memory://bucket/run", "is an fsspec URL, but stool puts the job's code, script and SLURM logs"),
])
def test_bad_training_override_fails_before_anything_is_written(corpus, tmp_path, override, message):
    dump = tmp_path / "run"
    config = small_config(corpus, dump, tmp_path / "c.yaml")
    out = stool([f"config={config}", *BASH_JOB, override])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert message in out.stderr, out.stderr
    assert not dump.exists()


@pytest.mark.parametrize("case", ["no root_dir", "no source"])
def test_missing_data_fails_before_submitting(corpus, tmp_path, case):
    launch = tmp_path / "launch"
    launch.mkdir()
    config = small_config(corpus, tmp_path / "run", tmp_path / "c.yaml")
    values = yaml.safe_load(config.read_text())
    if case == "no root_dir":
        values["data"]["root_dir"] = "./data"
        message = f"data.root_dir '{launch / 'data'}' does not exist"
    else:
        values["data"]["sources"] = {"src": 0.5, "nosuch": 0.5}
        message = "data.sources.nosuch: no files"
    config.write_text(yaml.safe_dump(values))
    out = stool([f"config={config}", *BASH_JOB], cwd=launch)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert message in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_memory_parallel_group_across_nodes_is_refused_before_anything_is_written(corpus, tmp_path):
    """nodes=2 with one task each: a memory-parallel pair would span both nodes."""
    dump = tmp_path / "run"
    config = small_config(corpus, dump, tmp_path / "c.yaml")
    layout = ["nodes=2", "ngpu=0", "ncpu=1", "launcher=bash", "distributed.dp_shard=2",
              "distributed.memory_parallel_size=2"]
    out = stool([f"config={config}", *layout])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "memory-parallel group of ranks [0, 1] on nodes [0, 1]" in out.stderr, out.stderr
    assert "nodes=2 x 1 task(s) per node = 2 processes" in out.stderr
    assert not dump.exists()


def test_layout_check_keeps_memory_parallel_groups_within_a_node():
    from lingua.args import ConfigError
    from lingua.distributed import DistributedArgs
    from lingua.stool import StoolArgs, check_layout

    eight_gpu_nodes = StoolArgs(script="apps.main.train", nodes=2, ngpu=8)
    check_layout(eight_gpu_nodes, DistributedArgs(dp_shard=-1, memory_parallel_size=8))  # 8 per node: fits
    check_layout(eight_gpu_nodes, DistributedArgs(dp_replicate=2, dp_shard=8, memory_parallel_size=4))
    with pytest.raises(ConfigError, match=r"ranks \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15\] on nodes \[0, 1\]"):
        check_layout(eight_gpu_nodes, DistributedArgs(dp_shard=16, memory_parallel_size=16))
    # tp_size 2 spaces a group's ranks by 2: memory_parallel_size 8 then needs 16 ranks.
    with pytest.raises(ConfigError, match="memory_parallel_size=8 \\(with tp_size=2\\)"):
        check_layout(eight_gpu_nodes, DistributedArgs(dp_shard=8, tp_size=2, memory_parallel_size=8))
    check_layout(eight_gpu_nodes, DistributedArgs(dp_shard=16, memory_parallel_size=16, memory_parallel_across_nodes=True))
    with pytest.raises(ConfigError, match="must equal the number of processes"):
        check_layout(eight_gpu_nodes, DistributedArgs(dp_shard=8))
