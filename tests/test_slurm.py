"""SLURM launching on a real local cluster (setup/local_slurm.sh), and preemption handling.

Tests marked `slurm` submit real jobs with lingua.stool and skip only where no local SLURM
can run (not root, no sinfo); setup/run_tests.sh starts the cluster first (two nodes: the
one-node jobs here land on either). Multi-node jobs: tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import failure_report, ROOT, read_losses, run_module, tiny_overrides


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


slurm = pytest.mark.skipif(not _slurm_up(), reason="no local SLURM (run: bash setup/local_slurm.sh)")


def tiny_config(corpus: Path, dump: Path, path: Path, **top) -> Path:
    """A YAML training config of the tiny test model (stool takes a file, not overrides)."""
    from lingua.args import _deep_merge, _dotlist_to_dict, load_yaml

    argv = tiny_overrides(corpus, dump, **top)
    values = _deep_merge(load_yaml(ROOT / "apps/main/configs/debug.yaml"), _dotlist_to_dict(argv[1:]))
    values.pop("eval", None)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(values))))
    return path


def stool(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([sys.executable, "-m", "lingua.stool", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def job_id(out: str) -> str:
    match = re.search(r"Submitted batch job (\d+)", out)
    assert match, out
    return match.group(1)


def wait_for_job(job: str, timeout: float) -> int:
    """Wait until the job has left the queue; returns the highest Restarts= seen. A requeued job
    waits two minutes before it may start again (SLURM sets its BeginTime to now + 121 s): that
    hold is lifted (StartTime=now), which changes only when the second run starts. Not at once:
    a batch job started in the second its first run was requeued is killed ("Job credential
    revoked"), so the hold is lifted once it has held for 5 s."""
    restarts, deadline, held_since = 0, time.time() + timeout, None
    while time.time() < deadline:
        info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        m = re.search(r"Restarts=(\d+)", info)
        restarts = max(restarts, int(m.group(1))) if m else restarts
        held = "JobState=PENDING" in info and "Reason=BeginTime" in info and restarts
        held_since = (held_since or time.time()) if held else None
        if held and time.time() - held_since >= 5:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        if not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            return restarts
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still queued after {timeout}s")


STOOL_CPU = ["nodes=1", "ngpu=0", "ncpu=1", "partition=debug"]


@pytest.mark.slurm
@slurm
def test_stool_job_trains_from_its_code_snapshot(corpus, tmp_path):
    """The job runs the snapshot: breaking the source tree after submitting changes nothing."""
    repo = tmp_path / "repo"
    for name in ("lingua", "apps", "setup"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    dump = tmp_path / "dump"
    config = tiny_config(corpus, dump, tmp_path / "c.yaml", steps=40)
    out = stool([f"config={config}", "script=apps.main.train", *STOOL_CPU], cwd=repo)
    assert out.returncode == 0, out.stderr
    job = job_id(out.stdout)
    assert str(dump) in out.stdout and "tail -f" in out.stdout
    (repo / "apps/main/train.py").write_text("raise SystemExit('the job ran the working tree, not its snapshot')\n")

    wait_for_job(job, 240)
    assert (dump / "submit.slurm").exists() and (dump / "code/apps/main/train.py").exists()
    assert "#SBATCH --signal=USR2@120" in (dump / "submit.slurm").read_text()
    assert "--gres" not in (dump / "submit.slurm").read_text()
    assert sorted(read_losses(dump)) == list(range(1, 41)), (dump / f"logs/{job}.stderr").read_text()[-2000:]
    assert (dump / "checkpoints/0000000040").is_dir()


@pytest.mark.slurm
@slurm
def test_usr2_requeues_and_resumes_with_identical_losses(corpus, tmp_path):
    steps = 600  # tiny steps: long enough to be signalled mid-run (after 50), short once resumed
    sub = {}
    for name in ("signalled", "reference"):
        config = tiny_config(corpus, tmp_path / name, tmp_path / f"{name}.yaml", steps=steps,
                             **{"checkpoint.dump.every": 200})
        out = stool([f"config={config}", *STOOL_CPU])
        assert out.returncode == 0, out.stderr
        sub[name] = job_id(out.stdout)

    metrics = tmp_path / "signalled/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 50:
            break
        time.sleep(0.2)
    assert subprocess.run(["scancel", "--signal=USR2", sub["signalled"]]).returncode == 0

    restarts = wait_for_job(sub["signalled"], 400)
    wait_for_job(sub["reference"], 200)
    log = (tmp_path / f"signalled/logs/{sub['signalled']}.stdout").read_text()
    assert restarts >= 1, log[-2000:]
    assert "requeueing SLURM job" in log and "resumed from" in log
    a, b = read_losses(tmp_path / "reference"), read_losses(tmp_path / "signalled")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert [a[s] for s in a] == [b[s] for s in a]


def test_usr2_without_slurm_saves_and_exits_cleanly(corpus, tmp_path):
    """Outside SLURM a USR2 still stops the run cleanly at a step boundary with a checkpoint,
    and the restarted run continues exactly like an uninterrupted one."""
    argv = lambda d: tiny_overrides(corpus, d, steps=400, **{"checkpoint.dump.every": 1000})  # noqa: E731
    ref = run_module("apps.main.train", argv(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen([sys.executable, "-m", "apps.main.train", *argv(tmp_path / "b")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "b/metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and sum(1 for _ in open(metrics)) >= 20):
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    stopped = max(read_losses(tmp_path / "b"))
    assert stopped < 400 and "not inside a SLURM job" in out
    assert (tmp_path / f"b/checkpoints/{stopped:010d}").is_dir()
    again = run_module("apps.main.train", argv(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert read_losses(tmp_path / "b") == read_losses(tmp_path / "ref")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["script=apps.main.train"], "nodes must be given"),
        (["script=apps.main.train", "nodes=0"], "nodes must be given and >= 1"),
        (["script=apps.main.train", "nodes=1", "nodez=2"], "unknown config key 'nodez'"),
        (["script=apps.nosuch.train", "nodes=1"], "script 'apps.nosuch.train' is not an importable module"),
        (["script=apps.main.train", "nodes=1", "EXISTING"], "already exists"),
        (["script=apps.main.train", "nodes=1", "BADKEY"], "unknown config key 'modell.dim'"),
    ],
)
def test_bad_stool_input_fails_before_submitting(corpus, tmp_path, argv, message):
    dump = tmp_path / "dump"
    config = tiny_config(corpus, dump, tmp_path / "c.yaml")
    if "EXISTING" in argv:
        dump.mkdir()
        (dump / "precious.txt").write_text("keep")
    if "BADKEY" in argv:
        bad = yaml.safe_load(config.read_text())
        bad["modell"] = {"dim": 8}
        config.write_text(yaml.safe_dump(bad))
    argv = [a for a in argv if a not in ("EXISTING", "BADKEY")]
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout if shutil.which("squeue") else ""
    out = stool([f"config={config}", "ngpu=0", "partition=debug", *argv])
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    if (dump / "precious.txt").exists():
        assert sorted(p.name for p in dump.iterdir()) == ["precious.txt"]
    else:
        assert not dump.exists()
    if shutil.which("squeue"):
        assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


@pytest.mark.slurm
@slurm
def test_eval_jobs_from_training_write_to_the_training_dump_dir(corpus, tmp_path):
    dump = tmp_path / "run"
    argv = tiny_overrides(corpus, dump, steps=4, async_eval_gpus=0, **{
        "checkpoint.eval.every": 2, "checkpoint.dump.every": 2, "eval.validation.max_steps": 3,
        "data.load_async": "false"})
    out = run_module("apps.main.train", argv)
    assert out.returncode == 0, out.stderr
    jobs = re.findall(r"submitted eval job (\d+) for step (\d+)", out.stdout + out.stderr)
    assert [int(step) for _, step in jobs] == [2, 4], out.stdout[-2000:]
    for job, _ in jobs:
        wait_for_job(job, 240)
    rows = [json.loads(line) for line in open(dump / "metrics.validation.jsonl")]
    assert sorted(r["global_step"] for r in rows) == [2, 4]
    assert all(r["val/src/loss"] > 0 and r["val/src/bpb"] > 0 for r in rows)
    assert (dump / "evals/0000000002/eval.yaml").exists()
    assert "--gres" not in (dump / "evals/0000000002/submit.slurm").read_text()


@pytest.mark.slurm
@slurm
def test_srun_two_task_eval(corpus, tmp_path):
    """`srun -n 2 python -m apps.main.eval` splits the documents over 2 SLURM tasks (gloo)."""
    dump = tmp_path / "run"
    assert run_module("apps.main.train", tiny_overrides(corpus, dump, steps=2)).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(["srun", "-n", "2", "-c", "1", sys.executable, "-u", "-m", "apps.main.eval",
                          f"ckpt_dir={dump}", "validation.max_steps=1000"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, failure_report(out)
    rows = [json.loads(line) for line in open(dump / "metrics.validation.jsonl")]
    from apps.main.eval import main as eval_main

    single = eval_main([f"ckpt_dir={dump}", f"dump_dir={tmp_path / 'single'}", "validation.max_steps=1000"])
    assert rows[-1]["val/src/docs"] == single["src"]["docs"] == 6
    assert abs(rows[-1]["val/src/loss"] - single["src"]["loss"]) < 1e-5


def test_usr2_under_torchrun_stops_every_rank_at_the_same_step(corpus, tmp_path):
    """The signal reaches the two workers at different moments; they agree on one step, save
    one checkpoint and exit 0 through torchrun. No SLURM variables are read."""
    dump = tmp_path / "tr"
    argv = tiny_overrides(corpus, dump, steps=3000, **{"distributed.dp_shard": 2, "checkpoint.dump.every": 10000})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "apps.main.train", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = dump / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and sum(1 for _ in open(metrics)) >= 20):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "apps.main.train"], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[0]), signal.SIGUSR2)
    time.sleep(0.05)
    os.kill(int(workers[1]), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    saved = [p.name for p in (dump / "checkpoints").iterdir()]
    assert len(saved) == 1 and int(saved[0]) < 3000
    assert sorted(p.name for p in (dump / "checkpoints" / saved[0]).glob("train_state_*")) == [
        "train_state_00000.json", "train_state_00001.json"]
