"""One training step of a tiny model with a product-key memory and its auxiliary losses, laid
out as parallelize_model lays it out (meta build -> TP / memory parallel / FSDP2 -> init), on
fixed global micro-batches, under torchrun or alone; saves the terms and full gradients for
tests/test_pk_aux_losses.py.

    torchrun --nproc-per-node 2 tests/pk_aux_worker.py OUT.pt dp_shard=2
    python tests/pk_aux_worker.py OUT.pt
Extra `key=value` arguments are DistributedArgs fields. The same layout with every
coefficient 0 records what auxiliary_losses does then: its result and the collectives it issues.

The step is the one train_step takes with the terms added as memory.auxiliary_losses says:
loss_sum * dp_size / n_labels + sum(terms) / n_micro_batches per micro-batch, gradient sync on
the last micro-batch only. A second backward, of the terms plus 0 x the LM loss, isolates
the terms' gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from apps.main.transformer import IGNORE_INDEX, LMTransformerArgs, build_model  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.distributed import (  # noqa: E402
    DistributedArgs,
    build_mesh,
    dp_rank_and_size,
    init_distributed,
    parallel_dims,
    parallelize_model,
    set_cpu_threads,
    shutdown_distributed,
    world_info,
)
from lingua.product_key.memory import ProductKeyArgs, auxiliary_losses  # noqa: E402
from lingua.transformer import ParamInit  # noqa: E402

GLOBAL_BATCH, MICRO, SEQ, VOCAB = 8, 2, 16, 64
COEFS = dict(load_balance_coef=1.0, auxiliary_coef=2.0, z_loss_coef=0.05)


def model_args(coefs: dict) -> LMTransformerArgs:
    # Two memory layers sharing one value table, so the terms also sum over layers.
    pk = ProductKeyArgs(is_enabled=True, layers="0,1", mem_n_keys=8, mem_heads=2, mem_knn=3, mem_k_dim=16, **coefs)
    return LMTransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seqlen=SEQ,
                             seed=7, productkey_args=pk)


class CollectiveCount(TorchDispatchMode):
    """Collectives issued while active (c10d ops and functional collectives)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def build(coefs: dict, mesh, dims, dist_args: DistributedArgs):
    args = model_args(coefs)
    model = parallelize_model(build_model(args, "meta"), mesh, dims, dist_args, torch.device("cpu"))
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.reset_parameters(ParamInit(args.seed))
    return model.train()


def run(out: str, overrides: list[str]) -> None:
    dist_args = load_config(DistributedArgs, overrides, config_file=False)
    world = world_info()
    set_cpu_threads(world)
    init_distributed(world)
    dims = parallel_dims(dist_args, world.world_size)
    mesh = build_mesh(dims, "cpu") if world.world_size > 1 else None
    dp_rank, dp_size = dp_rank_and_size(mesh)

    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = IGNORE_INDEX
    # Global micro-batch i is rows [i * per_micro, (i + 1) * per_micro); this rank takes its share.
    per_micro = GLOBAL_BATCH // MICRO
    per_rank = per_micro // dp_size
    micro = []
    for i in range(MICRO):
        rows = slice(i * per_micro + dp_rank * per_rank, i * per_micro + (dp_rank + 1) * per_rank)
        micro.append((tokens[rows, :-1], labels[rows]))

    result = {"dp_size": dp_size, "terms": []}
    model = build(COEFS, mesh, dims, dist_args)
    n_global = (labels != IGNORE_INDEX).sum().double()  # the whole step's labels, all ranks
    scale = dp_size / n_global
    sync_grads = getattr(model, "set_requires_gradient_sync", None)  # FSDP only
    for i, (x, y) in enumerate(micro):
        if sync_grads is not None:
            sync_grads(i == MICRO - 1)
        loss = model(x, target=y, reduction="sum")
        terms = auxiliary_losses(model, mesh)
        (loss * scale.to(loss.dtype) + sum(terms.values()) / MICRO).backward()
        result["terms"].append({k: float(v.detach()) for k, v in terms.items()})
    result["grads"] = grads(model)

    # The terms' own gradient. The LM loss stays in the graph (times 0): under FSDP2 a backward
    # of the terms alone fails, its backward hooks sitting on the blocks' outputs.
    model.zero_grad(set_to_none=True)
    loss = model(micro[0][0], target=micro[0][1], reduction="sum")
    (loss * 0 + sum(auxiliary_losses(model, mesh).values())).backward()
    result["aux_grads"] = grads(model)

    off = build({k: 0.0 for k in COEFS}, mesh, dims, dist_args)
    off(micro[0][0], target=micro[0][1])
    with CollectiveCount() as count:
        result["off_terms"] = auxiliary_losses(off, mesh)
    result["off_collectives"] = count.n
    if world.rank == 0:
        torch.save(result, out)


def main() -> None:
    out, *overrides = sys.argv[1:]
    run(out, overrides)
    shutdown_distributed()


if __name__ == "__main__":
    main()
