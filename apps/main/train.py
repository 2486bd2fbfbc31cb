"""The training loop of every app: data -> model -> AdamW with grad accumulation and
clipping -> metrics, checkpoints, validation. Other apps reuse `train` by passing their own
`build_model_fn`; they never copy this loop.

    python -m apps.main.train config=apps/main/configs/debug.yaml [key=value ...]
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from apps.main.eval import EvalArgs, evaluate_harness, log_pairs, run_validation
from apps.main.pairs import evaluate_pairs
from apps.main.transformer import IGNORE_INDEX, LMTransformer, LMTransformerArgs, build_model
from lingua.args import ConfigError, cli_main, dump_config, from_dict, to_dict
from lingua.cadence import Cadence, CadenceArgs, EarlyStoppingArgs, check_metric
from lingua.checkpoint import (
    CheckpointArgs,
    CheckpointManager,
    DiskFull,
    load_model_and_optim,
    load_model_weights,
    train_state_file,
)
from lingua.data import DataArgs, DataError, build_data_loader, source_files
from lingua.distributed import (
    DistributedArgs,
    EnvironmentArgs,
    ParallelDims,
    PreemptionSignal,
    WorldInfo,
    apply_numerics,
    autocast_context,
    build_mesh,
    check_memory_parallel_within_nodes,
    check_numerics,
    clip_grad_norm_,
    default_device,
    dp_rank_and_size,
    init_distributed,
    loader_start_method,
    node_of_each_rank,
    parallel_dims,
    parallelize_model,
    requeue_slurm_job,
    set_cpu_threads,
    setup_env,
    shutdown_distributed,
    tp_rank,
    training_dtype,
    world_info,
)
from lingua.transformer import ParamInit
from lingua.logger import init_logger
from lingua.metrics import LoggingArgs, MetricLogger, peak_flops
from lingua.mhc import AMAX_WARN, amax_stats
from lingua.optim import OptimArgs, build_optimizer, group_lrs
from lingua.product_key.memory import auxiliary_losses
from lingua.profiling import ProfilerArgs, maybe_profile
from lingua.storage import StagedFile, StoragePath, check_reachable, in_process_only, is_url, resolve
from lingua.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    name: str = "lingua"
    dump_dir: str = ""
    seed: int = 42
    grad_acc_steps: int = 1
    gc_collect_freq: int = 1000
    probe_freq: Optional[int] = None  # accepted for Meta Lingua configs; probing is not implemented
    steps: int = 1000
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    model: LMTransformerArgs = field(default_factory=LMTransformerArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    env: EnvironmentArgs = field(default_factory=EnvironmentArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    early_stopping: EarlyStoppingArgs = field(default_factory=EarlyStoppingArgs)
    profiling: ProfilerArgs = field(default_factory=ProfilerArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    async_eval_gpus: Optional[int] = None  # set: eval runs as its own SLURM job with this many GPUs (0: CPU)
    eval: Optional[dict[str, Any]] = None  # EvalArgs fields; run in-process every checkpoint.eval.every

    def max_window(self) -> Optional[int]:
        """The longest data.seq_len the model reads (None: any; a model that reads the window in
        segments checks its own segment length)."""
        return self.model.max_seqlen


@dataclass
class TrainState:
    step: int = 0
    data_loader: Optional[dict] = None
    scheduler: Optional[dict] = None
    tokens_seen: int = 0  # tokens read into batches, summed over data-parallel ranks
    tokens_trained: int = 0  # of those, the labels trained on (not masked), likewise summed
    cadence: Optional[dict] = None  # best validation metric and early stopping's count (Cadence)
    preempted: bool = False  # this process stopped early on SIGUSR2 (not saved)
    stop_reason: Optional[str] = None  # why the run ended before `steps` (early stopping; not saved)

    SAVED = ("step", "data_loader", "scheduler", "tokens_seen", "tokens_trained", "cadence")

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.SAVED}

    @classmethod
    def from_json(cls, saved: dict) -> "TrainState":
        return cls(**{k: saved[k] for k in cls.SAVED if k in saved})


class NonFiniteLoss(RuntimeError):
    pass


class StepOutOfMemory(RuntimeError):
    pass


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory_message(args: "TrainArgs", step: int, device: torch.device, last_good: Optional[StoragePath]) -> str:
    d = args.data
    return (f"out of memory in step {step} on {device}: micro-batches of {d.batch_size} x {d.seq_len} tokens "
            f"(data.batch_size x data.seq_len), {args.grad_acc_steps} per step. To fit, lower data.batch_size "
            "(raise grad_acc_steps to keep the tokens per step), lower data.seq_len, turn on "
            "distributed.selective_activation_checkpointing or distributed.checkpoint_each_layer, or train on "
            f"more data-parallel ranks (distributed.dp_shard shards the model). Last good checkpoint: "
            f"{last_good or 'none'}")


def validate_args(args: TrainArgs) -> tuple[Optional[EvalArgs], WorldInfo, ParallelDims]:
    """Everything that can be checked before any work: fails with the key at fault."""
    if not args.dump_dir:
        raise ConfigError("dump_dir is required (e.g. dump_dir=./dump/debug)")
    for key in ("steps", "grad_acc_steps", "logging.freq", "gc_collect_freq", "checkpoint.dump.every",
                "checkpoint.eval.every"):
        obj = args
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj < 1:
            hint = " (eval=null turns validation off)" if key == "checkpoint.eval.every" else ""
            raise ConfigError(f"config key '{key}' must be >= 1, got {obj}{hint}")
    if args.max_window() is not None and args.data.seq_len > args.max_window():
        raise ConfigError(f"data.seq_len={args.data.seq_len} exceeds model.max_seqlen={args.model.max_seqlen}")
    check_memory_model(args)
    if args.probe_freq:
        logger.warning("probe_freq is set but probing is not implemented; ignoring it")
    eval_args = from_dict(EvalArgs, args.eval) if args.eval is not None else None
    in_loop_eval = eval_args is not None and args.async_eval_gpus is None
    for key, wanted in (("early_stopping.patience", args.early_stopping.patience > 0),
                        ("checkpoint.save_best", args.checkpoint.save_best)):
        if wanted and not (in_loop_eval and eval_args.validation is not None):
            why = "async_eval_gpus runs it in another job" if args.async_eval_gpus is not None and eval_args \
                else "eval is null" if eval_args is None else "eval.validation is null"
            raise ConfigError(f"config key '{key}' needs the in-loop validation, but {why} (set eval.validation "
                              "and checkpoint.eval.every, without async_eval_gpus)")
    if args.early_stopping.patience < 0:
        raise ConfigError(f"config key 'early_stopping.patience' must be >= 0, got {args.early_stopping.patience}")
    if in_loop_eval and eval_args.validation is not None:
        try:
            check_metric(args.early_stopping.metric, list(eval_args.validation.sources) or list(args.data.sources))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    world = world_info()
    try:
        check_numerics(args.distributed)
        dims = parallel_dims(args.distributed, world.world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_storage(args, eval_args, world.world_size)
    if in_loop_eval and eval_args.pairs.path and world.world_size > 1:
        raise ConfigError("eval.pairs.path in the training loop runs on one process (each pair generates a "
                          "different number of tokens, which a sharded model cannot follow): evaluate the "
                          "checkpoints with `python -m apps.main.eval ckpt_dir=... pairs.path=...` instead")
    if in_loop_eval and eval_args.harness.tasks:  # a bad task must not wait for the first eval
        from apps.main.harness import checked_task_manager

        checked_task_manager(eval_args.harness)
    return eval_args, world, dims


def check_memory_model(args: "TrainArgs") -> None:
    """Segment and memory settings that cannot work, named before any work."""
    m = args.model
    try:
        m.check_memory(bos_known=False)  # data_and_tokenizer fills bos_id
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if m.segment_length > 0 and not args.data.add_bos:
        raise ConfigError("model.segment_length > 0 needs data.add_bos=true: memory state starts empty at every "
                          "document's BOS, so without it documents would share memory")
    for key in ("use_internal_memory", "use_external_memory"):
        if getattr(m, key) and args.distributed.tp_size > 1:
            raise ConfigError(f"model.{key} does not run under tensor parallelism yet (the memory's heads and "
                              "projections are not sharded): set distributed.tp_size=1 (FSDP works)")


def check_storage(args: "TrainArgs", eval_args: Optional[EvalArgs], world_size: int) -> None:
    """The URLs among the output and checkpoint paths: reachable through fsspec, visible to
    every process, and not handed to what needs a shared filesystem (SLURM's eval jobs)."""
    urls = {"dump_dir": args.dump_dir, "checkpoint.path": args.checkpoint.path,
            "checkpoint.init_ckpt_path": args.checkpoint.init_ckpt_path,
            "eval.metric_log_dir": eval_args.metric_log_dir if eval_args is not None else None}
    for key, url in urls.items():
        check_reachable(key, url)
        if url and world_size > 1 and in_process_only(url):
            raise ConfigError(f"{key}='{url}' lives in one process's memory: the other {world_size - 1} "
                              "process(es) would not see it (memory:// is for one-process runs and tests)")
    if args.async_eval_gpus is not None and is_url(args.dump_dir):
        raise ConfigError(f"async_eval_gpus submits sbatch jobs that write their logs under dump_dir, which needs a "
                          f"shared filesystem path, not the URL '{args.dump_dir}'")


def data_and_tokenizer(args: "TrainArgs"):
    """Checks the data sources (errors before any work, naming the source) and builds the
    tokenizer (model_tokenizer)."""
    source_files(args.data)
    return model_tokenizer(args)


def model_tokenizer(args: "TrainArgs"):
    """data.tokenizer; model.vocab_size <= 0 takes its size, a smaller one is an error."""
    tokenizer = build_tokenizer(args.data.tokenizer.name, args.data.tokenizer.path)
    if args.model.vocab_size <= 0:
        args.model.vocab_size = tokenizer.n_words
    elif args.model.vocab_size < tokenizer.n_words:
        raise ConfigError(f"model.vocab_size={args.model.vocab_size} < tokenizer n_words={tokenizer.n_words}")
    if args.model.bos_id < 0:  # segment models find documents by their BOS
        args.model.bos_id = tokenizer.bos_id
    return tokenizer


def start_processes(args: "TrainArgs", world: WorldInfo, dims: ParallelDims):
    """Environment, numerics, CPU threads, device and process group of this rank; (device,
    mesh), the mesh None for one process."""
    setup_env(args.env)
    apply_numerics(args.distributed)
    set_cpu_threads(world)
    device = default_device(world.local_rank)
    init_distributed(world)
    if dims.mp > 1 and not args.distributed.memory_parallel_across_nodes:  # else no need to gather the nodes
        try:
            check_memory_parallel_within_nodes(dims, node_of_each_rank(world), allowed=False)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    mesh = build_mesh(dims, device.type) if world.world_size > 1 else None
    return device, mesh


def batch_to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch (numpy input, labels) as tensors on `device`."""
    return tuple(host_to_device(torch.from_numpy(a), device) for a in batch)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy that does not block the host: from pageable memory a non_blocking copy is
    synchronous (the driver stages it), so the batch is pinned first."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def device_memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated memory since the last call and allocator retries (each a cudaFree of the
    cache: a sign that the run barely fits), for metrics.jsonl; nothing off GPUs."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    out = {"max_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,
           "max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
           "alloc_retries": stats.get("num_alloc_retries", 0), "ooms": stats.get("num_ooms", 0)}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def setup_model(
    args: TrainArgs, mesh, dims: ParallelDims, device: torch.device, build_model_fn: Callable = build_model
) -> LMTransformer:
    """Build on the meta device, shard, then materialise and initialise only this rank's part."""
    model = build_model_fn(args.model, "meta")
    model = parallelize_model(model, mesh, dims, args.distributed, device)
    model.to_empty(device=device)
    # to_empty re-creates each module's parameters one by one, so a tied output and embedding
    # come back as two tensors; reset_parameters would then skip the output (tied, it says)
    # and leave it uninitialised. Tie them again first.
    if getattr(model, "weight_tying", False):
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        model.reset_parameters(ParamInit(args.model.seed))
    return model


@dataclass
class StepResult:
    """Device tensors, read by the loop on logging steps only: a read makes the host wait for
    the GPU, and a wait per step would drain its queue of kernels."""

    loss: torch.Tensor  # mean over every trained token of the step, on all ranks
    tokens_trained: torch.Tensor  # labels that were not IGNORE_INDEX, summed over data-parallel ranks
    grad_norm: torch.Tensor
    finite: torch.Tensor  # False: loss or gradient norm was not finite and the update was skipped
    # Memory layers' auxiliary terms (times their coefficients), mean over micro-batches; {} when off.
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def sum_over_data_ranks(value: torch.Tensor, mesh) -> torch.Tensor:
    """Sum of a per-rank scalar over data-parallel ranks (TP peers hold the same batch, so the
    all-rank sum counts each batch tp times)."""
    if mesh is None:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / mesh["tp"].size()


def train_step(model, optimizer, scheduler, micro_batches, clip: float, mesh=None,
               precision: Callable[[], Any] = nullcontext) -> StepResult:
    """One optimizer step over grad-accumulation micro-batches, without a single read of a
    device value on the host.

    The loss is normalised by the number of trained labels in the whole step (all micro-batches
    and data-parallel ranks), so a token weighs the same wherever packing put it, and masked
    prompt tokens count for nothing. FSDP averages gradients over the dp_size data-parallel
    ranks, hence the dp_size factor in each rank's scale. `precision` makes the context of each
    forward (autocast where FSDP does not cast: lingua.distributed.autocast_context).

    A non-finite loss or gradient norm (all ranks see the same global values) skips the update
    on the device: the fused AdamW takes `found_inf` as GradScaler hands it, and leaves
    parameters, moments and step counts as they were. The schedule still advances; the loop
    stops at its next check (StepLedger), so no NaN ever reaches the weights or a checkpoint."""
    optimizer.zero_grad(set_to_none=True)
    device = micro_batches[0][0].device
    n_local = torch.stack([(y != IGNORE_INDEX).sum() for _, y in micro_batches]).sum().to(torch.float64)
    n_global = sum_over_data_ranks(n_local, mesh)
    scale = dp_rank_and_size(mesh)[1] / n_global.clamp(min=1.0)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    # FSDP reduce-scatters gradients after each backward: only the last micro-batch's needs to.
    sync_grads = getattr(model, "set_requires_gradient_sync", None)
    aux_mean: dict[str, torch.Tensor] = {}
    for i, (x, y) in enumerate(micro_batches):
        if sync_grads is not None:
            sync_grads(i == len(micro_batches) - 1)
        with precision():
            loss = model(x, target=y, reduction="sum")
        total = loss * scale.to(loss.dtype)
        # Auxiliary terms of this forward, already over the global batch ({} and no collective
        # when off); in the same backward as the loss (FSDP2 refuses a second one), with no
        # dp factor: lingua.product_key.memory.auxiliary_losses says why.
        for name, value in auxiliary_losses(model, mesh).items():
            total = total + value / len(micro_batches)
            aux_mean[name] = aux_mean.get(name, 0) + value.detach() / len(micro_batches)
        total.backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm_(model.parameters(), clip)
    mean_loss = sum_over_data_ranks(loss_sum, mesh) / n_global.clamp(min=1.0)
    finite = torch.isfinite(mean_loss) & torch.isfinite(grad_norm)
    optimizer.found_inf = (~finite).float()
    optimizer.step()
    scheduler.step()
    return StepResult(mean_loss, n_global, grad_norm, finite, aux_mean)


class StepLedger:
    """What the loop learns from each step's device tensors, kept on the device between reads:
    the labels trained on, and the first step whose update was skipped as non-finite.
    `settle` reads them (one wait for the GPU), at logging steps and before every save."""

    def __init__(self, device: torch.device):
        self.tokens_trained = torch.zeros((), device=device, dtype=torch.float64)
        self.bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.bad_loss = torch.zeros((), device=device, dtype=torch.float64)
        self.bad_grad_norm = torch.zeros((), device=device, dtype=torch.float64)

    def record(self, step: int, result: StepResult) -> None:
        self.tokens_trained += result.tokens_trained
        first = ~result.finite & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, result.loss.double(), self.bad_loss)
        self.bad_grad_norm = torch.where(first, result.grad_norm.double(), self.bad_grad_norm)

    def settle(self, state: "TrainState", last_good: Optional[StoragePath]) -> None:
        """Fold the trained-label count into `state`; raise NonFiniteLoss if a step was skipped."""
        bad_step = int(self.bad_step)
        if bad_step >= 0:
            raise NonFiniteLoss(
                f"loss is {float(self.bad_loss)}, gradient norm {float(self.bad_grad_norm)} at step {bad_step}: "
                f"the update was not applied; stopping. Last good checkpoint: {last_good or 'none'}")
        state.tokens_trained += int(self.tokens_trained)
        self.tokens_trained.zero_()


