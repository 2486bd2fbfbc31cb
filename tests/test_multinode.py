"""Multi-node SLURM for real, on one machine: two slurmd (nodes n1, n2, one CPU each) started by
`setup/local_slurm.sh --nodes 2`, jobs submitted with `lingua.stool nodes=2` as on a cluster.

The module switches the local cluster to two nodes for its tests (as root; a running two-node
cluster is used as it is) and puts the one-node layout back afterwards; it skips, saying why,
where a second node cannot be started. Marker `multinode`; the tests that run whole 2-node jobs
are also `slow` (about three and a half minutes on 2 cores in all): CI leaves them out with
-m "not (multinode and slow)", `bash setup/run_tests.sh -m multinode` runs them all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, failure_report, read_losses, tiny_overrides
from tests.test_hmt_train import backbone as hmt_backbone, dataset as hmt_dataset  # noqa: F401 (fixtures)
from tests.test_slurm import job_id, stool, wait_for_job


def _ready_nodes() -> int:
    if shutil.which("sinfo") is None:
        return 0
    out = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%D %t"], capture_output=True, text=True).stdout
    return sum(int(n) for n, state in (line.split() for line in out.splitlines())
               if state.startswith(("idle", "mix", "alloc")))


pytestmark = [pytest.mark.slurm, pytest.mark.multinode]


@pytest.fixture(scope="module", autouse=True)
def two_node_cluster():
    """Two nodes in partition debug for this module's jobs. The one-node layout (all CPUs on one
    node) is put back afterwards, since other jobs ask for more CPUs than one of these nodes has."""
    before = _ready_nodes()
    if before >= 2:
        yield
        return
    if shutil.which("sinfo") is None or os.geteuid() != 0:
        pytest.skip("needs a local SLURM with 2 nodes in partition debug (as root: bash setup/local_slurm.sh --nodes 2)")
    out = subprocess.run(["bash", "setup/local_slurm.sh", "--nodes", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0 or _ready_nodes() < 2:
        pytest.skip(f"could not start a second SLURM node: {(out.stdout + out.stderr)[-800:]}")
    yield
    restore = ["bash", "setup/local_slurm.sh"] if before else ["bash", "setup/local_slurm.sh", "stop"]
    subprocess.run(restore, cwd=ROOT, capture_output=True, timeout=300)


TWO_NODES = ["nodes=2", "ngpu=0", "ncpu=1", "partition=debug"]
STEPS = 120  # tiny steps (about 0.2 s each here, 2 nodes on 2 cores): enough to be signalled mid-run


def launch_env() -> dict:
    """This environment without the SLURM / torchrun variables of any job the tests run in."""
    from lingua.distributed import clean_env

    return dict(clean_env(), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def job_config(corpus: Path, dump: Path, path: Path, **top) -> Path:
    """The tiny test model as a YAML config for stool, with its validation (for eval jobs)."""
    from lingua.args import _deep_merge, _dotlist_to_dict, load_yaml

    argv = tiny_overrides(corpus, dump, steps=STEPS, **{"checkpoint.dump.every": 50, "checkpoint.eval.keep": 0, **top})
    values = _deep_merge(load_yaml(ROOT / "apps/main/configs/debug.yaml"), _dotlist_to_dict(argv[1:]))
    path.write_text(yaml.safe_dump(json.loads(json.dumps(values))))
    return path


def submit(config: Path, *extra: str) -> str:
    out = stool([f"config={config}", "script=apps.main.train", *TWO_NODES, *extra])
    assert out.returncode == 0, out.stderr
    return job_id(out.stdout)


def job_log(dump: Path, job: str) -> str:
    return "".join((dump / f"logs/{job}.{s}").read_text() for s in ("stdout", "stderr") if (dump / f"logs/{job}.{s}").exists())


def max_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    return max(abs(a[s] - b[s]) for s in a)


@pytest.fixture(scope="module")
def one_node(corpus, tmp_path_factory) -> dict[int, float]:
    """The reference: one node, two processes under torchrun (FSDP over both)."""
    dump = tmp_path_factory.mktemp("one_node") / "run"
    env = launch_env()
    argv = tiny_overrides(corpus, dump, steps=STEPS, **{"checkpoint.dump.every": 50, "distributed.dp_shard": 2})
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "apps.main.train", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, failure_report(out)
    return read_losses(dump)


@pytest.fixture(scope="module")
def two_node_fsdp(corpus, tmp_path_factory) -> tuple[Path, str, list[str]]:
    """A 2-node job, FSDP across the nodes, asking for an eval job at its last step:
    (dump_dir, job id, eval job ids), every job finished."""
    root = tmp_path_factory.mktemp("two_node_fsdp")
    dump = root / "run"
    config = job_config(corpus, dump, root / "c.yaml", async_eval_gpus=0, **{
        "distributed.dp_shard": 2, "checkpoint.eval.every": STEPS, "eval.validation.max_steps": 2})
    job = submit(config)
    wait_for_job(job, 300)
    evals = re.findall(r"submitted eval job (\d+) for step", job_log(dump, job))
    for eval_job in evals:
        wait_for_job(eval_job, 300)
    return dump, job, evals


@pytest.mark.slow
def test_two_node_fsdp_job_matches_one_node_two_processes(two_node_fsdp, one_node):
    dump, job, _ = two_node_fsdp
    log = job_log(dump, job)
    assert f"job {job} (restart 0) on n[1-2]" in log
    assert "2 process(es) via slurm: dp_replicate=1 dp_shard=2" in log, log[-3000:]
    # The master address is n1's NodeAddr (scontrol), not a DNS lookup of "n1".
    assert re.search(r"rank 0 of 2 on node 0: rendezvous at 127\.0\.0\.1:\d+", log), log[-3000:]
    assert sorted(p.name for p in (dump / f"checkpoints/{STEPS:010d}").glob("train_state_*")) == [
        "train_state_00000.json", "train_state_00001.json"]
    worst = max_difference(read_losses(dump), one_node)
    assert worst <= 1e-5, f"2-node job vs 1-node 2-process run: max loss difference {worst:.2e}"


@pytest.mark.slow
def test_eval_job_of_a_two_node_job_writes_to_its_dump_dir(two_node_fsdp):
    dump, _, evals = two_node_fsdp
    assert len(evals) == 1
    rows = [json.loads(line) for line in open(dump / "metrics.validation.jsonl")]
    assert [r["global_step"] for r in rows] == [STEPS] and rows[0]["val/src/loss"] > 0


@pytest.mark.slow
def test_hsdp_two_node_job_requeued_by_usr2_resumes_exactly(corpus, tmp_path, two_node_fsdp, one_node):
    """HSDP with the replicas on different nodes; USR2 mid-run: both nodes save at one step, the
    job requeues once and its losses equal the uninterrupted jobs' (HSDP computes what FSDP does)."""
    dump = tmp_path / "hsdp"
    job = submit(job_config(corpus, dump, tmp_path / "c.yaml", **{"distributed.dp_replicate": 2}))
    metrics = dump / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and sum(1 for _ in open(metrics)) >= 20):
        time.sleep(0.2)
    assert subprocess.run(["scancel", "--signal=USR2", job]).returncode == 0
    restarts = wait_for_job(job, 400)
    log = job_log(dump, job)
    assert restarts == 1 and log.count("requeueing SLURM job") == 1, log[-3000:]
    assert "2 process(es) via slurm: dp_replicate=2 dp_shard=1" in log and "resumed from" in log
    # The save the signal asked for, then the requeue (which stops the job before it logs more).
    stopped = [int(s) for s in re.findall(r"saved checkpoint \S+/(\d{10})\n[^\n]*requeueing SLURM job", log)]
    assert len(stopped) == 1 and 20 <= stopped[0] < STEPS, log[-3000:]
    assert sorted(p.name for p in (dump / f"checkpoints/{stopped[0]:010d}").glob("train_state_*")) == [
        "train_state_00000.json", "train_state_00001.json"]  # both nodes, at the same step
    losses = read_losses(dump)
    worst_fsdp = max_difference(losses, read_losses(two_node_fsdp[0]))
    worst_one = max_difference(losses, one_node)
    assert worst_fsdp <= 1e-5 and worst_one <= 1e-5, (worst_fsdp, worst_one)


