"""apps/bench/memory_bank.py at a tiny size: FAISS and torch find the same chunks, and every
memory kind's step overhead over the no-memory segment model is reported."""

from __future__ import annotations

import json

from apps.bench.memory_bank import main

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seqlen=32", "data.seq_len=32",
        "data.batch_size=2", "model.segment_length=8", "model.memory_slots=4", "model.num_mem_heads=2",
        "model.external_memory_size=16", "model.retrieval_k=8", "model.retrieval_layer_index=1"]


def test_bench_prints_search_speeds_and_step_overheads(capsys):
    result = main(["--sizes", "4096,16384", "--search_repeats", "1", "--rounds", "2", "--warmup", "1", *TINY])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert set(result["faiss_vs_torch"]) == {"4096", "16384"}
    for figures in result["faiss_vs_torch"].values():
        assert figures["same_chunks"] and figures["faiss_us_per_query_token"] > 0 and figures["faiss_over_torch"] > 0
    assert set(result["step_overhead"]) == {"slots", "bank", "hybrid"}
    assert all(s > 0 for s in result["step_seconds"].values())
    assert result["step_seconds"]["hybrid"] > result["step_seconds"]["none"]
