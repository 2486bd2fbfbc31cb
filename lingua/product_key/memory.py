"""Product-key memory layers (Memory Layers at Scale, Berges et al. 2024; Lample et al. 2019).

A memory layer replaces the FFN of chosen blocks. For each token and head:
  query = Linear(dim, heads * k_dim)(x), split into two halves q1, q2 (optionally qk-normed);
  each half is scored against its own n_keys sub-keys and keeps its top knn;
  the knn x knn candidate sums s1[i] + s2[j] (value row i * n_keys + j) give the final top knn,
  which is the exact top knn over all n_keys^2 product keys;
  softmax (fp32) over those knn scores weights the value rows, and the heads' (row, weight)
  pairs form one weighted embedding bag over the n_keys^2 x v_dim value table.
Output: plain PK returns the bag (projected to dim if v_dim != dim); Memory+
(`swilu_projection`) returns W2(bag * SiLU(W1 x)); `mem_gated` multiplies by
sigmoid(Linear(dim, 1)(x)). The PEER variant (`peer_variant`) treats each row as a
one-neuron expert: out = sum_i w_i * up_i * GELU(down_i . x).

Shared values (`mem_share_values`) are one table owned by the model and handed to every
memory layer, which keeps a reference without registering it: parameters, state dicts and
checkpoints hold it once, and there is no process-global state. Value tables are tagged
as lookup tables (`ValueTable`): the optimizer gives them `value_fixed_lr` and `value_weight_decay`
(through `optim_overrides`, which is code, so it also holds after loading any checkpoint),
and FLOP counting charges only the heads * knn rows a token reads, not the whole table.

Optional auxiliary losses on sub-key usage (`load_balance_coef`, `auxiliary_coef`,
`z_loss_coef`; all 0 by default, and then free): each training forward keeps a few sums per
sub-key, and `auxiliary_losses(model, mesh)` turns the last forward's sums, added over the
data-parallel ranks, into loss terms for the training step (see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from lingua.product_key.colwise_embeddingbag import colwise_weighted_bag
from lingua.product_key.xformer_embeddingbag import weighted_bag
from lingua.transformer import ParamInit


@dataclass
class ProductKeyArgs:
    """`model.productkey_args`; field names as in Meta Lingua's memory-layers branch."""

    is_enabled: bool = False
    layers: str = ""  # 0-based indices of the blocks whose FFN becomes a memory, e.g. "4,12,20"
    mem_n_keys: int = 256  # sub-keys per half: n_keys^2 value rows
    mem_heads: int = 4
    mem_knn: int = 32
    mem_share_values: bool = True
    mem_k_dim: int = 512  # query / product-key width (two halves of k_dim / 2)
    mem_v_dim: int = -1  # value width; -1: the model dim
    swilu_projection: bool = True  # Memory+: W2(bag * SiLU(W1 x))
    value_fixed_lr: float = 1e-3  # lr of the value tables (the schedule still applies)
    value_weight_decay: float = 0.0  # weight decay of the value tables
    mem_gated: bool = False
    peer_variant: bool = False
    qk_norm: Optional[bool] = None  # None: on for Memory+, off for plain PK (the paper adds it)
    # Auxiliary losses on sub-key usage (router losses; see auxiliary_losses). 0: off, no cost.
    load_balance_coef: float = 0.0  # C * sum_i f_i * P_i
    auxiliary_coef: float = 0.0  # sum_i (f_i - 1/C)^2 (f counts hard selections: no gradient)
    z_loss_coef: float = 0.0  # mean logsumexp(sub-key scores)^2

    def layer_ids(self, n_layers: int) -> list[int]:
        """The memory blocks, checked against the model depth."""
        try:
            ids = sorted({int(s) for s in self.layers.replace(" ", "").split(",") if s != ""})
        except ValueError:
            raise ValueError(f"model.productkey_args.layers={self.layers!r}: expected comma-separated "
                             f"block indices like '1,3'") from None
        if self.is_enabled and not ids:
            raise ValueError("model.productkey_args.layers is empty: name the blocks that get a memory, e.g. '1'")
        bad = [i for i in ids if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"model.productkey_args.layers={self.layers!r}: {bad} outside 0..{n_layers - 1}")
        return ids

    def check(self, dim: int) -> None:
        for key in ("mem_n_keys", "mem_heads", "mem_knn"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.productkey_args.{key} must be >= 1, got {getattr(self, key)}")
        if self.mem_k_dim < 2 or self.mem_k_dim % 2:
            raise ValueError(f"model.productkey_args.mem_k_dim={self.mem_k_dim} must be even (two halves)")
        if self.mem_knn > self.mem_n_keys:
            raise ValueError(f"model.productkey_args.mem_knn={self.mem_knn} exceeds mem_n_keys={self.mem_n_keys}")
        if self.peer_variant and self.value_dim(dim) != dim:
            raise ValueError("model.productkey_args.peer_variant needs mem_v_dim = -1 or the model dim")
        for key in AUX_TERMS.values():
            if not getattr(self, key) >= 0:  # also refuses NaN
                raise ValueError(f"model.productkey_args.{key} must be >= 0, got {getattr(self, key)}")

    def value_dim(self, dim: int) -> int:
        return dim if self.mem_v_dim <= 0 else self.mem_v_dim

    def use_qk_norm(self) -> bool:
        return self.swilu_projection if self.qk_norm is None else self.qk_norm

    def aux_enabled(self) -> bool:
        return any(getattr(self, key) > 0 for key in AUX_TERMS.values())


# Loss-term name -> its coefficient in ProductKeyArgs.
AUX_TERMS = {"pk_load_balance": "load_balance_coef", "pk_auxiliary": "auxiliary_coef", "pk_z_loss": "z_loss_coef"}


class ValueTable(nn.Module):
    """n_keys^2 rows of values. PEER stores two tables (down- and up-projection vectors).

    Its parameters are read by row, never multiplied whole: FLOP counting recognises them by
    this module type (an attribute on the tensor would not survive to_empty or sharding).
    Memory layers read the attributes; it has no forward. A table that is its own FSDP unit
    (memory parallelism) is gathered before the blocks run (lingua.distributed.apply_fsdp):
    calling an FSDP module inside a compiled block would break its graph."""

    optim_component = "memory"  # also when the model owns it (shared across memory layers)

    def __init__(self, n_rows: int, v_dim: int, peer: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_rows, v_dim))
        self.down = nn.Parameter(torch.empty(n_rows, v_dim)) if peer else None

    def reset_parameters(self, init: ParamInit) -> None:
        init.trunc_normal_(self.weight, self.weight.shape[1] ** -0.5)
        if self.down is not None:
            init.trunc_normal_(self.down, self.down.shape[1] ** -0.5)