@pytest.mark.slow
def test_hsdp_shards_within_each_node_and_replicates_across_nodes(corpus, tmp_path):
    """dp_replicate=2 x dp_shard=2 on 2 nodes x 2 tasks (srun -n 4 --overcommit: a node has one CPU):
    each shard group is a node's two tasks, the replicas are the nodes. The losses equal a
    one-node 4-process FSDP run's (the same 4 data-parallel ranks, the same batches)."""
    env = launch_env()
    steps = {"steps": 16, "checkpoint.dump.every": 16}
    ref = tmp_path / "one_node"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                          "-m", "apps.main.train", *tiny_overrides(corpus, ref, **steps, **{"distributed.dp_shard": 4})],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, failure_report(out)
    dump = tmp_path / "two_nodes"
    hsdp = {"distributed.dp_replicate": 2, "distributed.dp_shard": 2}
    out = subprocess.run(["srun", "-N", "2", "-n", "4", "--overcommit", "--distribution=block", "-p", "debug",
                          sys.executable,
                          "-u", "-m", "apps.main.train", *tiny_overrides(corpus, dump, **steps, **hsdp)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, failure_report(out)
    assert "4 process(es) via slurm: dp_replicate=2 dp_shard=2" in out.stdout + out.stderr, failure_report(out)
    worst = max_difference(read_losses(dump), read_losses(ref))
    assert worst <= 1e-5, f"HSDP 2 nodes x 2 vs FSDP 1 node x 4: max loss difference {worst:.2e}"


def test_master_address_is_the_first_nodes_nodeaddr_not_dns():
    from lingua.distributed import slurm_master_addr

    info = subprocess.run(["scontrol", "show", "node", "n1"], capture_output=True, text=True, check=True).stdout
    assert slurm_master_addr("n[1-2]") == re.search(r"NodeAddr=(\S+)", info).group(1) == "127.0.0.1"
    with pytest.raises(OSError):
        socket.gethostbyname("n1")  # what a DNS lookup of the node name would have met


def test_memory_parallel_group_across_nodes_is_refused_before_work(corpus, tmp_path):
    """srun straight onto two nodes (stool refuses the same layout before submitting)."""
    dump = tmp_path / "mp"
    env = launch_env()
    argv = tiny_overrides(corpus, dump, **{"distributed.dp_shard": 2, "distributed.memory_parallel_size": 2})
    out = subprocess.run(["srun", "-N", "2", "-n", "2", "-p", "debug", sys.executable, "-u", "-m", "apps.main.train",
                          *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode != 0
    assert "memory-parallel group of ranks [0, 1] on nodes [0, 1]" in out.stdout + out.stderr, failure_report(out)
    assert "memory_parallel_across_nodes=true" in out.stdout + out.stderr
    assert not (dump / "checkpoints").exists()


@pytest.mark.slow
def test_hmt_job_launches_on_two_nodes(tmp_path, hmt_dataset, hmt_backbone):
    """apps.hmt.train through stool nodes=2, as apps.main: FSDP over the two nodes' tasks."""
    from tests.test_stool import stool as stool_with_env

    dump = tmp_path / "hmt"
    config = tmp_path / "hmt.yaml"
    config.write_text(yaml.safe_dump({
        "task_name": "json", "data_dir": str(hmt_dataset), "model_name": str(hmt_backbone), "batch_size": 2,
        "segment_length": 16, "num_sensory": 2, "mem_recall_context": 4, "mem_recall_hidden_dim": 8,
        "training_step": 4, "eval_step": 1, "test_step": 1, "learning_rate": 1e-3, "dump_dir": str(dump)}))
    out = stool_with_env([f"config={config}", "script=apps.hmt.train", *TWO_NODES], HF_DATASETS_OFFLINE="1",
                         HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    job = job_id(out.stdout)
    wait_for_job(job, 300)
    log = job_log(dump, job)
    assert "2 process(es) via slurm: dp_replicate=1 dp_shard=2" in log, log[-3000:]
    assert sorted(read_losses(dump)) == [1, 2, 3, 4], log[-3000:]
    rows = [json.loads(line) for line in open(dump / "metrics.eval.jsonl")]
    assert len(rows) == 1 and rows[0]["test"]["docs"] > 0 and rows[0]["test"]["ppl"] > 1


def test_scaleout_bench_measures_between_the_two_nodes():
    """apps.bench.scaleout --launcher srun: one rank on each node, the trainer's save and the
    collectives timed between them (the figures the README's scale-out estimate starts from)."""
    from apps.bench.scaleout import main
    from tests.test_bench_scaleout import TINY

    result = main([*TINY, "--launcher", "srun", "--configs", "apps/main/configs/dense_1.3b.yaml"])
    measured = result["measured"]
    assert measured["launcher"] == "slurm" and measured["nodes"] == [0, 1], measured
    assert measured["save"]["bytes_per_param"] >= 12
    assert all(v > 0 for v in measured["collectives"]["bus_GBps"].values())
