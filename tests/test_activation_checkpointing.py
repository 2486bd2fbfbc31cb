"""distributed.checkpoint_each_layer (Memory Layers' full activation checkpointing): each block
keeps only its inputs and runs its forward again in backward. Same losses, gradients and
parameter names as without it, less memory than selective checkpointing, and on 2 ranks (FSDP
with column-parallel memory values) the single-process result."""

from __future__ import annotations

import logging

import pytest
import torch

from apps.main.train import TrainArgs, setup_model, train_step
from apps.main.transformer import LMTransformerArgs, build_model
from lingua.args import load_config
from lingua.distributed import DistributedArgs, parallel_dims, parallelize_model
from lingua.optim import build_optimizer
from tests.device_checks import LiveStorages

# A Memory+ layer in block 1: its lookup and the shared value table are recomputed too.
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=64",
        "model.max_seqlen=32", "dump_dir=/unused", "optim.warmup=1", "model.productkey_args.is_enabled=true",
        "model.productkey_args.layers=1", "model.productkey_args.mem_n_keys=8",
        "model.productkey_args.mem_heads=2", "model.productkey_args.mem_knn=4",
        "model.productkey_args.mem_k_dim=16"]


def _train(checkpoint_each_layer: bool) -> dict:
    """Three steps of two micro-batches through the trainer's own setup and step, counting how
    often each block's sublayers start (a recomputed block runs them again in backward; a pre-hook,
    because the recompute stops once the last tensor backward needs is made, inside the FFN)."""
    args = load_config(TrainArgs, TINY + [f"distributed.checkpoint_each_layer={str(checkpoint_each_layer).lower()}"])
    model = setup_model(args, None, parallel_dims(args.distributed, 1), torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
    calls = {}
    for i, block in enumerate(model.layers):
        for name in ("attention", "feed_forward"):
            key = f"layers.{i}.{name}"
            calls[key] = 0
            getattr(block, name).register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    g = torch.Generator().manual_seed(0)
    out = {"loss": [], "grads": []}
    for _ in range(3):
        batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
                   for _ in range(2)]
        out["loss"].append(float(train_step(model, optimizer, scheduler, batches, clip=1.0).loss))
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
    out["train_calls"] = dict(calls)
    with torch.no_grad():  # validation: nothing kept for backward, nothing recomputed
        model(torch.randint(0, 64, (2, 16), generator=g))
    out["eval_calls"] = {k: v - out["train_calls"][k] for k, v in calls.items()}
    out["names"] = list(model.state_dict())
    return out


def test_checkpoint_each_layer_recomputes_every_block_and_changes_no_result():
    plain, full = _train(False), _train(True)
    forwards = 3 * 2  # steps x micro-batches
    assert set(plain["train_calls"].values()) == {forwards}
    assert full["train_calls"] == {k: 2 * forwards for k in plain["train_calls"]}, full["train_calls"]
    assert set(full["eval_calls"].values()) == {1}
    for step, (a, b) in enumerate(zip(plain["loss"], full["loss"])):
        assert abs(a - b) < 1e-6, (step, a, b)
    for step, (ga, gb) in enumerate(zip(plain["grads"], full["grads"])):
        assert "memory_values.weight" in ga
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], atol=1e-6, rtol=1e-5, msg=f"step {step + 1}: {name}")
    # No wrapper module: parameter names, hence checkpoints, are those of the eager model.
    assert full["names"] == plain["names"]


def _retained_bytes(args: DistributedArgs) -> tuple[int, torch.nn.Module]:
    """Bytes a forward leaves alive for backward (activations kept by autograd or by a
    checkpoint's cache), counted per storage as in the selective checkpointing test."""
    model = build_model(LMTransformerArgs(dim=64, n_layers=4, n_heads=4, vocab_size=64, max_seqlen=256))
    parallelize_model(model, None, None, args, torch.device("cpu"))
    x = torch.randint(0, 64, (4, 256), generator=torch.Generator().manual_seed(0))
    with LiveStorages() as live:
        loss = model(x, target=x)
    retained = live.bytes()  # while `loss` holds the graph
    del loss
    return retained, model


def test_checkpoint_each_layer_keeps_less_than_selective_checkpointing(caplog):
    none, _ = _retained_bytes(DistributedArgs())
    sac, _ = _retained_bytes(DistributedArgs(selective_activation_checkpointing=True))
    full, _ = _retained_bytes(DistributedArgs(checkpoint_each_layer=True))
    assert full < 0.5 * sac and sac < 0.5 * none, (full, sac, none)
    # Both set: full checkpointing wins (it recomputes all that SAC would; nested inside it, SAC
    # would only add a second recompute) and says so.
    with caplog.at_level(logging.WARNING, logger="lingua.distributed"):
        both, model = _retained_bytes(DistributedArgs(checkpoint_each_layer=True,
                                                      selective_activation_checkpointing=True))
    assert both == full and not any(block.activation_checkpointing for block in model.layers)
    assert "selective checkpointing is not applied" in caplog.text


@pytest.mark.distributed
def test_checkpoint_each_layer_on_two_ranks_matches_one_process(tmp_path):
    """FSDP over 2 ranks with column-parallel memory values (mp=2), every block checkpointed: the
    recompute repeats the lookup's all-gather and all-to-all in backward, in the same order on
    every rank. Losses, gradients and parameters equal one process without checkpointing."""
    from tests.test_distributed import PK_SHARED, assert_matches, run_worker

    single = run_worker(tmp_path / "one.pt", *PK_SHARED)
    two = run_worker(tmp_path / "two.pt", *PK_SHARED, "distributed.dp_shard=2", "distributed.memory_parallel_size=2",
                     "distributed.checkpoint_each_layer=true", nproc=2)
    assert_matches(single, two)
