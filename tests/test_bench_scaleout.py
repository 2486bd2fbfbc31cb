"""apps/bench/scaleout.py: the bytes a step exchanges (against a hand count), and the whole bench
at a tiny size on two real gloo ranks (the 2-node SLURM run of it: tests/test_multinode.py)."""

from __future__ import annotations

import json

import pytest

from apps.bench.scaleout import config_params, main, step_traffic

TINY = ["--repeats", "1", "--coll_elements", "1e5", "--model", "model.dim=64", "--model", "model.n_layers=2",
        "--model", "model.n_heads=2", "--model", "model.vocab_size=256"]


def test_step_traffic_against_a_hand_count():
    dense = {"total": 1000, "value_tables": 0, "model_dtype": "bf16", "memory_parallel_size": 1, "grad_acc_steps": 1}
    t = step_traffic(dense, gpus=8, gpus_per_node=4)
    # FSDP over 8: bf16 gathered twice (2 + 2 bytes) and fp32 grads reduced (4), 7/8 of it sent.
    assert t["fsdp"] == {"intra_node_bytes": 0.0, "inter_node_bytes": 1000 * 8 * 7 / 8}
    # HSDP 2 x 4: the same within the node's 4, then a 2-replica all-reduce of each 250-param shard.
    assert t["hsdp"] == {"intra_node_bytes": 1000 * 8 * 3 / 4, "inter_node_bytes": 250 * 4 * 2 * 1 / 2}
    assert step_traffic({**dense, "grad_acc_steps": 3}, 8, 4)["fsdp"]["inter_node_bytes"] == 1000 * (12 + 4) * 7 / 8

    # 600 of 1000 parameters in value tables split over 2 columns: each 300-param slice is
    # sharded over the 4 ranks that hold it under FSDP (gathered once: 2 + 4 bytes), and under
    # HSDP over the node's 2, then all-reduced between the 2 replicas (150 params each).
    memory = {**dense, "value_tables": 600, "memory_parallel_size": 2}
    t = step_traffic(memory, gpus=8, gpus_per_node=4)
    assert t["fsdp"]["inter_node_bytes"] == pytest.approx(400 * 8 * 7 / 8 + 300 * 6 * 3 / 4)
    assert t["hsdp"]["intra_node_bytes"] == pytest.approx(400 * 8 * 3 / 4 + 300 * 6 * 1 / 2)
    assert t["hsdp"]["inter_node_bytes"] == pytest.approx(100 * 4 * 2 * 1 / 2 + 150 * 4 * 2 * 1 / 2)


def test_config_params_count_the_shipped_1_3b_configs():
    dense = config_params("apps/main/configs/dense_1.3b.yaml", vocab_size=32000)
    memplus = config_params("apps/main/configs/memplus_1.3b.yaml", vocab_size=32000)
    assert 1.3e9 < dense["total"] < 1.4e9 and dense["value_tables"] == 0  # the config says 1.36B
    assert memplus["value_tables"] == 1024**2 * 2048 and memplus["memory_parallel_size"] == 8
    assert memplus["total"] - memplus["value_tables"] < dense["total"]  # three FFNs became memory layers


@pytest.mark.distributed
def test_bench_measures_two_ranks_and_estimates_64_gpus(capsys):
    result = main([*TINY, "--configs", "apps/main/configs/dense_1.3b.yaml"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    measured = result["measured"]
    assert measured["world_size"] == 2 and measured["launcher"] == "torchrun" and measured["nodes"] == [0]
    assert set(measured["collectives"]["bus_GBps"]) == {"all_reduce", "reduce_scatter", "all_gather", "local_copy"}
    assert all(v > 0 for v in measured["collectives"]["over_local_copy"].values())
    save = measured["save"]
    # The checkpoint holds fp32 weights and two fp32 moments: at least 12 bytes a parameter.
    assert save["bytes_per_param"] >= 12 and save["seconds"] > 0 and save["over_plain_torch_save"] > 0
    dense = result["estimate"]["configs"]["dense_1.3b"]
    assert dense["save_seconds"]["estimate"] == max(dense["save_seconds"]["each_rank_at_measured_rate"],
                                                    dense["save_seconds"]["shared_filesystem_bound"])
    # HSDP keeps most bytes inside the nodes: it sends less between them than FSDP over all 64.
    fsdp, hsdp = dense["exchange_per_step"]["fsdp"], dense["exchange_per_step"]["hsdp"]
    assert hsdp["inter_node_GB"] < fsdp["inter_node_GB"] / 4
    assert hsdp["seconds_at_stated_links"] < fsdp["seconds_at_stated_links"]


def test_bench_refuses_a_missing_config_before_measuring(capsys):
    with pytest.raises(SystemExit):
        main(["--configs", "apps/main/configs/no_such.yaml"])
    assert "no_such.yaml" in capsys.readouterr().err