def subkey_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Each query half against its own sub-keys: q [N, H, 2, d], keys [H, 2, n_keys, d] ->
    [N, H, 2, n_keys]. In the inputs' precision (fp32 from search), also under autocast: bf16
    scores changed the top-32 set of most (token, head) pairs."""
    with torch.autocast(q.device.type, enabled=False):
        return torch.einsum("nhjd,hjkd->nhjk", q, keys)


def product_key_topk_from_subkeys(sub: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-knn over all n_keys^2 product keys from the sub-key scores [N, H, 2, n_keys].

    Returns (scores, rows), each [N, H, knn], row = i1 * n_keys + i2, sorted by score, and each
    half's own top-knn sub-keys [N, H, 2, knn]. The true top knn sums can only use each half's
    top knn, so searching the knn x knn candidates is exact."""
    n_keys = sub.shape[-1]
    top, idx = sub.topk(knn, dim=-1)
    candidates = (top[:, :, 0].unsqueeze(-1) + top[:, :, 1].unsqueeze(-2)).flatten(-2)  # [N, H, knn*knn]
    rows = (idx[:, :, 0].unsqueeze(-1) * n_keys + idx[:, :, 1].unsqueeze(-2)).flatten(-2)
    scores, best = candidates.topk(knn, dim=-1)
    return scores, rows.gather(-1, best), idx


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-knn over all n_keys^2 product keys. q1, q2: [N, H, d] query halves; keys1,
    keys2: [H, n_keys, d]. Returns (scores, rows), each [N, H, knn] (product_key_topk_from_subkeys)."""
    sub = subkey_scores(torch.stack([q1, q2], 2), torch.stack([keys1, keys2], 1))
    scores, rows, _ = product_key_topk_from_subkeys(sub, knn)
    return scores, rows


def lookup(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, training: bool = False) -> torch.Tensor:
    """The weighted bag over a whole table, or over a table sharded by columns across the
    memory-parallel group (a DTensor: see colwise_embeddingbag). `training`: every rank has
    the same number of tokens (training batches), so the group need not exchange its sizes."""
    if isinstance(table, DTensor):
        return colwise_weighted_bag(table, rows, weights, weighted_bag, same_n_on_every_rank=training)
    return weighted_bag(table, rows, weights)


class ProductKeyMemory(nn.Module):
    """A memory layer in place of a block's FFN: [B, S, dim] -> [B, S, dim]."""

    optim_component = "memory"  # lingua.optim: optim.memory_lr, 0 freezes the memory

    def __init__(self, dim: int, args: ProductKeyArgs, values: Optional[ValueTable] = None):
        super().__init__()
        args.check(dim)
        self.dim, self.args = dim, args
        self.heads, self.knn, self.n_keys = args.mem_heads, args.mem_knn, args.mem_n_keys
        self.half = args.mem_k_dim // 2
        self.v_dim = args.value_dim(dim)
        self.qk_norm = args.use_qk_norm()
        self.query_proj = nn.Linear(dim, self.heads * args.mem_k_dim, bias=True)
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, self.half))
        if values is None:
            self.values = ValueTable(self.n_keys**2, self.v_dim, args.peer_variant)
        else:
            # Shared: owned (and registered) by the model; a plain attribute here, so the
            # table is one parameter, saved once, however many layers read it.
            object.__setattr__(self, "values", values)
        self.owns_values = values is None
        self.value_proj = None
        if self.v_dim != dim and not args.swilu_projection:
            self.value_proj = nn.Linear(self.v_dim, dim, bias=False)
        self.swilu_w1 = self.swilu_w2 = None
        if args.swilu_projection and not args.peer_variant:
            self.swilu_w1 = nn.Linear(dim, self.v_dim, bias=False)
            self.swilu_w2 = nn.Linear(self.v_dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1, bias=True) if args.mem_gated else None
        # Row-hit counts since the last usage_stats() call; a buffer so it follows the device,
        # not persistent so checkpoints do not carry it.
        self.register_buffer("row_hits", torch.zeros(self.n_keys**2), persistent=False)
        # The sub-key sums of the last training model call's forwards of this layer (one per
        # segment) for the auxiliary losses (subkey_stats), until auxiliary_losses takes them;
        # None when those losses are off. Not state: never saved.
        self.aux_stats: Optional[dict[str, torch.Tensor]] = None

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax weights fp32, rows), each [N, heads, knn], for x [N, dim]."""
        weights, rows, _, _ = self._search(x)
        return weights, rows

    def _search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """search, plus the sub-key scores [N, heads, 2, n_keys] and each half's top-knn
        sub-keys [N, heads, 2, knn] that the auxiliary losses measure."""
        q = self.query_proj(x).view(-1, self.heads, 2, self.half).float()
        keys = self.keys.float()
        if self.qk_norm:
            q = F.rms_norm(q, (self.half,))
            keys = F.rms_norm(keys, (self.half,))
        sub = subkey_scores(q, keys)
        scores, rows, sub_idx = product_key_topk_from_subkeys(sub, self.knn)
        return F.softmax(scores, dim=-1), rows, sub, sub_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        weights, rows, sub, sub_idx = self._search(x)
        if self.training:
            with torch.no_grad():
                self.row_hits.index_add_(0, rows.flatten(), torch.ones_like(rows.flatten(), dtype=self.row_hits.dtype))
            if self.args.aux_enabled():
                stats = subkey_stats(sub, sub_idx, self.args)
                # Activation checkpointing's recomputation must repeat every op (it checks the
                # tensors saved), but keeps nothing: the loss already holds the first forward's
                # sums, and a copy kept here would pin the recomputed graph until the next step.
                if not _in_backward():
                    # Summed over the forwards of one model call: a segment model runs each
                    # layer once per segment, and the terms cover the whole window.
                    self.aux_stats = stats if self.aux_stats is None else \
                        {k: self.aux_stats[k] + v for k, v in stats.items()}
        rows, weights = rows.flatten(1), weights.flatten(1)
        table, down_table = self.values.weight, self.values.down
        if self.args.peer_variant:
            # One-neuron experts: activation of row i is GELU(down_i . x), then weighted up_i.
            down = F.embedding(rows, down_table)  # [N, H*knn, dim]
            act = F.gelu(torch.einsum("nkd,nd->nk", down, x)) * weights.to(x.dtype)
            out = weighted_bag(table, rows, act)
        else:
            out = lookup(table, rows, weights, training=self.training).to(x.dtype)
            if self.swilu_w1 is not None:
                out = self.swilu_w2(out * F.silu(self.swilu_w1(x)))
            elif self.value_proj is not None:
                out = self.value_proj(out)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x))
        return out.view(shape)

    def reset_parameters(self, init: ParamInit, init_std: float, factor: float) -> None:
        # Every parameter, biases included (left uninitialised after meta-device init in the
        # reference code). Sub-keys ~ 1/sqrt(half) keep initial scores O(1).
        init.trunc_normal_(self.query_proj.weight, init_std)
        init.zeros_(self.query_proj.bias)
        init.trunc_normal_(self.keys, self.half**-0.5)
        if self.owns_values:
            self.values.reset_parameters(init)
        if self.value_proj is not None:
            init.trunc_normal_(self.value_proj.weight, self.v_dim**-0.5 / factor)
        if self.swilu_w1 is not None:
            init.trunc_normal_(self.swilu_w1.weight, init_std)
            init.trunc_normal_(self.swilu_w2.weight, self.v_dim**-0.5 / factor)
        if self.gate is not None:
            init.trunc_normal_(self.gate.weight, init_std)
            init.zeros_(self.gate.bias)
        self.row_hits.zero_()

    def optim_overrides(self) -> dict[str, dict]:
        if not self.owns_values:
            return {}  # the model that owns the shared table declares it
        return value_overrides(self.values, "values", self.args)

    def lookup_params_per_token(self) -> int:
        """Value parameters one token reads (heads * knn rows), for FLOP counting."""
        tables = 2 if self.args.peer_variant else 1
        return tables * self.heads * self.knn * self.v_dim

    @torch.no_grad()
    def usage_stats(self, reset: bool = True) -> dict[str, float]:
        """How the value rows were used since the last call, by the lookups of all ranks: fraction
        of rows hit, KL of the row-access distribution from uniform (nats; 0 = perfectly even),
        the top row's share. A collective in a distributed run: call it on every rank."""
        hits = self.row_hits.double()
        if dist.is_available() and dist.is_initialized():
            # Sum over every rank; TP peers count the same lookups, which scales all counts
            # alike and leaves these (scale-free) statistics unchanged.
            dist.all_reduce(hits)
        total = float(hits.sum())
        if reset:
            self.row_hits.zero_()
        if total == 0:
            return {}
        p = hits / total
        nz = p[p > 0]
        return {
            "hit_fraction": float((hits > 0).double().mean()),
            "kl_uniform": float((nz * (nz.log() + math.log(len(p)))).sum()),
            "top_row_share": float(p.max()),
        }


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (eager activation checkpointing recomputing a
    forward). A compiled block recomputes inside its compiled backward, never in Python."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def subkey_stats(sub: torch.Tensor, sub_idx: torch.Tensor, args: ProductKeyArgs) -> dict[str, torch.Tensor]:
    """One forward's sums for the auxiliary losses, per head and sub-key half, from the sub-key
    scores `sub` [N, H, 2, C] (fp32, before top-k) and each half's top-knn sub-keys `sub_idx`
    [N, H, 2, knn]. Sums over tokens, not means, so that the data-parallel ranks' sums add up
    to the global batch's. Only what the enabled terms need:
      tokens [1]: N; counts [H, 2, C]: selections of each sub-key (no gradient);
      probs [H, 2, C]: sum of softmax(sub); lse_sq [H, 2]: sum of logsumexp(sub)^2."""
    n, heads, _, n_keys = sub.shape
    stats = {"tokens": sub.new_full((1,), n)}
    with torch.autocast(sub.device.type, enabled=False):  # softmax and logsumexp in fp32
        if args.load_balance_coef > 0 or args.auxiliary_coef > 0:
            # One fixed-size index_add over all (head, half) pairs: no host read (bincount has one).
            offsets = torch.arange(heads * 2, device=sub.device).view(1, heads, 2, 1) * n_keys
            flat = (sub_idx + offsets).flatten()
            counts = sub.new_zeros(heads * 2 * n_keys).index_add_(0, flat, torch.ones_like(flat, dtype=sub.dtype))
            stats["counts"] = counts.view(heads, 2, n_keys)
        if args.load_balance_coef > 0:
            stats["probs"] = sub.softmax(-1).sum(0)
        if args.z_loss_coef > 0:
            stats["lse_sq"] = sub.logsumexp(-1).square().sum(0)
    return stats