def memory_usage_stats(model) -> dict[str, dict[str, float]]:
    """Usage statistics of every module that keeps them (memory layers) over all ranks' lookups,
    reset for the next window; a collective, so every rank calls it at the same steps."""
    out = {}
    for name, module in model.named_modules():
        stats_fn = getattr(module, "usage_stats", None)
        if callable(stats_fn):
            stats = stats_fn()
            if stats:
                out[name.removesuffix(".feed_forward")] = stats
    return out


def hyper_connection_stats(model) -> dict[str, float]:
    """Amax gains of the model's hyper-connections in the last forward (all ranks; a collective),
    with a warning when the residual path amplifies beyond AMAX_WARN."""
    connections = model.hyper_connections() if hasattr(model, "hyper_connections") else []
    stats = amax_stats(connections)
    worst = max(stats.values(), default=0.0)  # every entry is an Amax gain
    if worst > AMAX_WARN:
        logger.warning("mHC Amax gain %.3f > %.1f: the residual path amplifies (see mhc/* in metrics.jsonl)",
                       worst, AMAX_WARN)
    return stats


def _load_train_state(ckpt: CheckpointManager, latest: StoragePath, model, optimizer, dp_rank: int, dp_size: int) -> TrainState:
    saved = ckpt.load(latest, model, optimizer, dp_rank=dp_rank)
    if saved is None or saved.get("dp_size", dp_size) != dp_size:
        # Model and optimizer reshard freely (DCP); a data position does not carry over to a
        # different number of data-parallel readers. Everything else is the same on every rank,
        # and a rank without a file of its own must not start a fresh schedule: under FSDP its
        # shard of every tensor would follow another learning rate. All take rank 0's.
        logger.warning("checkpoint %s was saved with a different data-parallel size; model, optimizer, step "
                       "and schedule are loaded, the data loader restarts from the beginning of its shard", latest)
        saved = {**json.loads(train_state_file(latest, 0).read_text()), "data_loader": None}
    return TrainState.from_json(saved)


