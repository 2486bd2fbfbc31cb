"""Process environment and parallelism config.

`DistributedArgs` / `EnvironmentArgs` carry Meta Lingua's field names. `world_info()` reads
rank and world size from torchrun or SLURM (srun without torchrun), or runs one process.
The sharding itself (TP -> FSDP2 -> AC -> compile) is `parallelize_model`, built on these.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch

from lingua.args import choice

logger = logging.getLogger(__name__)


@dataclass
class DistributedArgs:
    dp_shard: int = 1
    dp_replicate: int = 1
    tp_size: int = 1
    selective_activation_checkpointing: bool = False
    compile: bool = False
    fsdp_type: str = choice("no_shard", ("no_shard", "full_shard"))
    model_dtype: str = choice("bf16", ("bf16", "fp16", "fp32"))
    float8_recipe: Optional[str] = None
    float8_filter: str = r"layers\.[0-9]+\."
    matmul_allow_tf32: bool = False
    allow_bf16_reduced_precision_reduction: bool = True
    detect_anomaly: bool = False
    compile_cache_size_limit: int = 8
    spawn_method: str = choice("forkserver", ("fork", "forkserver", "spawn"))
    memory_parallel_size: int = 1  # Memory Layers: column-parallel value tables


@dataclass
class EnvironmentArgs:
    """Environment variables set for this process and its children, unless already set.
    None leaves a variable alone (Meta Lingua forces OMP_NUM_THREADS=1, which would make
    a CPU run use one core; on CPU we size torch's threads from the cores per process)."""

    MKL_SERVICE_FORCE_INTEL: Optional[str] = "GNU"
    OMP_NUM_THREADS: Optional[str] = None
    MKL_NUM_THREADS: Optional[str] = None
    ENABLE_INTRA_NODE_COMM: Optional[str] = "1"
    TORCH_NCCL_AVOID_RECORD_STREAMS: Optional[str] = "1"
    NCCL_IB_TIMEOUT: Optional[str] = "22"
    NCCL_DEBUG: Optional[str] = "INFO"
    TORCH_NCCL_ASYNC_ERROR_HANDLING: Optional[str] = "1"


@dataclass
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # "torchrun" | "slurm" | "single"


def world_info(env: Optional[dict] = None) -> WorldInfo:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also torchrun inside an srun job)
        return WorldInfo(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            "torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        ntasks = int(env["SLURM_NTASKS"])
        return WorldInfo(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            ntasks,
            int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]) if "SLURM_NTASKS_PER_NODE" in env else ntasks,
            "slurm",
        )
    return WorldInfo(0, 0, 1, 1, "single")


def setup_env(args: EnvironmentArgs) -> None:
    for f in fields(args):
        value = getattr(args, f.name)
        if value is not None and f.name not in os.environ:
            os.environ[f.name] = value


def default_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_cpu_threads(info: WorldInfo) -> None:
    """Share the machine's cores among the processes on it, unless OMP_NUM_THREADS says."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, info.local_world_size)))


def compile_blocks(model: torch.nn.Module, cache_size_limit: int = 8) -> torch.nn.Module:
    """torch.compile each transformer block in place (parameter names unchanged, so
    checkpoints stay interchangeable with eager runs), as torchtitan does."""
    torch._dynamo.config.cache_size_limit = cache_size_limit
    for block in model.layers:
        block.compile()
    return model
