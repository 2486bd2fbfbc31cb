"""Scaling of the real training loop on one machine: 1 process against 2 ranks (FSDP, TP).

`python -m apps.bench.scaling [--steps N] [--warmup N] [--repeats R] [--data_dir DIR]`
trains the debug model (apps/main/configs/debug.yaml) through `python -m apps.main.train`
three ways, on the same cores and the same global batch:

  single  1 process x 2 threads (OMP_NUM_THREADS=2), data.batch_size=8
  fsdp    2 ranks x 1 thread under torchrun, distributed.dp_shard=2, data.batch_size=4 per rank
  tp      2 ranks x 1 thread under torchrun, distributed.tp_size=2, data.batch_size=8
          (one data-parallel rank; both TP ranks see the same batch)

Each run writes its own metrics.jsonl (logging.freq=1) into a temporary dump dir; tokens/s is
the median `speed/wps` (global tokens/s over all ranks) of the steps after the first
`--warmup`. The configurations run interleaved `--repeats` times (order alternates) and the
median over repeats is reported. Checkpoints and evaluation are off during the run (the loop
still saves once after its last step, outside the timed steps). Prints one JSON object on
stdout (tokens/s, fsdp_ratio and tp_ratio against the single process measured in the same
run, the spread, the commands, the load average, machine, torch); logs go to stderr.

Other processes distort these figures badly on a small machine (a third busy process can make
the 2-thread run several times slower): `--wait_load_below 0.7` first waits for a quiet machine,
and each run records `other_processes_cpu_share`, the share of all cores that processes outside
the benchmark used while it ran (near 0 for a clean run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from apps.bench.common import machine_info, stderr_logging
from lingua.distributed import clean_env

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = ROOT / "apps" / "main" / "configs" / "debug.yaml"
PREPARE = ROOT / "setup" / "download_prepare_hf_data.py"
CONFIGS = ("single", "fsdp", "tp")
TARGET_FSDP_RATIO = 0.8
RUN_TIMEOUT_S = 900


@dataclass
class ScalingShape:
    """The debug model's shape; batch_size is the global batch (per step, all ranks)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    batch_size: int = 8
    cores: int = 2  # threads of the single process = ranks x 1 thread of the 2-rank runs

    def overrides(self) -> list[str]:
        return [f"model.dim={self.dim}", f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
                f"model.max_seqlen={self.seq_len}", f"data.seq_len={self.seq_len}"]


@dataclass
class RunSpec:
    name: str
    nproc: int
    threads: int
    batch_size: int  # per data-parallel rank
    dp_size: int
    overrides: tuple[str, ...]

    def command(self, dump_dir: Path, common: list[str]) -> list[str]:
        train = ["-m", "apps.main.train", *common, f"dump_dir={dump_dir}", f"data.batch_size={self.batch_size}",
                 *self.overrides]
        if self.nproc == 1:
            return [sys.executable, *train]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(self.nproc),
                *train]

    def env(self) -> dict:
        # clean_env drops torchrun/SLURM variables and OMP_NUM_THREADS of this process.
        return dict(clean_env(), PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(self.threads))


