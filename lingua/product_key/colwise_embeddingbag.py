"""Column-wise parallel value tables (Memory Layers at Scale, section "memory parallelism").

With `distributed.memory_parallel_size = mp`, each rank of an mp group holds every value row
but only dim / mp of its columns: the table is a DTensor sharded on dim 1 over the "mp" mesh
dimension (and further sharded by FSDP over the remaining data-parallel dimensions). The mp
ranks are data-parallel peers with different tokens, so a lookup gathers the (row, weight)
pairs of the whole group, computes this rank's column slice of every bag, and an all-to-all
returns each token's full row to the rank that owns the token.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

BagFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_memory_parallel(value_dim: int, mp: int, peer_variant: bool = False) -> None:
    """Clear errors for layouts the column split cannot serve (the reference code assumed a
    power-of-two split without checking)."""
    if value_dim % mp:
        raise ValueError(f"the memory value width {value_dim} (model.productkey_args.mem_v_dim, or model.dim) "
                         f"is not divisible by distributed.memory_parallel_size={mp}")
    if peer_variant:
        raise ValueError("model.productkey_args.peer_variant needs whole rows of its down table for the expert "
                         "activations; it does not support distributed.memory_parallel_size > 1")


def shard_values_by_columns(values: nn.Module, mp_mesh) -> None:
    """Turn a ValueTable's parameters into DTensors sharded by columns over `mp_mesh` (works on
    the meta device, before FSDP and before initialisation, like tensor parallelism)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, param in list(values.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, mp_mesh, [Shard(1)], src_data_rank=None)
        values.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def _overlap_unsafe(group) -> bool:
    """Whether two functional collectives must not be in flight at once on `group`. Under gloo
    (torch 2.13) two unwaited funcol all-gathers corrupt the heap now and then ("malloc():
    unaligned tcache chunk detected", SIGSEGV; about 1 run in 3 of 3000 lookups, seen in CI),
    while the same pair through `dist.all_gather_into_tensor(async_op=True)` does not. NCCL
    overlaps them safely on its stream, so only gloo waits for each before the next."""
    return dist.get_backend(group) == "gloo"


def colwise_weighted_bag(table, rows: torch.Tensor, weights: torch.Tensor, bag: BagFn,
                         same_n_on_every_rank: bool = False) -> torch.Tensor:
    """The weighted bag `bag(table, rows, weights)` -> [N, dim] for a table that is a DTensor
    sharded by columns over one mesh dimension. rows, weights: [N, K] for this rank's tokens.
    N may differ between ranks (validation batches), so the group exchanges its sizes and pads
    to the largest N: reading them back makes the host wait for the GPU, and dynamo cannot
    trace it. `same_n_on_every_rank` skips the exchange: training batches have one shape on
    every rank (the loader packs [batch_size, seq_len]). Claimed wrongly, the all-gathers of
    unequal sizes fail (gloo) or hang (NCCL).

    Gradients: the weights' gradient sums the column slices' partial dot products over the
    group (the backward of the all-gather is a reduce-scatter); the table's gradient is scaled
    by 1/mp, because this rank's column slice already saw the tokens of all mp ranks, whose
    data-parallel average is completed by FSDP over the other dimensions only.
    """
    mesh = table.device_mesh
    group = mesh.get_group()
    mp = group.size()
    local_table = table.to_local()
    if local_table.requires_grad:
        local_table.register_hook(lambda grad: grad / mp)

    n = n_max = rows.shape[0]
    if not same_n_on_every_rank:
        sizes = torch.empty(mp, dtype=torch.long, device=rows.device)
        dist.all_gather_into_tensor(sizes, torch.tensor([n], dtype=torch.long, device=rows.device), group=group)
        n_max = int(sizes.max())
        # Padded bags read row 0 with weight 0: they add nothing and their outputs are dropped.
        rows = F.pad(rows, (0, 0, 0, n_max - n))
        weights = F.pad(weights, (0, 0, 0, n_max - n))

    one_at_a_time = _overlap_unsafe(group)
    all_rows = funcol.all_gather_single(rows, 0, group)  # [mp * n_max, K], integer: no gradient
    if one_at_a_time:
        all_rows = funcol.wait_tensor(all_rows)
    all_weights = funcol.all_gather_single_autograd(weights, 0, group)
    local_cols = bag(local_table, all_rows, all_weights)  # [mp * n_max, dim / mp]
    # Block j of local_cols holds rank j's tokens: send it there; receive my tokens' slice j from rank j.
    mine = funcol.all_to_all_single_autograd(local_cols, None, None, group)  # waited on first use
    cols = mine.view(mp, n_max, -1)[:, :n]  # [mp, N, dim / mp]
    return cols.permute(1, 0, 2).reshape(n, -1)