def aux_terms(stats: dict[str, torch.Tensor], args: ProductKeyArgs, knn: int) -> dict[str, torch.Tensor]:
    """The enabled terms of one memory layer, each times its coefficient, from sums of
    subkey_stats over a batch. Each head h and each half j is a router of its own over the C
    sub-keys of that half: its scores are the sub-key scores before top-k (query half . sub-key,
    after qk-norm when on, fp32), its selections the half's own top-knn sub-keys (the knn x knn
    candidates come from them; the final product rows are not what is counted). The batch is
    every input position, masked labels included (the memory reads each one). Per (h, j):
      f_i = selections of sub-key i / (tokens * knn) (sums to 1; counts, so no gradient),
      P_i = mean over tokens of softmax(scores)_i,
      load balance C * sum_i f_i P_i (1 when uniform), auxiliary sum_i (f_i - 1/C)^2 (0 when
      uniform), both then averaged over the heads and the two halves; z-loss: the mean over
      tokens, heads and halves of logsumexp(scores)^2."""
    tokens = stats["tokens"]
    out = {}
    if "counts" in stats:
        n_keys = stats["counts"].shape[-1]
        f = stats["counts"] / (tokens * knn)
    if args.load_balance_coef > 0:
        p = stats["probs"] / tokens
        out["pk_load_balance"] = args.load_balance_coef * n_keys * (f * p).sum(-1).mean()
    if args.auxiliary_coef > 0:
        out["pk_auxiliary"] = args.auxiliary_coef * (f - 1.0 / n_keys).square().sum(-1).mean()
    if args.z_loss_coef > 0:
        out["pk_z_loss"] = args.z_loss_coef * (stats["lse_sq"] / tokens).mean()
    return out


