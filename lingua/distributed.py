"""Processes, device meshes and model parallelism.

`world_info()` reads rank and world size from torchrun (also `accelerate launch` with several
processes, which runs torchrun), from SLURM (srun without torchrun) or runs one process;
`init_distributed` starts the process group (nccl with GPUs, gloo without); `build_mesh` lays
out (dp_replicate, dp_shard, tp); `parallelize_model` applies the TP plan, then column-wise
memory parallelism for value tables, then FSDP2 `fully_shard` per block and on the root, then
full or selective activation checkpointing, then torch.compile.
Field names follow Meta Lingua.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import signal
import subprocess
import warnings
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from lingua.args import choice

logger = logging.getLogger(__name__)


@dataclass
class DistributedArgs:
    dp_shard: int = 1  # -1: all ranks left after dp_replicate and tp
    dp_replicate: int = 1
    tp_size: int = 1
    selective_activation_checkpointing: bool = False
    # Memory Layers: full activation checkpointing, every block recomputes its forward in
    # backward (keeps only block inputs). Set with selective_activation_checkpointing, this wins.
    checkpoint_each_layer: bool = False
    compile: bool = False
    # full_shard frees gathered parameters after forward (ZeRO-3); no_shard keeps them until
    # backward (ZeRO-2: less communication, more memory). Both shard gradients and optimizer.
    fsdp_type: str = choice("no_shard", ("no_shard", "full_shard"))
    model_dtype: str = choice("bf16", ("bf16", "fp16", "fp32"))
    float8_recipe: Optional[str] = None
    float8_filter: str = r"layers\.[0-9]+\."
    matmul_allow_tf32: bool = False
    allow_bf16_reduced_precision_reduction: bool = True
    detect_anomaly: bool = False
    compile_cache_size_limit: int = 8
    # How the async data loader's child process starts (see loader_start_method).
    spawn_method: str = choice("fork", ("fork", "forkserver", "spawn"))
    memory_parallel_size: int = 1  # Memory Layers: column-parallel value tables
    # A memory-parallel group exchanges indices and bags in every memory layer, forward and
    # backward (all-gathers, all-to-all): kept within a node unless this says otherwise (check_memory_parallel_within_nodes).
    memory_parallel_across_nodes: bool = False


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
    node: int = 0  # this process's node (SLURM_NODEID; torchrun's GROUP_RANK)


def world_info(env: Optional[dict] = None) -> WorldInfo:
    env = os.environ if env is None else env
    # torchrun, also inside an srun job, and `accelerate launch` with several processes (it runs
    # torchrun in-process; with one process it sets none of these: one process, below).
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            "torchrun",
            int(env.get("GROUP_RANK", 0)),
        )
    # Only srun's step variables mean "launched as one task of several": an sbatch script and
    # an salloc shell also carry SLURM_PROCID=0 and the job's SLURM_NTASKS, and a plain python
    # started there would wait forever for ranks that never start. The step's own task count
    # is the world (srun -n may use fewer tasks than the job holds).
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        ntasks = int(env["SLURM_STEP_NUM_TASKS"])
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", str(ntasks))  # e.g. "4(x2)" or "2,1"
        return WorldInfo(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            ntasks,
            int(per_node.split("(")[0].split(",")[0]),
            "slurm",
            int(env.get("SLURM_NODEID", 0)),
        )
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        # accelerate's one-process launcher (it always sets ACCELERATE_USE_CPU) with
        # --num_processes N > 1: with --cpu, or on fewer than 2 GPUs, it starts only this process
        # and sets MASTER_ADDR for peers that mpirun would start (--mpirun_hostfile), but no rank.
        logger.warning("accelerate launch started this one process (with --cpu or fewer than 2 GPUs, its "
                       "multi-process mode needs mpirun): training runs as one process. For N processes use "
                       "`accelerate launch --multi_gpu --num_processes N` (torchrun; gloo on a CPU)")
    return WorldInfo(0, 0, 1, 1, "single")


def slurm_master_addr(nodelist: str) -> str:
    """The address of the first node of a SLURM nodelist: `scontrol show hostnames` expands the
    list (n[1-2] -> n1), and `scontrol show node` gives the address SLURM itself reaches that node
    at (NodeAddr). Node names need not resolve in DNS (they do not on many clusters, nor on the
    local two-node cluster), so the name is the fallback only when scontrol cannot say."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    first = out.stdout.split()[0]
    info = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True)
    addr = re.search(r"\bNodeAddr=(\S+)", info.stdout) if info.returncode == 0 else None
    if addr is None:
        logger.warning("scontrol show node %s gave no NodeAddr (%s): using the node name as the master address",
                       first, info.stderr.strip() or "no such field")
        return first
    return addr.group(1)


