"""Scale-out costs: checkpoint and collective costs per parameter measured on two ranks here,
and a paper estimate of save time and gradient-exchange time per step for a config on many GPUs.

`python -m apps.bench.scaleout [--launcher torchrun|srun] [--gpus 64] [--gpus_per_node 8]
[--configs apps/main/configs/dense_1.3b.yaml,apps/main/configs/memplus_1.3b.yaml]`

Measured (two ranks; `--launcher srun` puts them on two SLURM nodes, e.g. the local two-node
cluster of setup/local_slurm.sh --nodes 2):
  save        the trainer's own sharded save (CheckpointManager.save: DCP, model + AdamW moments)
              of a model FSDP-sharded over both ranks; baseline: each rank torch.save-ing the
              same local shards into one file (fsync'd, as DCP's writer does), same disk, same run
  collectives all_reduce / reduce_scatter / all_gather of an fp32 buffer; baseline: a local copy
              of the same buffer (memory bandwidth), same run
Per-parameter costs: seconds for one rank to save one parameter's state (its share of the
checkpoint, in parallel with the others), and seconds per fp32 element each collective moves.

Estimated, per config, for `--gpus` GPUs on nodes of `--gpus_per_node` (a paper estimate: ring
collectives, no overlap, no contention beyond what is said):
  save_s      each rank writes its 1/N of the state at the measured per-parameter rate, bounded
              below by the whole checkpoint through a shared filesystem of `--fs_GBps`
  exchange    bytes each GPU sends per optimizer step for FSDP over all GPUs (dp_shard=N) and
              HSDP (dp_replicate=nodes x dp_shard=gpus_per_node), as apps/main trains them
              (params gathered in the model dtype before each micro-batch's forward and again
              before its backward, gradients reduce-scattered in fp32 once a step; value tables
              with memory_parallel_size split by columns first, gathered once per micro-batch),
              and the time at the links this run measured (their slowest) and at the stated
              cluster links (`--intra_node_GBps`, `--inter_node_GBps`, bus bandwidths)
  compute_s   6 x (parameters a token multiplies) x tokens per GPU / (`--peak_tflops` x `--mfu`)
Prints one JSON object; logs go to stderr. Where the figures come from is in the README
("Scaling out").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from apps.bench.common import machine_info, stderr_logging
from lingua.distributed import clean_env

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("apps/main/configs/dense_1.3b.yaml", "apps/main/configs/memplus_1.3b.yaml")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GRAD_BYTES = 4  # apps/main reduces gradients in fp32 (lingua.distributed.apply_fsdp)
MOMENT_BYTES = 8  # AdamW's two fp32 moments per parameter


# ---------------------------------------------------------------- measured on two ranks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up, every rank in step."""
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a collective ends when its slowest rank does
        if i:
            times.append(float(elapsed.item()))
    return statistics.median(times)