def run_specs(shape: ScalingShape) -> dict[str, RunSpec]:
    n = shape.cores
    if shape.batch_size % n:
        raise ValueError(f"batch_size={shape.batch_size} must divide among {n} FSDP ranks")
    return {
        "single": RunSpec("single", 1, n, shape.batch_size, 1, ()),
        "fsdp": RunSpec("fsdp", n, 1, shape.batch_size // n, n, (f"distributed.dp_shard={n}",)),
        "tp": RunSpec("tp", n, 1, shape.batch_size, 1, (f"distributed.tp_size={n}",)),
    }


def common_overrides(shape: ScalingShape, data_dir: Path, source: str, steps: int) -> list[str]:
    return [
        f"config={DEBUG_CONFIG}",
        f"data.root_dir={data_dir}",
        f"data.sources={{{source}: 1.0}}",
        *shape.overrides(),
        f"steps={steps}",
        "logging.freq=1",
        f"checkpoint.dump.every={steps + 1}",
        f"checkpoint.eval.every={steps + 1}",
        "eval=null",
    ]


def load_avg() -> Optional[list[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def wait_until_quiet(threshold: float, max_wait_s: float, poll_s: float = 10.0) -> tuple[Optional[float], float]:
    """Poll the 1-minute load average until it is below threshold; (last load, seconds waited)."""
    t0 = time.monotonic()
    while True:
        load = load_avg()
        if load is None:
            logger.warning("no /proc/loadavg: not waiting for a quiet machine")
            return None, 0.0
        waited = time.monotonic() - t0
        if load[0] < threshold:
            logger.info("1-min load %.2f < %.2f after %.0f s: starting", load[0], threshold, waited)
            return load[0], waited
        if waited >= max_wait_s:
            logger.warning("1-min load still %.2f >= %.2f after %.0f s: starting anyway (figures may be distorted)",
                           load[0], threshold, waited)
            return load[0], waited
        logger.info("1-min load %.2f >= %.2f: waiting (%.0f s so far)", load[0], threshold, waited)
        time.sleep(poll_s)


def cpu_busy_s() -> Optional[float]:
    """CPU seconds spent busy on the whole machine since boot, all cores (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its finished (waited-for) descendants: the runs."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def prepare_data(data_dir: Path) -> None:
    cmd = [sys.executable, str(PREPARE), "stdlib", "2", "--data_dir", str(data_dir), "--seed", "42"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(clean_env(), PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"data preparation failed ({shlex.join(cmd)}):\n{proc.stderr[-3000:]}")
    logger.info("prepared data in %s", data_dir)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def measure_run(spec: RunSpec, cmd: list[str], dump_dir: Path, warmup: int, tokens_per_step: int) -> dict:
    """Run one training job; tokens/s = median speed/wps of the steps after `warmup`."""
    load = load_avg()
    busy0, own0 = cpu_busy_s(), own_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=spec.env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_s(), own_cpu_s()
    # CPU time other processes on the machine used during this run, as a share of all cores:
    # the run's figures are disturbed when this is not near 0.
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
    if proc.returncode != 0:
        raise RuntimeError(f"{spec.name} run failed with exit code {proc.returncode}: {shlex.join(cmd)}\n"
                           f"{proc.stderr[-4000:]}")
    rows = [r for r in read_metrics(dump_dir / "metrics.jsonl") if "speed/wps" in r]
    timed = [r for r in rows if r["global_step"] > warmup]
    if not timed:
        raise RuntimeError(f"{spec.name}: no steps after the {warmup} warmup steps in {dump_dir / 'metrics.jsonl'}")
    # wps is global (all data-parallel ranks): check that every config really ran the same global batch.
    seen = rows[-1]["optim/total_tokens"] / rows[-1]["global_step"]
    if seen != tokens_per_step:
        raise RuntimeError(f"{spec.name}: {seen} tokens per step, expected {tokens_per_step} (same global batch)")
    wps = [r["speed/wps"] for r in timed]
    iter_time = [r["speed/curr_iter_time"] for r in timed]
    return {
        "tokens_per_s": statistics.median(wps),
        "step_time_s": statistics.median(iter_time),
        "timed_steps": len(timed),
        "wall_s": wall,
        "load_1min_before": load[0] if load else None,
        "other_processes_cpu_share": other,
    }


def run_bench(shape: Optional[ScalingShape] = None, steps: int = 30, warmup: int = 5, repeats: int = 2,
              data_dir: Optional[str | os.PathLike] = None, source: Optional[str] = None,
              wait_load_below: Optional[float] = None, max_wait_s: float = 600.0) -> dict:
    """Run the interleaved benchmark and return the result dict (what main prints)."""
    shape = shape or ScalingShape()
    if steps <= warmup or repeats < 1 or warmup < 0:
        raise ValueError(f"need steps > warmup >= 0 and repeats >= 1 (got steps={steps}, warmup={warmup}, "
                         f"repeats={repeats})")
    specs = run_specs(shape)
    tokens_per_step = shape.batch_size * shape.seq_len
    waited_s = 0.0
    if wait_load_below is not None:
        _, waited_s = wait_until_quiet(wait_load_below, max_wait_s)
    load_start = load_avg()
    logger.info("load average at start: %s", load_start)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        tmp_path = Path(tmp)
        source = source or "stdlib_shuffled"
        if data_dir is None:
            data_root = tmp_path / "data"
            prepare_data(data_root)
        else:
            data_root = Path(data_dir)
        common = common_overrides(shape, data_root, source, steps)

        per_repeat: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        commands: dict[str, str] = {}
        runs: list[dict] = []
        for r in range(repeats):
            order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
            for name in order:
                spec = specs[name]
                dump_dir = tmp_path / f"{name}_{r}"
                cmd = spec.command(dump_dir, common)
                commands.setdefault(name, f"OMP_NUM_THREADS={spec.threads} PYTHONPATH={ROOT} {shlex.join(cmd)}")
                result = measure_run(spec, cmd, dump_dir, warmup, tokens_per_step)
                per_repeat[name].append(result)
                runs.append({"config": name, "repeat": r, **result})
                logger.info("repeat %d/%d %s: %.0f tokens/s (%.3f s/step, %d steps timed, %.1f s wall; other "
                            "processes used %s of the CPU)", r + 1, repeats, name, result["tokens_per_s"],
                            result["step_time_s"], result["timed_steps"], result["wall_s"],
                            "?" if result["other_processes_cpu_share"] is None
                            else f"{result['other_processes_cpu_share']:.0%}")

    tps_runs = {k: [x["tokens_per_s"] for x in v] for k, v in per_repeat.items()}
    tps = {k: statistics.median(v) for k, v in tps_runs.items()}
    fsdp_ratio = tps["fsdp"] / tps["single"]
    tp_ratio = tps["tp"] / tps["single"]
    best = {k: max(v) for k, v in tps_runs.items()}
    others = [x["other_processes_cpu_share"] for x in runs if x["other_processes_cpu_share"] is not None]
    load_end = load_avg()
    logger.info("tokens/s: %s; fsdp_ratio %.3f, tp_ratio %.3f; load at end %s",
                {k: round(v) for k, v in tps.items()}, fsdp_ratio, tp_ratio, load_end)

    return {
        "bench": "scaling",
        "headline": "tokens/s of the debug model through apps.main.train: 2 ranks x 1 thread (FSDP, TP) "
                    "against 1 process x 2 threads, same global batch, measured in the same run",
        "tokens_per_s": tps,
        "fsdp_ratio": fsdp_ratio,
        "tp_ratio": tp_ratio,
        "tokens_per_s_per_repeat": tps_runs,
        "step_time_s": {k: statistics.median(x["step_time_s"] for x in v) for k, v in per_repeat.items()},
        # Best run of each config: less sensitive to other processes than the median of few repeats.
        "tokens_per_s_best": best,
        "fsdp_ratio_best": best["fsdp"] / best["single"],
        "tp_ratio_best": best["tp"] / best["single"],
        # In the order they ran, with the 1-minute load before each and the share of all cores that
        # other processes used during each (a run is disturbed when this is not near 0).
        "runs": runs,
        "max_other_processes_cpu_share": max(others) if others else None,
        # (max - min) / median of the per-repeat tokens/s: a ratio closer to 1 than this is noise.
        "relative_spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in tps_runs.items()},
        "targets": {
            "fsdp_ratio": {"target": TARGET_FSDP_RATIO, "value": fsdp_ratio, "met": fsdp_ratio >= TARGET_FSDP_RATIO},
        },
        "commands": commands,
        "config": {
            **asdict(shape),
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            "warmup": warmup,
            "repeats": repeats,
            "data_source": source,
            "data_dir": "temporary (setup/download_prepare_hf_data.py stdlib 2 --seed 42)" if data_dir is None
                        else str(data_dir),
            "runs": {k: {"processes": s.nproc, "threads_per_process": s.threads, "batch_size_per_rank": s.batch_size,
                         "dp_size": s.dp_size} for k, s in specs.items()},
            "timing": "per run: median speed/wps (global tokens/s, logging.freq=1) of the steps after `warmup`; "
                      "reported: median over repeats; order alternates between repeats",
        },
        "load_avg_at_start": load_start,
        "load_avg_at_end": load_end,
        "waited_for_quiet_s": waited_s,
        "wait_load_below": wait_load_below,
        "bench_wall_s": time.perf_counter() - t_start,
        "machine": machine_info(torch.device("cpu")),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    d = ScalingShape()
    p = argparse.ArgumentParser(prog="python -m apps.bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the median")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per configuration; median reported")
    p.add_argument("--data_dir", default=None,
                   help="prepared data root to reuse (default: prepare the stdlib corpus in a temporary dir)")
    p.add_argument("--source", default=None, help="data source under data_dir (default: stdlib_shuffled)")
    p.add_argument("--wait_load_below", type=float, default=None,
                   help="first wait until the 1-minute load average is below this (e.g. 0.7)")
    p.add_argument("--max_wait_s", type=float, default=600.0, help="longest wait for --wait_load_below")
    for f in ("dim", "n_layers", "n_heads", "seq_len", "batch_size"):
        p.add_argument(f"--{f}", type=int, default=getattr(d, f),
                       help="global batch (all ranks)" if f == "batch_size" else None)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    shape = ScalingShape(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, seq_len=args.seq_len,
                         batch_size=args.batch_size)
    result = run_bench(shape, steps=args.steps, warmup=args.warmup, repeats=args.repeats, data_dir=args.data_dir,
                       source=args.source, wait_load_below=args.wait_load_below, max_wait_s=args.max_wait_s)
    print(json.dumps(result, indent=2))
    logger.info("result printed on stdout as JSON; the dump dirs were temporary. Quote the ratios, "
                "not absolute tokens/s, across machines.")
    return result


if __name__ == "__main__":
    stderr_logging(logger)
    main()