def slurm_master_port(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    return 20000 + int(job_id) % 20000


def init_distributed(world: WorldInfo, env: Optional[dict] = None) -> None:
    """Start the default process group for a multi-process run (no-op for one process)."""
    if world.world_size == 1 or dist.is_initialized():
        return
    env = os.environ if env is None else env
    if world.launcher == "slurm":
        env.setdefault("MASTER_ADDR", slurm_master_addr(env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", str(slurm_master_port(env["SLURM_JOB_ID"])))
        env.setdefault("RANK", str(world.rank))
        env.setdefault("WORLD_SIZE", str(world.world_size))
        env.setdefault("LOCAL_RANK", str(world.local_rank))
        logger.info("rank %d of %d on node %d: rendezvous at %s:%s (the job's first node)", world.rank,
                    world.world_size, world.node, env["MASTER_ADDR"], env["MASTER_PORT"])
    if torch.cuda.is_available():
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")


def shutdown_distributed() -> None:
    """End a finished multi-process run (no-op for one process): wait until every rank is here,
    destroy the process groups, then free them so that their gloo worker threads are joined
    before the interpreter finalizes.

    Why the last step: a gloo worker drops each finished work a moment after the caller has
    been woken, and the work can own the last reference to a tensor whose Python object it kept
    alive. If the interpreter is already finalizing, that thread cannot take the GIL and the
    rank aborts with SIGABRT ("terminate called without an active exception"), turning a
    finished run into a failed one. `destroy_process_group` alone does not free the groups:
    DTensor's sharding caches keep every DeviceMesh alive, and a mesh holds its groups. Freed
    here, each group's destructor waits for its queue, releases the GIL and joins its threads.
    Call it once the model is gone (FSDP holds the groups it shards over while it lives): at the
    end of main(), after the function that trained or evaluated has returned."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    from torch.distributed.device_mesh import DeviceMesh

    for mesh in [obj for obj in gc.get_objects() if isinstance(obj, DeviceMesh)]:
        getattr(mesh, "_pg_registry", {}).clear()
    gc.collect()


def collective_device(group=None) -> torch.device:
    """The device whose tensors `group`'s backend takes (the default group when None): NCCL
    serves only CUDA tensors, so a scalar made without a device (on the CPU) and handed to a
    collective fails there ("No backend type associated with device type cpu") although the
    same call works under gloo. Every collective on a tensor the code makes itself (flags,
    counts, metrics) builds it on this device."""
    if not dist.is_initialized():
        return torch.device("cpu")
    group = group if group is not None else dist.group.WORLD
    served = {d.type for d in group._device_types}
    if not served or "cpu" in served:
        return torch.device("cpu")
    device_type = sorted(served)[0]
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


def clean_env() -> dict:
    """This process's environment without SLURM / torchrun variables, for launching child jobs
    (an sbatch from inside a job would otherwise inherit the parent job's allocation)."""
    prefixes = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "TORCHELASTIC_")
    names = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"}
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}


def setup_env(args: EnvironmentArgs) -> None:
    for f in fields(args):
        value = getattr(args, f.name)
        if value is not None and f.name not in os.environ:
            os.environ[f.name] = value


def default_device(local_rank: int = 0) -> torch.device:
    """This process's GPU, or the CPU. The index wraps around the visible GPUs: when SLURM binds
    one GPU per task (--gpus-per-task), every task sees one device, cuda:0, whatever its rank."""
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def cpu_threads(info: WorldInfo, cores: int, env: Optional[dict] = None) -> int:
    """torch threads for this process, given the `cores` its affinity allows. Processes on one
    node share those cores, unless srun bound this task to its own: then its affinity holds no
    more than the task's SLURM_CPUS_PER_TASK, already its share. (SLURM_CPU_BIND_TYPE cannot
    tell: it names the binding asked for, also where the cluster does not bind.)"""
    env = os.environ if env is None else env
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if info.launcher == "slurm" and per_task.isdigit() and cores <= int(per_task):
        return max(1, cores)
    return max(1, cores // max(1, info.local_world_size))


def set_cpu_threads(info: WorldInfo) -> None:
    """Share the machine's cores among the processes on it, unless OMP_NUM_THREADS says."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cpu_threads(info, cores))



@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    mp: int = 1  # memory-parallel group: a factor of dp_shard (its ranks hold different tokens)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


def parallel_dims(args: DistributedArgs, world_size: int) -> ParallelDims:
    """Check that dp_replicate x dp_shard x tp_size covers the world exactly (dp_shard=-1 fills)
    and that memory_parallel_size divides dp_shard."""
    dp_shard = args.dp_shard
    if dp_shard == -1:
        dp_shard, rest = divmod(world_size, args.dp_replicate * args.tp_size)
        if rest or dp_shard < 1:
            raise ValueError(f"world size {world_size} is not divisible by distributed.dp_replicate x tp_size "
                             f"= {args.dp_replicate * args.tp_size}")
    dims = ParallelDims(args.dp_replicate, dp_shard, args.tp_size, args.memory_parallel_size)
    if min(dims.dp_replicate, dims.dp_shard, dims.tp) < 1 or dims.dp * dims.tp != world_size:
        raise ValueError(
            f"distributed.dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard} x tp_size={dims.tp} "
            f"= {dims.dp * dims.tp} must equal the number of processes ({world_size}); "
            "set distributed.dp_shard=-1 to use all remaining ranks"
        )
    if dims.mp < 1 or dims.dp_shard % dims.mp:
        raise ValueError(f"distributed.memory_parallel_size={dims.mp} must divide distributed.dp_shard="
                         f"{dims.dp_shard}: the memory-parallel group is made of data-parallel shard ranks")
    return dims


def build_mesh(dims: ParallelDims, device_type: str):
    """(dp_replicate, dp_shard, tp). With memory parallelism dp_shard is split into
    (dp_shard_mem, mp): "mp" shards value tables by columns, "dp_shard_mem" shards them by rows
    (FSDP), and "dp_shard" remains the flattened pair that shards everything else."""
    from torch.distributed.device_mesh import init_device_mesh

    if dims.mp == 1:
        return init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard, dims.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    mesh = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard // dims.mp, dims.mp, dims.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard_mem", "mp", "tp"))
    mesh["dp_shard_mem", "mp"]._flatten("dp_shard")
    return mesh


def memory_parallel_groups(dims: ParallelDims) -> list[list[int]]:
    """The global ranks of each memory-parallel group, as build_mesh lays them out."""
    ranks = torch.arange(dims.dp * dims.tp).reshape(dims.dp_replicate, dims.dp_shard // dims.mp, dims.mp, dims.tp)
    return ranks.movedim(2, -1).reshape(-1, dims.mp).tolist()


def block_node_layout(world_size: int, tasks_per_node: int) -> list[int]:
    """Each rank's node when ranks fill nodes in order (torchrun; srun --distribution=block)."""
    return [rank // tasks_per_node for rank in range(world_size)]


def node_of_each_rank(world: WorldInfo) -> list[int]:
    """Every rank's node, gathered (one collective): the launcher may place ranks in any order."""
    if world.world_size == 1:
        return [world.node]
    device = collective_device()
    nodes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world.world_size)]
    dist.all_gather(nodes, torch.tensor([world.node], dtype=torch.int64, device=device))
    return [int(n.item()) for n in nodes]


def check_memory_parallel_within_nodes(dims: ParallelDims, node_of_rank: list[int], allowed: bool) -> None:
    """A memory-parallel group spread over nodes runs its per-layer all-to-alls over the network:
    an error, naming the group, unless distributed.memory_parallel_across_nodes asks for it."""
    if dims.mp == 1 or allowed:
        return
    for group in memory_parallel_groups(dims):
        nodes = sorted({node_of_rank[r] for r in group})
        if len(nodes) > 1:
            per_node = node_of_rank.count(node_of_rank[group[0]])
            raise ValueError(
                f"distributed.memory_parallel_size={dims.mp} (with tp_size={dims.tp}) puts the memory-parallel "
                f"group of ranks {group} on nodes {nodes}: the all-gathers and all-to-alls of every memory "
                f"layer, forward and backward, would cross the network. Keep memory_parallel_size x tp_size within one node's {per_node} "
                "process(es), or set distributed.memory_parallel_across_nodes=true to ask for it")


def dp_rank_and_size(mesh) -> tuple[int, int]:
    """This rank's index among data-parallel replicas (ranks of one TP group share data)."""
    if mesh is None:
        return 0, 1
    rank, size = 0, 1
    for name in mesh.mesh_dim_names:  # every dim but tp, outermost first (as "dp_shard" flattens them)
        if name != "tp":
            rank, size = rank * mesh[name].size() + mesh[name].get_local_rank(), size * mesh[name].size()
    return rank, size


def data_parallel_mesh(mesh, dims: ParallelDims):
    """The mesh FSDP shards over: dp_shard, or (dp_replicate, dp_shard) for HSDP."""
    with warnings.catch_warnings():
        # With memory parallelism "dp_shard" is a flattened dim; torch 2.13 slices it from the
        # root mesh with a deprecation notice about a later bookkeeping API.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def tp_rank(mesh) -> int:
    return 0 if mesh is None else mesh["tp"].get_local_rank()


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style: q/k/v and w1/w3 split by output columns, wo and w2 by input rows, so each
    rank holds n_heads/tp heads and 1/tp of the FFN; one all-reduce after each sublayer.
    Embeddings, norms and the output layer stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    for block in model.layers:
        attn = block.attention
        if attn.n_heads % tp or attn.n_kv_heads % tp:
            raise ValueError(f"model.n_heads={attn.n_heads} and n_kv_heads={attn.n_kv_heads} must be divisible "
                             f"by distributed.tp_size={tp}")
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
        ffn = block.feed_forward
        if all(hasattr(ffn, n) for n in ("w1", "w2", "w3")):
            plan.update({"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                         "feed_forward.w2": RowwiseParallel()})
        parallelize_module(block, tp_mesh, plan)


MODEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_numerics(args: DistributedArgs) -> None:
    """Refuse settings that would not do what they say (before any work)."""
    if args.model_dtype == "fp16":
        raise ValueError("distributed.model_dtype=fp16 needs loss scaling, which this trainer does not do; "
                         "use bf16 (or fp32)")


def loader_start_method(args: DistributedArgs) -> str:
    """distributed.spawn_method for the data loader's child. forkserver (Meta Lingua's default,
    so in every config it dumped) becomes spawn, with a warning: the forkserver's server process
    sits in the trainer's process group, where SLURM's USR2 before a preemption kills it."""
    if args.spawn_method == "forkserver":
        logger.warning("distributed.spawn_method=forkserver: the data loader starts its process with spawn "
                       "instead (a forkserver would die of SLURM's preemption signal); set fork or spawn")
        return "spawn"
    return args.spawn_method


def apply_numerics(args: DistributedArgs) -> None:
    """torch's process-wide numerics switches, as the config says."""
    torch.backends.cuda.matmul.allow_tf32 = args.matmul_allow_tf32
    torch.backends.cudnn.allow_tf32 = args.matmul_allow_tf32
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = args.allow_bf16_reduced_precision_reduction
    torch.autograd.set_detect_anomaly(args.detect_anomaly)


def training_dtype(args: DistributedArgs, device: torch.device) -> torch.dtype:
    """The dtype a step's matmuls run in: distributed.model_dtype on GPUs, fp32 on CPU (bf16
    matmuls are slow there, and the tests compare layouts with fp32 exactly)."""
    return MODEL_DTYPES[args.model_dtype] if device.type == "cuda" else torch.float32


def autocast_context(args: DistributedArgs, device: torch.device, fsdp: bool) -> Callable[[], ContextManager]:
    """A context factory for each forward of a step. FSDP casts the gathered parameters itself
    (its MixedPrecisionPolicy); every other layout (one process, TP only) gets autocast to the
    same dtype, so model_dtype means the same on every layout, as MFU assumes."""
    dtype = training_dtype(args, device)
    if fsdp or dtype == torch.float32:
        return contextlib.nullcontext
    return partial(torch.autocast, device.type, dtype=dtype)


def apply_fsdp(model: nn.Module, mesh, dims: ParallelDims, args: DistributedArgs, device: torch.device) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = data_parallel_mesh(mesh, dims)
    # cast_forward_inputs off: the blocks' floating inputs are the activations, already in the
    # parameters' dtype, and the RoPE tables, which must stay fp32.
    mp = MixedPrecisionPolicy(param_dtype=training_dtype(args, device), reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    reshard = args.fsdp_type == "full_shard"
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    tables = value_tables(model) if dims.mp > 1 else []
    if tables:
        # Column-sharded value tables get their own units over the dims that hold different
        # column slices' replicas; kept gathered until backward, as they are read by several layers.
        table_mesh = mesh["dp_replicate", "dp_shard_mem"] if dims.dp_replicate > 1 else mesh["dp_shard_mem"]
        for table in tables:
            fully_shard(table, mesh=table_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=True)
    reduce_unused_parameters(model)
    if tables:
        # Gathered when the model's forward starts (after the root's own FSDP hook), in eager
        # code: memory layers read the attributes inside their (possibly compiled) blocks,
        # where calling an FSDP module would break the graph. Their gradients are
        # reduce-scattered by FSDP's end-of-backward callback, as for any unit whose forward
        # took no tensor input.
        def gather_value_tables(module, args) -> None:
            for table in tables:
                table.unshard()

        model.register_forward_pre_hook(gather_value_tables)


def reduce_unused_parameters(model: nn.Module) -> None:
    """Make every FSDP unit reduce-scatter all its trainable parameters after each backward,
    zeros for those this rank's data left unused. Memory modules use parameters by data: a
    segment in which no document starts reads no initial slots, a segment with nothing to
    retrieve leaves the bank's gate unused. FSDP2 otherwise reduces only the parameters that
    got a gradient, so ranks with different documents issue collectives of different sizes and
    the run hangs in backward (a 4-process hybrid on input/output pairs did, at step 3)."""
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)
        return
    logger.warning("this torch's FSDP2 has no set_reduce_scatter_unused_params: a model whose ranks use "
                   "different parameters (memory slots or bank on uneven documents) can hang in backward; "
                   "use the pinned torch (requirements.txt)")


def value_tables(model: nn.Module) -> list[nn.Module]:
    from lingua.product_key.memory import ValueTable

    return [m for m in model.modules() if isinstance(m, ValueTable)]


def apply_memory_parallel(model: nn.Module, mp_mesh) -> None:
    """Shard every memory value table by columns over the "mp" mesh dimension."""
    from lingua.product_key.colwise_embeddingbag import check_memory_parallel, shard_values_by_columns

    tables = value_tables(model)
    if not tables:
        raise ValueError(f"distributed.memory_parallel_size={mp_mesh.size()} but the model has no memory "
                         "value table (model.productkey_args.is_enabled is false)")
    for table in tables:
        check_memory_parallel(table.weight.shape[1], mp_mesh.size(), table.down is not None)
        shard_values_by_columns(table, mp_mesh)


def compile_blocks(model: nn.Module, cache_size_limit: int = 8) -> nn.Module:
    """torch.compile each transformer block in place (parameter names unchanged, so
    checkpoints stay interchangeable with eager runs), as torchtitan does."""
    torch._dynamo.config.cache_size_limit = cache_size_limit
    for block in model.layers:
        block.compile()
    return model


def checkpoint_each_block(model: nn.Module) -> None:
    """Full activation checkpointing: a block keeps only its inputs for backward and runs its
    forward again there (non-reentrant torch.utils.checkpoint, which torch.compile turns into a
    recompute in the block's backward graph). The forward is replaced on each block instance, not
    wrapped in a module, so parameter names and checkpoints stay those of an eager model."""
    for block in model.layers:
        block.forward = partial(_checkpointed_forward, block.forward)


def _checkpointed_forward(forward: Callable, x, rope, kv_cache=None, start: int = 0, ctx=None):
    # Decoding with a KV cache and no-grad validation keep nothing for backward: plain forward.
    # `ctx` (a segment's memory context): the recomputation writes the same update into it again.
    if torch.is_grad_enabled() and kv_cache is None:
        return torch.utils.checkpoint.checkpoint(forward, x, rope, None, 0, ctx, use_reentrant=False)
    return forward(x, rope, kv_cache, start, ctx)


def parallelize_model(model: nn.Module, mesh, dims: Optional[ParallelDims], args: DistributedArgs,
                      device: torch.device) -> nn.Module:
    """TP -> memory parallel -> FSDP2 -> full or selective activation checkpointing -> compile,
    each only when asked."""
    if args.float8_recipe is not None:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(f"distributed.float8_recipe={args.float8_recipe!r} needs a GPU with float8 "
                             "(compute capability >= 8.9, e.g. H100); unset it on this machine")
        raise ValueError("distributed.float8_recipe: float8 training (torchao) is not wired in yet; unset it")
    if dims is not None and dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if dims is not None and dims.mp > 1:
        apply_memory_parallel(model, mesh["mp"])
    if dims is not None and dims.dp > 1:
        apply_fsdp(model, mesh, dims, args, device)
    if args.checkpoint_each_layer:
        if args.selective_activation_checkpointing:
            # Full checkpointing already recomputes all that selective checkpointing would.
            logger.warning("distributed.checkpoint_each_layer and selective_activation_checkpointing are both "
                           "set: every block is checkpointed in full, selective checkpointing is not applied")
        checkpoint_each_block(model)
    elif args.selective_activation_checkpointing:
        for block in model.layers:
            block.activation_checkpointing = True
    if args.compile:
        compile_blocks(model, args.compile_cache_size_limit)
    return model


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad-norm clipping that also works when plain tensors and DTensors on different
    meshes mix (TP + replicated norms, FSDP 1D + 2D), where torch's foreach version cannot.

    Gradients are grouped by (mesh, placements): local squared norms are summed per group and
    reduced once per sharded mesh dimension, not once per parameter (gloo latency adds up)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    groups: dict = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    total_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for key, members in groups.items():
        local = [g.to_local() if isinstance(g, DTensor) else g for g in members]
        sq = torch.stack([torch.linalg.vector_norm(t, 2, dtype=torch.float32) for t in local]).pow(2).sum()
        if key is not None:
            mesh, placements = key
            for mesh_dim, placement in enumerate(placements):
                # Replicated dims hold copies; every other placement splits the tensor, including
                # FSDP's _StridedShard over TP shards, which is not a Shard subclass.
                if not placement.is_replicate():
                    dist.all_reduce(sq, group=mesh.get_group(mesh_dim))
        total_sq += sq
    total = total_sq.sqrt()
    if max_norm and max_norm > 0:
        # A tensor, not a float: reading it would make the host wait for the GPU every step.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return total


class PreemptionSignal:
    """Catches SIGUSR2 (SLURM's warning before a time limit or preemption). The loop asks
    `agreed()` after each step, so every rank stops at the same step even though the signal
    reaches them at slightly different moments. Rank-agnostic: works under srun and torchrun.

    Agreement without a host sync per step: each call starts an all-reduce (MAX) of this rank's
    flag and returns the result of the one the previous call started, which the GPU finished
    while it ran the step in between. So the run stops one step after a rank saw the signal,
    at the same step everywhere (every rank reads the same reduction); SLURM's warning comes
    minutes ahead (--signal=USR2@120)."""

    def __init__(self, signum: int = signal.SIGUSR2):
        self.signum = signum
        self.requested = False
        self._previous = signal.signal(signum, self._handle)
        self._pending: Optional[tuple] = None  # (host copy, its event) of the last call

    def _handle(self, signum, frame) -> None:
        logger.warning("received signal %d: will save and requeue after this step", signum)
        self.requested = True

    def agreed(self) -> bool:
        if not dist.is_initialized():
            return self.requested
        stop = self._finish_pending()
        device = collective_device()
        flag = torch.full((1,), int(self.requested), dtype=torch.int32, device=device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        # On a GPU the current stream waits for the reduction, the host does not. On the CPU
        # (gloo) the host waits here: no collective stays in flight into the next step.
        work.wait()
        host, event = flag, None
        if device.type != "cpu":
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.get_device_module(device.type).Event()
            event.record()
        self._pending = (host, event)
        return stop

    def _finish_pending(self) -> bool:
        """The previous call's agreement (False if none): by now its reduction has run."""
        if self._pending is None:
            return False
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return bool(host.numpy()[0])  # a host array: no device read

    def close(self) -> None:
        signal.signal(self.signum, self._previous)
        self._pending = None


def requeue_slurm_job(env: Optional[dict] = None) -> bool:
    """`scontrol requeue $SLURM_JOB_ID` (call on one rank, after the checkpoint is saved). False
    when not in a SLURM job or when scontrol refuses. SLURM stops the running tasks as soon as it
    requeues the job, possibly before scontrol has returned, so the log line comes first."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    job_id = job_id or env.get("SLURM_JOB_ID")
    if not job_id:
        logger.warning("not inside a SLURM job: checkpoint saved, not requeued")
        return False
    logger.warning("requeueing SLURM job %s: it will resume from the checkpoint just saved", job_id)
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        logger.error("scontrol requeue %s failed: %s", job_id, out.stderr.strip())
        return False
    return True