def clear_auxiliary_stats(model: nn.Module) -> None:
    """Drop sums a training forward left untaken (no auxiliary_losses call after it), so a model
    call's terms cover that call's forwards only; called as each model call starts."""
    for m in model.modules():
        if isinstance(m, ProductKeyMemory):
            m.aux_stats = None


def data_parallel_meshes(mesh) -> list:
    """The 1-D meshes over which ranks hold different tokens: every dimension of the trainer's
    mesh but "tp" (as lingua.distributed.dp_rank_and_size counts them), those of size 1 left out."""
    if mesh is None:
        return []
    return [mesh[name] for name in mesh.mesh_dim_names if name != "tp" and mesh[name].size() > 1]


def auxiliary_losses(model: nn.Module, mesh=None) -> dict[str, torch.Tensor]:
    """The product-key auxiliary loss terms of the model's last forward, each already times its
    coefficient and summed over memory layers: {"pk_load_balance", "pk_auxiliary", "pk_z_loss"},
    the enabled ones only; {} when all coefficients are 0, in eval mode, or when the forward's
    sums were already taken (each call takes them). See aux_terms for the definitions.

    `mesh`: the trainer's device mesh (None for one process). The statistics are over the
    global batch: the layers' sums travel in one tensor, all-reduced (differentiably) over each
    data-parallel mesh dimension, waited one at a time (gloo, see colwise_embeddingbag's
    _overlap_unsafe); TP peers hold the same tokens and are not summed. So every rank gets the
    value one process computes on the whole batch. A collective when any term is enabled:
    call it on every rank after every training forward; with all coefficients 0 it does nothing.

    How the training step uses it: after each micro-batch's forward, on every rank,
        loss_for_backward = loss_sum * scale + sum(terms.values()) / n_micro_batches
    with no data-parallel factor on the terms, in the LM loss's backward: a backward of the
    terms alone fails under FSDP2 ("data is not allocated"), whose backward hooks sit on the
    blocks' outputs, which only the LM loss's gradient passes. The all-reduce's backward sums
    the ranks' (identical) upstream gradients, giving each rank dp_size times its own part of
    the gradient; FSDP then averages over the dp_size ranks, which leaves exactly one process's
    gradient. With grad accumulation each micro-batch's terms are measured over that
    micro-batch of all ranks, and the step's objective is their mean over micro-batches."""
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory) and m.aux_stats is not None]
    if not layers:
        return {}
    local = [m.aux_stats for m in layers]
    for m in layers:
        m.aux_stats = None
    flat = torch.cat([t.flatten() for stats in local for t in stats.values()])
    for dp_mesh in data_parallel_meshes(mesh):
        flat = funcol.wait_tensor(funcol.all_reduce(flat, "sum", dp_mesh))
    pieces = iter(flat.split([t.numel() for stats in local for t in stats.values()]))
    totals: dict[str, torch.Tensor] = {}
    for m, stats in zip(layers, local):
        global_stats = {k: next(pieces).view_as(v) for k, v in stats.items()}
        for name, value in aux_terms(global_stats, m.args, m.knn).items():
            totals[name] = totals[name] + value if name in totals else value
    return totals


def value_overrides(values: ValueTable, prefix: str, args: ProductKeyArgs) -> dict[str, dict]:
    override = {"lr": args.value_fixed_lr, "weight_decay": args.value_weight_decay, "name": "memory_values"}
    names = ["weight"] + (["down"] if values.down is not None else [])
    return {f"{prefix}.{n}": dict(override) for n in names}