def measure_collectives(elements: int, repeats: int, device: torch.device) -> dict:
    world = dist.get_world_size()
    elements -= elements % world
    full = torch.randn(elements, device=device)
    shard = torch.empty(elements // world, device=device)
    copy_target = torch.empty_like(full)
    seconds = {
        "all_reduce": _timed(lambda: dist.all_reduce(full), repeats, device),
        "reduce_scatter": _timed(lambda: dist.reduce_scatter_tensor(shard, full), repeats, device),
        "all_gather": _timed(lambda: dist.all_gather_into_tensor(full, shard), repeats, device),
        "local_copy": _timed(lambda: copy_target.copy_(full), repeats, device),
    }
    # Bytes each rank sends in a ring (nccl-tests' bus bandwidth): 2(n-1)/n of the buffer for an
    # all-reduce, (n-1)/n for the others; the local copy moves the buffer once.
    sent = {"all_reduce": 2 * (world - 1) / world, "reduce_scatter": (world - 1) / world,
            "all_gather": (world - 1) / world, "local_copy": 1.0}
    nbytes = elements * full.element_size()
    return {
        "elements": elements,
        "seconds": seconds,
        "seconds_per_element": {k: s / elements for k, s in seconds.items()},
        "bus_GBps": {k: sent[k] * nbytes / s / 1e9 for k, s in seconds.items()},
        "over_local_copy": {k: s / seconds["local_copy"] for k, s in seconds.items() if k != "local_copy"},
    }


def _local_state(model, optimizer) -> dict[str, torch.Tensor]:
    """This rank's shards of the parameters and AdamW moments, as plain local tensors."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = getattr(p, "_local_tensor", p).detach()
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                out[f"{name}.{key}"] = getattr(value, "_local_tensor", value)
    return out


def _write_fsynced(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def measure_save(overrides: list[str], repeats: int, work_dir: Path, device: torch.device) -> dict:
    from apps.main.train import TrainArgs, setup_model
    from lingua.args import load_config
    from lingua.checkpoint import CheckpointManager
    from lingua.distributed import build_mesh, parallel_dims
    from lingua.optim import build_optimizer

    world, rank = dist.get_world_size(), dist.get_rank()
    args = load_config(TrainArgs, [f"config={ROOT / 'apps/main/configs/debug.yaml'}", f"dump_dir={work_dir}",
                                   f"distributed.dp_shard={world}", "checkpoint.dump.keep=1", *overrides])
    dims = parallel_dims(args.distributed, world)
    model = setup_model(args, build_mesh(dims, device.type), dims, device)
    optimizer, _ = build_optimizer(model, args.optim, args.steps)
    for p in model.parameters():  # one step with zero gradients: AdamW's moments exist, as in a run
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    manager = CheckpointManager(args.checkpoint, work_dir)
    steps = iter(range(1, 10**6))
    save_s = _timed(lambda: manager.save(model, optimizer, {}, {}, next(steps), dp_rank=rank), repeats, device)
    saved = manager.latest()
    ckpt_bytes = sum(f.stat().st_size for f in Path(str(saved)).rglob("*") if f.is_file())
    local = _local_state(model, optimizer)
    plain_dir = work_dir / "plain"
    if rank == 0:
        plain_dir.mkdir(exist_ok=True)
    dist.barrier()
    plain_s = _timed(lambda: _write_fsynced(local, plain_dir / f"rank{rank}.pt"), repeats, device)
    return {
        "model": {"params": params, "overrides": overrides},
        "checkpoint_bytes": ckpt_bytes,
        "bytes_per_param": ckpt_bytes / params,
        "seconds": save_s,
        "plain_torch_save_seconds": plain_s,
        "over_plain_torch_save": save_s / plain_s,
        # One rank saves params / world of them while the others save theirs.
        "seconds_per_param_per_rank": save_s / (params / world),
        "plain_seconds_per_param_per_rank": plain_s / (params / world),
    }


def worker(ns: argparse.Namespace) -> None:
    from lingua.distributed import (default_device, init_distributed, node_of_each_rank, shutdown_distributed,
                                    world_info)

    logging.basicConfig(level=logging.WARNING)
    world = world_info()
    init_distributed(world)
    device = default_device(world.local_rank)
    if world.world_size < 2:
        raise SystemExit("the scale-out worker needs at least 2 ranks (torchrun or srun)")
    collectives = measure_collectives(int(ns.coll_elements), ns.repeats, device)
    save = measure_save(ns.model, ns.repeats, Path(ns.work_dir), device)
    nodes = sorted(set(node_of_each_rank(world)))
    if world.rank == 0:
        Path(ns.worker_out).write_text(json.dumps({
            "world_size": world.world_size, "launcher": world.launcher, "device": str(device), "nodes": nodes,
            "collectives": collectives, "save": save}))
    shutdown_distributed()


def run_measurement(ns: argparse.Namespace) -> dict:
    """The worker on two ranks, launched as asked; returns rank 0's figures."""
    with tempfile.TemporaryDirectory(dir=ns.work_dir) as tmp:
        out = Path(tmp) / "measured.json"
        worker_args = ["-m", "apps.bench.scaleout", "--worker_out", str(out), "--work_dir", tmp,
                       "--coll_elements", str(int(ns.coll_elements)), "--repeats", str(ns.repeats),
                       *[f"--model={o}" for o in ns.model]]
        if ns.launcher == "srun":
            cmd = ["srun", "-N", "2", "-n", "2", "--cpus-per-task", "1", "-p", ns.partition, sys.executable, "-u",
                   *worker_args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   *worker_args]
        env = dict(clean_env(), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        logger.info("measuring on 2 ranks: %s", " ".join(cmd))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ns.timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the measurement ({ns.launcher}) failed with exit code {proc.returncode}:\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        measured = json.loads(out.read_text())
    measured["command"] = " ".join(cmd)
    return measured


# ---------------------------------------------------------------- the paper estimate


def config_params(config: str, vocab_size: int) -> dict:
    """Parameters of a training config's model, counted on the meta device (no memory used)."""
    from apps.main.train import TrainArgs
    from apps.main.transformer import build_model
    from lingua.args import load_config
    from lingua.distributed import value_tables

    args = load_config(TrainArgs, [f"config={config}"])
    if args.model.vocab_size <= 0:
        args.model.vocab_size = vocab_size
    model = build_model(args.model, "meta")
    total = sum(p.numel() for p in model.parameters())
    values = sum(p.numel() for table in value_tables(model) for p in table.parameters())
    return {
        "total": total,
        "value_tables": values,
        "model_dtype": args.distributed.model_dtype,
        "memory_parallel_size": args.distributed.memory_parallel_size,
        "grad_acc_steps": args.grad_acc_steps,
        "tokens_per_gpu_per_step": args.data.batch_size * args.data.seq_len * args.grad_acc_steps,
        "vocab_size": args.model.vocab_size,
    }


def step_traffic(params: dict, gpus: int, gpus_per_node: int) -> dict[str, dict[str, float]]:
    """Bytes each GPU sends per optimizer step, within its node and between nodes, for FSDP over
    all GPUs and for HSDP (replicas across nodes, shards within one). A ring that spans nodes is
    as fast as its inter-node hops, so FSDP over all GPUs counts as inter-node traffic."""
    nodes = gpus // gpus_per_node
    param_bytes = DTYPE_BYTES[params["model_dtype"]]
    micro = params["grad_acc_steps"]  # gathered before each micro-batch's forward and backward, reduced once
    per_param = 2 * micro * param_bytes + GRAD_BYTES
    mp = params["memory_parallel_size"]
    split_values = mp > 1 and params["value_tables"] > 0
    dense = params["total"] - (params["value_tables"] if split_values else 0)
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731 - the share of a buffer a ring rank sends

    fsdp_inter = dense * per_param * ring(gpus)
    hsdp_intra = dense * per_param * ring(gpus_per_node)
    hsdp_inter = dense / gpus_per_node * GRAD_BYTES * 2 * ring(nodes)  # all-reduce of each shard's grads
    if split_values:
        # Each table is split by columns over mp ranks of one node, and each column slice sharded
        # over the ranks holding that slice (dp_shard_mem), gathered once per step (kept until
        # backward). Under HSDP that group is the node's dp_shard / mp ranks, plus the replicas.
        slice_params = params["value_tables"] / mp
        value_bytes = micro * param_bytes + GRAD_BYTES
        fsdp_inter += slice_params * value_bytes * ring(gpus // mp)
        hsdp_intra += slice_params * value_bytes * ring(gpus_per_node // mp)
        hsdp_inter += slice_params / max(1, gpus_per_node // mp) * GRAD_BYTES * 2 * ring(nodes)
    return {"fsdp": {"intra_node_bytes": 0.0, "inter_node_bytes": fsdp_inter},
            "hsdp": {"intra_node_bytes": hsdp_intra, "inter_node_bytes": hsdp_inter}}


def estimate(params: dict, measured: dict, ns: argparse.Namespace) -> dict:
    gpus, per_node = ns.gpus, ns.gpus_per_node
    save = measured["save"]
    state_bytes = params["total"] * save["bytes_per_param"]
    save_at_measured_rate = params["total"] / gpus * save["seconds_per_param_per_rank"]
    save_fs_bound = state_bytes / (ns.fs_GBps * 1e9)
    # The slowest of the measured collectives' bus bandwidths: what a link like this run's gives.
    measured_GBps = min(measured["collectives"]["bus_GBps"][k] for k in ("all_reduce", "reduce_scatter", "all_gather"))
    exchange = {}
    for layout, traffic in step_traffic(params, gpus, per_node).items():
        intra, inter = traffic["intra_node_bytes"], traffic["inter_node_bytes"]
        exchange[layout] = {
            **{k: round(v / 1e9, 3) for k, v in (("intra_node_GB", intra), ("inter_node_GB", inter))},
            "seconds_at_measured_links": (intra + inter) / (measured_GBps * 1e9),
            "seconds_at_stated_links": intra / (ns.intra_node_GBps * 1e9) + inter / (ns.inter_node_GBps * 1e9),
        }
    multiplied = params["total"] - params["value_tables"]  # value rows are read, not multiplied whole
    compute = 6 * multiplied * params["tokens_per_gpu_per_step"] / (ns.peak_tflops * 1e12 * ns.mfu)
    return {
        "params": params,
        "checkpoint_GB": round(state_bytes / 1e9, 2),
        "save_seconds": {"each_rank_at_measured_rate": save_at_measured_rate,
                         "shared_filesystem_bound": save_fs_bound,
                         "estimate": max(save_at_measured_rate, save_fs_bound)},
        "exchange_per_step": exchange,
        "compute_seconds_per_step": compute,
        "exchange_over_compute_at_stated_links": {k: v["seconds_at_stated_links"] / compute for k, v in exchange.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                        help="srun: one rank on each of two SLURM nodes (--partition)")
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--coll_elements", type=float, default=16e6, help="fp32 elements in the collectives' buffer")
    parser.add_argument("--model", action="append", default=None,
                        help="key=value overrides of the debug model whose sharded save is timed (repeatable); "
                             "default: dim 512, 8 layers, vocab 8192 (about 29M parameters)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="training configs to estimate, comma-separated")
    parser.add_argument("--vocab_size", type=int, default=32000, help="for configs whose vocab comes from the tokenizer")
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--intra_node_GBps", type=float, default=360.0,
                        help="bus bandwidth within a node (NVLink; nccl-tests on 8 H100 SXM give 350-480)")
    parser.add_argument("--inter_node_GBps", type=float, default=40.0,
                        help="bus bandwidth per GPU between nodes (one 400 Gb/s NIC per GPU, about 80%% of it)")
    parser.add_argument("--fs_GBps", type=float, default=10.0, help="aggregate write bandwidth of the shared filesystem")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="per GPU, bf16 dense (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--work_dir", default=None, help="where the timed saves go, on a filesystem every node "
                        "shares (default: the temp dir, which is shared on one machine)")
    parser.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.model is None:
        ns.model = ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.vocab_size=8192"]
    if ns.worker_out:
        worker(ns)
        return {}
    stderr_logging(logger)
    if ns.gpus % ns.gpus_per_node:
        parser.error(f"--gpus {ns.gpus} is not a whole number of nodes of --gpus_per_node {ns.gpus_per_node}")
    # A config as given, else relative to the repository (the defaults, from any directory).
    configs = [c if Path(c).exists() else str(ROOT / c) for c in ns.configs.split(",") if c]
    missing = [c for c in configs if not Path(c).exists()]
    if missing:
        parser.error(f"--configs: no such file: {', '.join(missing)}")
    measured = run_measurement(ns)
    estimates = {Path(c).stem: estimate(config_params(c, ns.vocab_size), measured, ns) for c in configs}
    result = {
        "measured": measured,
        "estimate": {"gpus": ns.gpus, "gpus_per_node": ns.gpus_per_node,
                     "stated": {k: getattr(ns, k) for k in ("intra_node_GBps", "inter_node_GBps", "fs_GBps",
                                                            "peak_tflops", "mfu")},
                     "configs": estimates},
        "machine": machine_info(torch.device("cpu")),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