def sync_outputs(*staged: Optional[StagedFile | MetricLogger]) -> None:
    """Upload what was appended to a remote dump_dir's files since the last sync (no-op locally)."""
    for f in staged:
        if f is not None:
            f.sync()


def default_loader(args: TrainArgs, dp_rank: int, dp_size: int, state: Optional[dict]):
    """lingua.data's packed, resumable batches of this data-parallel rank."""
    return build_data_loader(args.data, dp_rank, dp_size, state, start_method=loader_start_method(args.distributed))


def train(args: TrainArgs, build_model_fn: Callable = build_model, build_loader_fn: Callable = default_loader,
          tokenizer_fn: Optional[Callable] = None) -> TrainState:
    """The loop. Apps bring their own parts: `build_model_fn(model_args, device)` (a module whose
    forward(x, target=y, reduction="sum") is the summed loss), `build_loader_fn(args, dp_rank,
    dp_size, state)` (batches of (inputs, labels) with state_dict / load_state_dict / close) and
    `tokenizer_fn(args)` (checks the data, returns the tokenizer; default data_and_tokenizer)."""
    eval_args, world, dims = validate_args(args)
    tokenizer = (tokenizer_fn or data_and_tokenizer)(args)

    dump_dir = resolve(args.dump_dir)  # a Path, or a lingua.storage.RemotePath for an fsspec URL
    dump_dir.mkdir(parents=True, exist_ok=True)
    # Appended locally; a remote dump_dir gets it at every checkpoint and validation, and when
    # train() returns or fails (object stores cannot append).
    train_log = StagedFile(dump_dir / "train.log") if world.rank == 0 else None
    init_logger(world.rank, str(train_log.local) if train_log is not None else None)
    try:
        device, mesh = start_processes(args, world, dims)
        dp_rank, dp_size = dp_rank_and_size(mesh)
        if world.rank == 0:
            dump_config(args, dump_dir / "config.yaml")
            logger.info("%d process(es) via %s: dp_replicate=%d dp_shard=%d (memory_parallel=%d) tp=%d on %s",
                        world.world_size, world.launcher, dims.dp_replicate, dims.dp_shard, dims.mp, dims.tp, device)
        torch.manual_seed(args.seed)

        model = setup_model(args, mesh, dims, device, build_model_fn)
        precision = autocast_context(args.distributed, device, fsdp=dims.dp > 1)
        optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
        ckpt = CheckpointManager(args.checkpoint, dump_dir, eval_enabled=eval_args is not None)
        ckpt.remove_stale_tmp()
        state = TrainState()
        latest = ckpt.latest()
        if latest is not None:
            state = _load_train_state(ckpt, latest, model, optimizer, dp_rank, dp_size)
            if state.scheduler is not None:
                scheduler.load_state_dict(state.scheduler)
            logger.info("resumed from %s at step %d", latest, state.step)
        elif args.checkpoint.init_ckpt_path:
            if args.checkpoint.continue_training_from_init:
                load_model_and_optim(args.checkpoint.init_ckpt_path, model, optimizer)
            else:
                load_model_weights(args.checkpoint.init_ckpt_path, model)
            logger.info("initialised from %s", args.checkpoint.init_ckpt_path)
        cadence = Cadence(CadenceArgs.from_train_args(args, validates=eval_args is not None), state.cadence)
        if args.checkpoint.save_best:
            ckpt.reconcile_best(cadence.best_step, {"metric": args.early_stopping.metric, "value": cadence.best})
        if state.step >= args.steps or cadence.stop_reason():
            why = cadence.stop_reason() or f"already at step {state.step} >= steps={args.steps}"
            logger.info("%s: nothing to do (checkpoints in %s)", why, ckpt.path)
            return state

        n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = model.flops_per_token(args.data.seq_len)
        peak, peak_source = peak_flops(device, training_dtype(args.distributed, device))
        logger.info("model: %.2fM parameters (this rank), %.1f MFLOP/token; MFU against %s (%.1f GFLOP/s)",
                    n_params / 1e6, flops_per_token / 1e6, peak_source, peak / 1e9)
        gc.disable()  # collect on our schedule: an untimely collection stalls a step

        with ExitStack() as stack:
            loader = build_loader_fn(args, dp_rank, dp_size, state.data_loader)
            stack.callback(loader.close)
            metrics = None
            if world.rank == 0:
                metrics = stack.enter_context(MetricLogger(dump_dir / "metrics.jsonl", args.logging.wandb, to_dict(args)))
            profiler = stack.enter_context(maybe_profile(args.profiling, str(dump_dir), world.rank))
            preemption = PreemptionSignal()
            stack.callback(preemption.close)
            window = ThroughputWindow(tokens_per_step=args.data.batch_size * args.data.seq_len * args.grad_acc_steps
                                      * dp_size, flops_per_token=flops_per_token, peak=peak * world.world_size)
            ledger = StepLedger(device)
            model.train()
            while state.step < args.steps:
                window.step_started()
                micro_batches = window.timed_data(
                    lambda: [batch_to_device(next(loader), device) for _ in range(args.grad_acc_steps)])
                try:
                    result = train_step(model, optimizer, scheduler, micro_batches, args.optim.clip, mesh, precision)
                except Exception as e:  # noqa: BLE001 - only an allocation failure is turned into advice
                    if not is_out_of_memory(e):
                        raise
                    raise StepOutOfMemory(out_of_memory_message(args, state.step + 1, device, ckpt.latest())) from None
                state.step += 1
                ledger.record(state.step, result)
                state.tokens_seen += window.tokens_per_step
                window.step_done()
                profiler.step()
                if state.step % args.gc_collect_freq == 0:
                    gc.collect()

                due = cadence.at(state.step, preemption.agreed())
                if due.log or due.save:
                    ledger.settle(state, ckpt.latest())  # waits for the step; never save after a skipped step
                if due.log:
                    log_step(metrics, state, result, scheduler, window, model, device)
                new_best = False
                if due.eval and args.async_eval_gpus is None:
                    results = validate_in_loop(model, tokenizer, eval_args, args, device, dp_rank, dp_size, dims.tp,
                                               precision, state.step, dump_dir if world.rank == 0 else None,
                                               build_model_fn)
                    sync_outputs(train_log)
                    new_best = bool(results) and cadence.validated(state.step, results)
                if due.save:
                    state.data_loader = loader.state_dict()
                    state.scheduler = scheduler.state_dict()
                    state.cadence = cadence.state_dict()
                    train_state = {**state.to_json(), "dp_size": dp_size}
                    saved = ckpt.save(model, optimizer, train_state, to_dict(args), state.step, dp_rank=dp_rank,
                                      write_train_state=tp_rank(mesh) == 0)
                    if new_best and args.checkpoint.save_best:
                        ckpt.save_best(saved, {"step": state.step, "metric": args.early_stopping.metric,
                                               "value": cadence.best, "checkpoint": saved.name})
                    sync_outputs(train_log, metrics)
                if due.eval and args.async_eval_gpus is not None and world.rank == 0:
                    submit_async_eval(args, dump_dir, ckpt.path / f"{state.step:010d}", state.step)
                if due.preempted:
                    state.preempted = True
                    if world.rank == 0:
                        requeue_slurm_job()
                    break
                state.stop_reason = cadence.stop_reason()
                if state.stop_reason:
                    break
                if due.save:  # keep checkpoint and eval time out of the next wps window
                    window.reset()
        gc.enable()
        if state.preempted:
            logger.warning("stopped at step %d on a preemption signal; checkpoint %s", state.step, ckpt.latest())
            return state
        if world.rank == 0:
            best = ckpt.path / "best"
            ended = f"{state.stop_reason}; stopped at step {state.step} of {args.steps}" if state.stop_reason \
                else f"done: {state.step} steps"
            print(f"{ended}. dump_dir: {dump_dir}\n"
                  f"  metrics:     {dump_dir / 'metrics.jsonl'}\n"
                  f"  checkpoint:  {ckpt.latest()}\n"
                  + (f"  best:        {best} (step {cadence.best_step}, {args.early_stopping.metric} "
                     f"{cadence.best:.4f})\n" if args.checkpoint.save_best and best.exists() else "")
                  + f"next: python -m apps.main.eval ckpt_dir={dump_dir}\n"
                  f"      python -m apps.main.generate ckpt_dir={dump_dir} prompt='def '", flush=True)
        return state
    finally:  # also when the run fails: its last log lines are the ones wanted
        gc.enable()
        sync_outputs(train_log)


