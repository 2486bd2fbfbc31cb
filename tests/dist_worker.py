"""Runs a few training steps of a tiny model on fixed global batches with the trainer's own
setup (meta build, TP -> FSDP2 -> SAC, init, AdamW, clipping), under torchrun or alone, and
saves per-step losses, full gradients and parameters for tests/test_distributed.py.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT.pt distributed.dp_shard=2
    python tests/dist_worker.py OUT.pt
Extra `key=value` arguments are TrainArgs overrides. `load=CKPT` resumes model and optimizer
from a checkpoint first and runs two steps. `batches=pairs` makes each row a run of
input/output pairs (BOS = token 1, labels on the outputs only) whose lengths differ by row:
row 0 one pair longer than the window, the last row many short ones, so the ranks' segments
hold different numbers of documents.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from apps.main.train import IGNORE_INDEX, TrainArgs, memory_usage_stats, setup_model, train_step  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.checkpoint import load_model_and_optim  # noqa: E402
from lingua.distributed import (  # noqa: E402
    build_mesh,
    dp_rank_and_size,
    init_distributed,
    parallel_dims,
    set_cpu_threads,
    shutdown_distributed,
    world_info,
)
from lingua.optim import build_optimizer  # noqa: E402

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 32, 64, 5

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seqlen=32",
        f"model.vocab_size={VOCAB}", "optim.lr=1e-2", "optim.warmup=2", "optim.clip=0.5", "steps=100",
        "dump_dir=/unused"]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def pair_rows(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[GLOBAL_BATCH, SEQ + 1] tokens of input/output pairs, each pair BOS + input + output,
    pairs longer in the first rows than in the last; labels IGNORE_INDEX on BOS and inputs."""
    tokens = torch.empty(GLOBAL_BATCH, SEQ + 1, dtype=torch.long)
    scored = torch.zeros(GLOBAL_BATCH, SEQ + 1, dtype=torch.bool)
    for row in range(GLOBAL_BATCH):
        longest = max(4, (2 * SEQ) >> (2 * row))  # 64, 16, 4, 4 tokens per pair at most
        pos = 0
        while pos < SEQ + 1:
            n_in, n_out = (int(torch.randint(1, max(2, longest // 2), (1,), generator=gen)) for _ in range(2))
            pair = torch.cat([torch.tensor([1]), torch.randint(2, VOCAB, (n_in + n_out,), generator=gen)])
            mask = torch.cat([torch.zeros(1 + n_in, dtype=torch.bool), torch.ones(n_out, dtype=torch.bool)])
            take = min(pair.numel(), SEQ + 1 - pos)
            tokens[row, pos : pos + take], scored[row, pos : pos + take] = pair[:take], mask[:take]
            pos += take
    labels = tokens[:, 1:].clone()
    labels[~scored[:, 1:]] = IGNORE_INDEX
    return tokens, labels


def run(out: str, overrides: list[str]) -> None:
    load = [o.split("=", 1)[1] for o in overrides if o.startswith("load=")]
    pairs = "batches=pairs" in overrides
    overrides = [o for o in overrides if not o.startswith(("load=", "batches="))]
    args = load_config(TrainArgs, TINY + overrides)
    world = world_info()
    set_cpu_threads(world)
    init_distributed(world)
    dims = parallel_dims(args.distributed, world.world_size)
    mesh = build_mesh(dims, "cpu") if world.world_size > 1 else None
    dp_rank, dp_size = dp_rank_and_size(mesh)
    model = setup_model(args, mesh, dims, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
    steps = STEPS
    if load:
        load_model_and_optim(load[0], model, optimizer)
        steps = 2

    gen = torch.Generator().manual_seed(1234)
    result = {"loss": [], "grad_norm": [], "grads": [], "dp_size": dp_size}
    per_rank = GLOBAL_BATCH // dp_size
    for _ in range(steps):
        if pairs:
            tokens, labels = pair_rows(gen)
        else:
            tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
            labels = tokens[:, 1:].clone()
            # Masked labels, unevenly spread over ranks: the step must still be the mean over all
            # trained labels, exactly as one process computes it.
            labels[torch.rand(labels.shape, generator=gen) < torch.linspace(0.0, 0.6, GLOBAL_BATCH)[:, None]] = IGNORE_INDEX
        rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        step = train_step(model, optimizer, scheduler, [(tokens[rows, :-1], labels[rows])], args.optim.clip, mesh)
        result["loss"].append(float(step.loss))
        result["grad_norm"].append(float(full(step.grad_norm)))
        # A frozen component (lr 0) has no gradient.
        result["grads"].append({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
    result["params"] = {n: full(p) for n, p in model.named_parameters()}
    result["memory_stats"] = memory_usage_stats(model)  # a collective: every rank calls it
    if world.rank == 0:
        torch.save(result, out)


def main() -> None:
    out, *overrides = sys.argv[1:]
    run(out, overrides)
    shutdown_distributed()  # after run() returned: the model no longer holds the process groups


if __name__ == "__main__":
    main()