class ThroughputWindow:
    """Tokens, time and data-loading time since the last logged step (or save), for wps and MFU."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.data_time, self.step_start = time.perf_counter(), 0, 0.0, time.perf_counter()

    def step_started(self) -> None:
        self.step_start = time.perf_counter()

    def timed_data(self, fetch: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fetch()
        self.data_time += time.perf_counter() - t0
        return out

    def step_done(self) -> None:
        self.tokens += self.tokens_per_step

    def speed(self) -> dict[str, float]:
        now = time.perf_counter()
        wps = self.tokens / (now - self.start)
        return {"wps": wps, "FLOPS": wps * self.flops_per_token, "MFU": wps * self.flops_per_token / self.peak,
                "curr_iter_time": now - self.step_start, "data_load_time": self.data_time}


def log_step(metrics: Optional[MetricLogger], state: TrainState, result: StepResult, scheduler, window: ThroughputWindow,
             model, device: torch.device) -> None:
    """One metrics.jsonl row and log line (collectives inside: every rank calls it)."""
    loss_value, grad_norm = float(result.loss), float(result.grad_norm)
    speed = window.speed()
    memory_stats = memory_usage_stats(model)
    mhc_stats = hyper_connection_stats(model)
    gpu_memory = device_memory_stats(device)
    if metrics is not None:
        metrics.log({
            "global_step": state.step,
            "loss/out": loss_value,
            **{f"loss/{name}": float(value) for name, value in result.aux.items()},
            "optim": {"lr": scheduler.get_last_lr()[0], "lr_group": group_lrs(scheduler.optimizer), "grad_norm": grad_norm,
                      "total_tokens": state.tokens_seen},
            "data": {"tokens_read": state.tokens_seen, "tokens_trained": state.tokens_trained,
                     "step_tokens_trained": int(result.tokens_trained)},
            **({"memory": memory_stats} if memory_stats else {}),
            **({"mhc": mhc_stats} if mhc_stats else {}),
            **({"gpu_memory": gpu_memory} if gpu_memory else {}),
            "speed": speed,
        })
    logger.info("step %d  loss %.4f  lr %.2e  gnorm %.3f  %.0f tok/s  MFU %.2f  data %.3fs  tokens trained/read %d/%d",
                state.step, loss_value, scheduler.get_last_lr()[0], grad_norm, speed["wps"], speed["MFU"],
                speed["data_load_time"], state.tokens_trained, state.tokens_seen)
    window.reset()


def validate_in_loop(model, tokenizer, eval_args: EvalArgs, args: TrainArgs, device, dp_rank: int, dp_size: int,
                     tp: int, precision, step: int, dump_dir: Optional[StoragePath],
                     build_model_fn: Callable = build_model) -> dict:
    """Validation of the model being trained; dump_dir (rank 0 only) gets metrics.validation.jsonl.
    In the precision it trains in, and eagerly: its other grad mode and batch shapes would each
    compile more graphs of the blocks, up to the recompile limit, past which training runs eager."""
    results: dict = {}
    if eval_args.validation is not None:
        with precision(), torch.compiler.set_stance("force_eager"):
            results = run_validation(model, tokenizer, eval_args.validation, args.data, device, dp_rank, dp_size,
                                     replicas_per_shard=tp)
    if dump_dir is not None and results:
        with MetricLogger(resolve(eval_args.metric_log_dir or dump_dir) / "metrics.validation.jsonl") as m:
            m.log({"global_step": step, "val": results})
        logger.info("validation at step %d: %s", step, {k: round(v["loss"], 4) for k, v in results.items()})
    if eval_args.pairs.path:  # one process only (validate_args): generation lengths differ per pair
        with precision(), torch.compiler.set_stance("force_eager"):
            pairs = evaluate_pairs(model, tokenizer, eval_args.pairs, args.data, device)
        log_pairs(resolve(eval_args.metric_log_dir or dump_dir), step, f"step {step}", eval_args.pairs.path, pairs)
    if eval_args.harness.tasks:
        # The harness gives each rank different requests, which a sharded model cannot follow:
        # with several processes every rank scores its share on a whole replica (as Meta Lingua's
        # in-process eval, which loads the consolidated checkpoint on each rank).
        replica = model if not (dist.is_available() and dist.is_initialized()) \
            else whole_replica(model, device, build_model_fn)
        out_dir = resolve(eval_args.metric_log_dir or dump_dir) if dump_dir is not None else None
        with precision(), torch.compiler.set_stance("force_eager"):
            evaluate_harness(eval_args.harness, replica, tokenizer, device, out_dir, step, f"step {step}",
                             rank=dist.get_rank() if replica is not model else 0)
        del replica
    return results


def whole_replica(model, device: torch.device, build_model_fn: Callable = build_model):
    """An unsharded copy of a sharded (FSDP/TP) model on this rank, for evaluation; collective.
    It holds the whole model on every rank, besides the shards (as Meta Lingua's in-process
    eval, which loads the consolidated checkpoint on each rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    replica = build_model_fn(model.args, device)
    replica.load_state_dict(state)  # strict; the tied output weight comes in through the embedding's
    del state
    return replica.eval()


def submit_async_eval(args: TrainArgs, dump_dir: Path, ckpt: Path, step: int) -> None:
    """Validation of checkpoint `ckpt` as its own SLURM job; training goes on (rank 0 only)."""
    from lingua.stool import submit_eval_job

    job = submit_eval_job(dump_dir, ckpt, step, args.eval or {}, ngpu=args.async_eval_gpus)
    logger.info("submitted eval job %s for step %d (logs in %s)", job, step,
                dump_dir / "evals" / f"{step:010d}" / "logs")


def main(argv: Optional[list[str]] = None) -> None:
    args = cli_main(TrainArgs, argv)
    try:
        train(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteLoss, StepOutOfMemory, DiskFull) as e:
        logging.getLogger(__name__).error("%s", e)
        raise SystemExit(1) from None
    shutdown_distributed()


if __name__ == "__main__":
    main()
