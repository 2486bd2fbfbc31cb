"""Real torch.distributed on CPU: 2 gloo processes under torchrun against one process.

FSDP2, TP and replication must give the single-process losses and gradients within 1e-5
(a sum-instead-of-average reduction would be off by 2x); checkpoints move between 2 and 1
ranks; selective activation checkpointing saves memory and changes no result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.main.transformer import LMTransformerArgs, build_model
from lingua.data import DataArgs, PackedBatches
from tests.conftest import failure_report, ROOT, read_losses, tiny_overrides
from tests.device_checks import LiveStorages

pytestmark = pytest.mark.distributed
WORKER = str(ROOT / "tests" / "dist_worker.py")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run_worker(out: Path, *overrides: str, nproc: int = 1, timeout: int = 300) -> dict:
    if nproc == 1:
        cmd = [sys.executable, WORKER, str(out), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               WORKER, str(out), *overrides]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, failure_report(proc)
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run_worker(tmp_path_factory.mktemp("single") / "out.pt")


def assert_matches(ref: dict, got: dict, tol: float = 1e-5, compare_param=lambda name: True,
                   param_tol: float = 1e-4) -> None:
    for step, (a, b) in enumerate(zip(ref["loss"], got["loss"])):
        assert abs(a - b) < tol, f"step {step + 1}: loss {b} vs single-process {a}"
    for step, (a, b) in enumerate(zip(ref["grad_norm"], got["grad_norm"])):
        assert abs(a - b) < tol * max(1.0, a), f"step {step + 1}: grad norm {b} vs single-process {a}"
    for step, (ga, gb) in enumerate(zip(ref["grads"], got["grads"])):
        assert ga.keys() == gb.keys()
        for name in ga:
            diff = (ga[name] - gb[name]).abs().max().item()
            assert diff < tol, f"step {step + 1}: grad of {name} differs by {diff}"
    # Adam divides by sqrt(v): rounding-level gradient differences on near-zero entries move
    # parameters by up to ~lr * 1e-3 after a few steps, hence the looser bound here.
    for name in filter(compare_param, ref["params"]):
        assert (ref["params"][name] - got["params"][name]).abs().max().item() < param_tol, name


@pytest.mark.parametrize(
    "overrides",
    [
        ["distributed.dp_shard=2"],
        ["distributed.dp_shard=2", "distributed.fsdp_type=full_shard"],
        ["distributed.dp_replicate=2"],
        ["distributed.tp_size=2"],
        ["distributed.dp_shard=2", "distributed.selective_activation_checkpointing=true"],
    ],
    ids=["fsdp", "fsdp_full_shard", "replicate", "tp", "fsdp_sac"],
)
def test_two_ranks_match_one_process(single, tmp_path, overrides):
    got = run_worker(tmp_path / "out.pt", *overrides, nproc=2)
    assert_matches(single, got)
    assert got["dp_size"] == (1 if "distributed.tp_size=2" in overrides else 2)


# A Memory+ layer with a shared value table in block 1: the table lives at the model root
# (sharded by the root FSDP unit, replicated under TP) and the memory's own weights in the block.
PK = ["model.productkey_args.is_enabled=true", "model.productkey_args.layers=1",
      "model.productkey_args.mem_n_keys=8", "model.productkey_args.mem_heads=2",
      "model.productkey_args.mem_knn=4", "model.productkey_args.mem_k_dim=16"]


@pytest.fixture(scope="module")
def single_pk(tmp_path_factory) -> dict:
    return run_worker(tmp_path_factory.mktemp("single_pk") / "out.pt", *PK)


@pytest.mark.parametrize("layout", ["distributed.dp_shard=2", "distributed.tp_size=2"], ids=["fsdp", "tp"])
def test_product_key_model_on_two_ranks_matches_one_process(single_pk, tmp_path, layout):
    got = run_worker(tmp_path / "out.pt", *PK, layout, nproc=2)
    assert "memory_values.weight" in got["grads"][0]
    assert_matches(single_pk, got)
    # Usage statistics count every rank's lookups: the same as one process over the whole batch.
    assert set(got["memory_stats"]) == {"layers.1"}
    assert got["memory_stats"]["layers.1"] == pytest.approx(single_pk["memory_stats"]["layers.1"], rel=1e-9)


# Memory over segments of 8; token 1 is BOS, so the random batches hold documents that start
# mid-segment (state reset per row and per document). LM2 slots in both blocks, the LongMem
# bank in block 1, or both (the hybrid).
SEGMENTS = ["model.bos_id=1", "model.segment_length=8", "model.bptt_depth=2"]
SLOTS = ["model.use_internal_memory=true", "model.memory_slots=4", "model.num_mem_heads=2"]
BANK = ["model.use_external_memory=true", "model.external_memory_size=16", "model.chunk_size=4",
        "model.retrieval_k=8", "model.retrieval_layer_index=1"]
MEMORIES = {"slots": SEGMENTS + SLOTS, "bank": SEGMENTS + BANK, "hybrid": SEGMENTS + SLOTS + BANK}


@pytest.fixture(scope="module")
def single_memory(tmp_path_factory) -> dict:
    return {kind: run_worker(tmp_path_factory.mktemp(f"single_{kind}") / "out.pt", *overrides)
            for kind, overrides in MEMORIES.items()}


@pytest.mark.parametrize("kind, layout", [
    ("slots", ["distributed.dp_shard=2"]),
    ("bank", ["distributed.dp_shard=2"]),
    ("hybrid", ["distributed.dp_shard=2", "distributed.selective_activation_checkpointing=true"]),
    ("hybrid", ["distributed.dp_shard=2", "distributed.checkpoint_each_layer=true"]),
], ids=["slots_fsdp", "bank_fsdp", "hybrid_fsdp_sac", "hybrid_fsdp_full_ac"])
def test_memory_models_on_two_ranks_match_one_process(single_memory, tmp_path, kind, layout):
    got = run_worker(tmp_path / "out.pt", *MEMORIES[kind], *layout, nproc=2)
    memory = [name for name in got["grads"][0] if ".memory_slots." in name or ".memory_bank." in name]
    assert memory and all(got["grads"][0][name].abs().sum() > 0 for name in memory), memory
    assert_matches(single_memory[kind], got)


def test_hybrid_on_four_ranks_with_uneven_pairs_matches_one_process(tmp_path):
    """One row per rank, from one pair longer than the window to many short ones: ranks whose
    segments hold different numbers of documents use different memory parameters in a segment
    (the initial slots, the bank's gate). FSDP2 reduce-scatters only the parameters that got a
    gradient unless told otherwise, so the ranks' collectives went out of step and the run hung
    in backward (a 4-process hybrid on input/output pairs, step 3)."""
    overrides = [*MEMORIES["hybrid"], "batches=pairs"]
    ref = run_worker(tmp_path / "one.pt", *overrides)
    got = run_worker(tmp_path / "four.pt", *overrides, "distributed.dp_shard=4", nproc=4, timeout=150)
    assert got["dp_size"] == 4
    assert_matches(ref, got)


@pytest.mark.parametrize("layout", ["distributed.dp_shard=2", "distributed.tp_size=2"], ids=["fsdp", "tp"])
def test_a_frozen_base_on_two_ranks_stays_bit_identical_and_matches_one_process(tmp_path, layout):
    """optim.base_model_lr=0 with a memory layer, sharded: only memory parameters get gradients
    (the same as one process), base parameters end bit-identical to their initial values."""
    from apps.main.train import TrainArgs
    from apps.main.transformer import build_model
    from lingua.args import load_config
    from lingua.optim import param_components
    from tests.dist_worker import TINY

    frozen = [*PK, "optim.base_model_lr=0"]
    one = run_worker(tmp_path / "one.pt", *frozen)
    two = run_worker(tmp_path / "two.pt", *frozen, layout, nproc=2)
    assert_matches(one, two)
    model = build_model(load_config(TrainArgs, TINY + frozen).model)
    components = param_components(model)
    memory = {n for n, c in components.items() if c == "memory"}
    assert memory and all(set(grads) == memory for grads in two["grads"])
    for name, p in model.named_parameters():
        if name in memory:
            assert not torch.equal(two["params"][name], p.detach()), f"memory parameter {name} did not train"
        else:
            assert torch.equal(two["params"][name], p.detach()), f"frozen {name} changed"


# Two memory layers reading one shared table, as plain / column-parallel values.
PK_SHARED = [o.replace("layers=1", "layers=0,1") for o in PK]


@pytest.fixture(scope="module")
def single_pk_shared(tmp_path_factory) -> dict:
    return run_worker(tmp_path_factory.mktemp("single_pk_shared") / "out.pt", *PK_SHARED)


def test_memory_parallel_values_on_two_ranks_match_one_process(single_pk_shared, tmp_path):
    """memory_parallel_size=2: each rank holds half the table's columns, gathers both ranks'
    lookups and returns rows by all-to-all; losses, gradients and parameters equal mp=1."""
    got = run_worker(tmp_path / "out.pt", *PK_SHARED, "distributed.dp_shard=2", "distributed.memory_parallel_size=2",
                     nproc=2)
    assert_matches(single_pk_shared, got)
    for layer in ("layers.0", "layers.1"):
        assert got["memory_stats"][layer] == pytest.approx(single_pk_shared["memory_stats"][layer], rel=1e-9)


def test_memory_parallel_with_fsdp_and_tp_on_four_ranks_match_one_process(single_pk_shared, tmp_path):
    """mp=2 inside dp_shard=2 with tp=2: the table is a DTensor split by columns over mp while
    the blocks use TP and FSDP (whose _StridedShard placements the grad-norm clip must count)."""
    got = run_worker(tmp_path / "out.pt", *PK_SHARED, "distributed.dp_shard=2", "distributed.tp_size=2",
                     "distributed.memory_parallel_size=2", nproc=4)
    assert_matches(single_pk_shared, got)


COLWISE_SCRIPT = """
import sys, torch, torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from lingua.product_key.colwise_embeddingbag import colwise_weighted_bag, shard_values_by_columns
from lingua.product_key.memory import ValueTable, weighted_bag
from lingua.distributed import shutdown_distributed
from tests.device_checks import InFlightCollectives
dist.init_process_group("gloo")
rank, mp = dist.get_rank(), dist.get_world_size()
gen = torch.Generator().manual_seed(0)
full = torch.randn(50, 12, generator=gen)
sizes = [5, 2]  # different token counts per rank, as in validation
rows = [torch.randint(0, 50, (n, 6), generator=gen) for n in sizes]
weights = [torch.rand(n, 6, generator=gen) for n in sizes]
grads = [torch.randn(n, 12, generator=gen) for n in sizes]
table = ValueTable(50, 12)
shard_values_by_columns(table, init_device_mesh("cpu", (mp,), mesh_dim_names=("mp",)))
table.weight.to_local().data.copy_(full.chunk(mp, dim=1)[rank])
w = weights[rank].clone().requires_grad_()
with InFlightCollectives() as flight:
    out = colwise_weighted_bag(table.weight, rows[rank], w, weighted_bag)
    out.backward(grads[rank])
# Two funcol collectives in flight at once on gloo corrupt the heap now and then (CI saw it).
assert flight.issued >= 4 and flight.peak == 1, (flight.issued, flight.peak)
# Reference: the whole table on one rank, all tokens; the table gradient averaged over ranks.
ref_table = full.clone().requires_grad_()
ref_w = [x.clone().requires_grad_() for x in weights]
sum(((weighted_bag(ref_table, r, x) * g).sum() for r, x, g in zip(rows, ref_w, grads))).backward()
torch.testing.assert_close(out, weighted_bag(full, rows[rank], weights[rank]), atol=1e-6, rtol=0)
torch.testing.assert_close(w.grad, ref_w[rank].grad, atol=1e-6, rtol=0)
torch.testing.assert_close(table.weight.grad.to_local(), (ref_table.grad / mp).chunk(mp, dim=1)[rank], atol=1e-6, rtol=0)
# Training batches: the same N on every rank, so no size exchange and nothing read back to the host.
from lingua.profiling import HostSyncs
w = weights[0].clone().requires_grad_()
with HostSyncs() as syncs:
    out = colwise_weighted_bag(table.weight, rows[0], w, weighted_bag, same_n_on_every_rank=True)
    out.backward(grads[0])
assert syncs.calls == [], syncs.calls
torch.testing.assert_close(out, weighted_bag(full, rows[0], weights[0]), atol=1e-6, rtol=0)
with HostSyncs() as syncs:  # the check can fail: validation's exchange reads the sizes
    colwise_weighted_bag(table.weight, rows[rank], weights[rank], weighted_bag)
assert [op for op, _ in syncs.calls] == ["aten._local_scalar_dense.default"], syncs.calls
del table, out, w
shutdown_distributed()
"""


def test_colwise_bag_with_different_token_counts_per_rank(tmp_path):
    script = tmp_path / "colwise.py"
    script.write_text(COLWISE_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure_report(proc)  # each rank asserts its own outputs and gradients


SHUTDOWN_SCRIPT = """
import os, sys
from lingua.distributed import shutdown_distributed
from tests.dist_worker import run
threads = lambda: set(os.listdir("/proc/self/task"))
before = threads()
run(sys.argv[1], sys.argv[2:])
shutdown_distributed()
left = threads() - before
print(f"rank {os.environ['RANK']}: {len(left)} threads outlive shutdown_distributed", flush=True)
sys.exit(1 if left else 0)
"""


def test_shutdown_joins_every_gloo_worker_thread(tmp_path):
    """A gloo worker alive when the interpreter finalizes can abort a finished rank (it frees
    its last work, which may hold a Python object, and cannot take the GIL): CI failed on this
    about 1 run in 80. After FSDP training with DTensor parameters (whose caches keep meshes and
    their groups alive), shutdown_distributed must leave no thread behind."""
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path / "out.pt"), "distributed.dp_shard=2", "model.mhc.enabled=true"]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_report(proc)
    assert proc.stdout.count(": 0 threads outlive shutdown_distributed") == 2, proc.stdout


def test_memory_parallel_refuses_bad_layouts():
    from lingua.product_key.colwise_embeddingbag import check_memory_parallel

    with pytest.raises(ValueError, match="value width 100 .* not divisible by distributed.memory_parallel_size=8"):
        check_memory_parallel(100, 8)
    with pytest.raises(ValueError, match="peer_variant"):
        check_memory_parallel(64, 2, peer_variant=True)
    check_memory_parallel(96, 3)  # any divisor works, not only powers of two


def test_two_rank_checkpoint_resumes_on_one_and_two_ranks(corpus, tmp_path):
    """Train with FSDP on 2 ranks through the real loop, then load the DCP checkpoint on 1 and
    on 2 ranks: the next step's loss and gradients agree."""
    dump = tmp_path / "run"
    argv = tiny_overrides(corpus, dump, steps=4, **{"distributed.dp_shard": 2, "model.n_heads": 4,
                                                    "model.n_kv_heads": 2, "data.load_async": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "apps.main.train", *argv]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_report(proc)
    ckpt = dump / "checkpoints" / "0000000004"
    assert sorted(p.name for p in ckpt.glob("train_state_*.json")) == ["train_state_00000.json",
                                                                        "train_state_00001.json"]
    assert len(read_losses(dump)) == 4

    model_args = ["model.vocab_size=258", "model.n_heads=4", "model.n_kv_heads=2", f"load={ckpt}"]
    one = run_worker(tmp_path / "one.pt", *model_args)
    two = run_worker(tmp_path / "two.pt", *model_args, "distributed.dp_shard=2", nproc=2)
    # Two steps after loading: the second also depends on the loaded optimizer state.
    for step in range(2):
        assert abs(one["loss"][step] - two["loss"][step]) < 1e-6, (one["loss"], two["loss"])
        for name in one["grads"][step]:
            assert (one["grads"][step][name] - two["grads"][step][name]).abs().max().item() < 1e-5, name
    # ... and it really is the trained model, not a fresh one.
    fresh = run_worker(tmp_path / "fresh.pt", "model.vocab_size=258", "model.n_heads=4", "model.n_kv_heads=2")
    assert abs(fresh["loss"][0] - one["loss"][0]) > 1e-3


def test_resumed_two_rank_training_continues_identically(corpus, tmp_path):
    """Exact resume under FSDP without a kill: 4 steps + 4 resumed == 8 straight. The schedule
    is constant so that `steps` (4, then 8) does not change the learning rates."""
    def run(dump: Path, steps: int) -> None:
        argv = tiny_overrides(corpus, dump, steps=steps, **{"distributed.dp_shard": 2, "checkpoint.dump.every": 4,
                                                            "optim.scheduler": "constant"})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "apps.main.train", *argv]
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, failure_report(proc)

    run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)
    run(tmp_path / "resumed", 8)
    assert read_losses(tmp_path / "straight") == read_losses(tmp_path / "resumed")


def test_resume_on_more_ranks_keeps_step_schedule_and_counters_on_every_rank(corpus, tmp_path):
    """1 process for 4 steps, resumed on 2 FSDP ranks through the loop's own resume path. Rank
    1 has no train state of its own: it takes rank 0's step, schedule and token counters (a
    fresh schedule would warm up again on its half of every tensor); only the data restarts."""
    dump = tmp_path / "run"
    common = {"checkpoint.dump.every": 4, "data.load_async": "false", "optim.warmup": 10}
    first = subprocess.run([sys.executable, "-m", "apps.main.train", *tiny_overrides(corpus, dump, steps=4, **common)],
                           env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, failure_report(first)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "apps.main.train", *tiny_overrides(corpus, dump, steps=6, **common, **{"distributed.dp_shard": 2})]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_report(proc)
    assert "restarts from the beginning of its shard" in proc.stdout + proc.stderr
    from lingua.checkpoint import train_state_file

    states = [json.loads(train_state_file(dump / "checkpoints/0000000006", r).read_text()) for r in (0, 1)]
    per_step = 4 * 32  # batch x seq_len per data-parallel rank
    for rank, state in enumerate(states):
        assert state["step"] == 6 and state["dp_size"] == 2, (rank, state["step"])
        assert state["scheduler"]["last_epoch"] == 6, (rank, state["scheduler"])
        lr = state["scheduler"]["base_lrs"][0]
        assert state["scheduler"]["_last_lr"] == pytest.approx([lr * 7 / 10]), (rank, state["scheduler"])
        assert state["tokens_seen"] == 4 * per_step + 2 * 2 * per_step, (rank, state["tokens_seen"])
    assert states[0]["tokens_trained"] == states[1]["tokens_trained"]


@pytest.mark.parametrize("layout", ["distributed.dp_shard=2", "distributed.tp_size=2"], ids=["fsdp", "tp"])
def test_tied_weights_on_two_ranks_match_one_process(tmp_path, layout):
    single = run_worker(tmp_path / "one.pt", "model.weight_tying=true")
    two = run_worker(tmp_path / "two.pt", "model.weight_tying=true", layout, nproc=2)
    assert not any(name.startswith("output.") for name in two["params"]), "output is not the embedding"
    # The shared matrix sums two uses' gradients, in another order per layout: Adam moves
    # parameters a little further apart than the untied model's (see assert_matches). How far
    # depends on the CPU's kernels: 3.2e-4 under TP on an Intel Xeon (below 3e-4 on AMD EPYC),
    # against the 5 steps x lr 1e-2 a wrong gradient would move them.
    assert_matches(single, two, param_tol=5e-4)


def test_selective_activation_checkpointing_saves_memory_not_results():
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 64))
    args = LMTransformerArgs(dim=64, n_layers=3, n_heads=4, vocab_size=64, max_seqlen=64)
    plain, sac = build_model(args), build_model(args)
    for block in sac.layers:
        block.activation_checkpointing = True
    for m in (plain, sac):
        m(x, target=x).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), sac.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=n)

    # Memory: bytes of the tensors a forward leaves alive for the backward (activations kept by
    # autograd or by SAC's cache), counted exactly per storage. Peak RSS was tried first and is
    # too noisy here: allocator reuse moved it by +-100 MiB between identical runs.
    retained = {}
    for flag in (False, True):
        m = build_model(LMTransformerArgs(dim=128, n_layers=8, n_heads=4, vocab_size=64, max_seqlen=512))
        for block in m.layers:
            block.activation_checkpointing = flag
        x = torch.randint(0, 64, (8, 512), generator=torch.Generator().manual_seed(0))
        with LiveStorages() as live:
            loss = m(x, target=x)
        retained[flag] = live.bytes()
        del loss
    assert retained[True] < 0.5 * retained[False], f"SAC keeps {retained[True]} bytes vs {retained[False]} without"


def _docs_of_one_epoch(loader: PackedBatches) -> list[str]:
    """Decode one rank's packed windows back into documents, up to the first repeat (the test's
    documents are unique, so the first repeat starts the second epoch)."""
    stream = loader.streams["src"]
    docs: list[str] = []
    current: list[int] = []
    while True:
        for t in stream.window(64)[0][:-1].tolist():
            if t == 256:
                current = []
            elif t == 257:
                text = bytes(current).decode("utf-8")
                if text in docs:
                    return docs
                docs.append(text)
            else:
                current.append(t)


@pytest.mark.parametrize("n_chunks", [1, 2, 3])
def test_two_rank_loaders_cover_every_document_once(tmp_path, n_chunks):
    root = tmp_path / "data"
    (root / "src").mkdir(parents=True)
    texts = [f"document number {i} " + "x" * (i % 7) for i in range(41)]
    for c in range(n_chunks):
        with open(root / "src" / f"src.chunk.{c:02d}.jsonl", "w") as f:
            for t in texts[c::n_chunks]:
                f.write(json.dumps({"text": t}) + "\n")
    args = DataArgs(root_dir=str(root), sources={"src": 1.0}, batch_size=2, seq_len=64, load_async=False)
    seen = []
    for rank in (0, 1):
        seen += _docs_of_one_epoch(PackedBatches(args, rank=rank, world_size=2))
    assert sorted(seen) == sorted(texts)


MP_LAYOUT = " ".join(["distributed.dp_shard=2", "distributed.memory_parallel_size=2", *PK])


def uneven_validation_corpus(corpus: Path, root: Path) -> Path:
    """The corpus's training chunks, and 6 validation documents alternately long and short (the
    validation reader deals document i to rank i % 2)."""
    (root / "src").mkdir(parents=True)
    for chunk in (corpus / "src").glob("*.chunk.*.jsonl"):
        (root / "src" / chunk.name).write_text(chunk.read_text())
    docs = [json.loads(line)["text"] for line in open(corpus / "src" / "src.val.jsonl")]
    with open(root / "src" / "src.val.jsonl", "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc[: 1500 if i % 2 == 0 else 100 + 40 * i]}) + "\n")
    return root


# A slots model scores each document whole, segment by segment: ranks whose documents differ
# in length run different numbers of segments, each a round of FSDP collectives (full_shard).
SEGMENT_LAYOUT = ("distributed.dp_shard=2 distributed.fsdp_type=full_shard model.segment_length=16 "
                  "model.use_internal_memory=true model.memory_slots=4 model.num_mem_heads=2")


@pytest.mark.parametrize("layout", ["distributed.dp_shard=2", "distributed.tp_size=2", MP_LAYOUT, SEGMENT_LAYOUT],
                         ids=["fsdp", "tp", "memory_parallel", "segments_full_shard"])
def test_in_loop_validation_under_two_ranks_matches_one_process(corpus, tmp_path, layout):
    """Ranks score different documents (different numbers of forwards: FSDP must not hang) and
    TP peers score the same ones (not counted twice): the result equals one process. With
    memory parallelism the ranks' batches differ in size inside the column-parallel lookup, and
    the mp=2 checkpoint loads into one process with whole value tables. A segment model's
    passes must also agree in width (segments), else the ranks' collectives go out of step:
    its validation documents are long on rank 0 and short on rank 1."""
    if layout == SEGMENT_LAYOUT:
        corpus = uneven_validation_corpus(corpus, tmp_path / "uneven")
    def run(dump: Path, extra: list[str], nproc: int) -> dict:
        argv = tiny_overrides(corpus, dump, steps=2, **{"checkpoint.eval.every": 2, "eval.validation.max_steps": 1000,
                                                        "data.load_async": "false", "model.n_heads": 2})
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "apps.main.train", *argv, *extra]
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, failure_report(proc)
        return [json.loads(l) for l in open(dump / "metrics.validation.jsonl")][-1]

    two = run(tmp_path / "two", layout.split(), 2)
    # Same trained weights on one process: load the 2-rank checkpoint and validate.
    from apps.main.eval import main as eval_main

    one = eval_main([f"ckpt_dir={tmp_path / 'two'}", f"dump_dir={tmp_path / 'one'}", "validation.max_steps=1000"])
    assert two["val/src/docs"] == one["src"]["docs"] == 6
    assert two["val/src/tokens"] == one["src"]["tokens"]
    assert abs(two["val/src/loss"] - one["src"]["loss"]) < 1e-5


def test_world_info_from_torchrun_slurm_or_single():
    from lingua.distributed import world_info

    tr = world_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.local_world_size, tr.launcher) == (3, 8, 1, 4, "torchrun")
    # torchrun inside an srun allocation: torchrun's variables win over SLURM's.
    both = world_info({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (both.rank, both.launcher) == (1, "torchrun")
    # An srun task of `srun -n 8` in a job of 16 tasks: the step's variables, as srun sets them.
    sl = world_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                     "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.local_world_size, sl.launcher) == (5, 8, 1, 4, "slurm")
    assert world_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"
    assert world_info({}).world_size == 1


def test_sbatch_script_or_salloc_shell_is_one_process():
    """The variables of an `sbatch -n 2` batch script (as the local SLURM sets them) and of an
    salloc shell: no srun step, so a plain python there is one process, not rank 0 of 2."""
    from lingua.distributed import world_info

    batch = {"SLURM_JOB_ID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "vm"}
    salloc = {"SLURM_JOB_ID": "2", "SLURM_NTASKS": "4", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "vm"}
    for env in (batch, salloc):
        info = world_info(env)
        assert (info.launcher, info.world_size, info.rank) == ("single", 1, 0), env


def test_memory_parallel_size_must_divide_dp_shard():
    from lingua.distributed import DistributedArgs, parallel_dims

    assert parallel_dims(DistributedArgs(dp_shard=4, memory_parallel_size=2), 4).mp == 2
    with pytest.raises(ValueError, match="memory_parallel_size=2 must divide distributed.dp_shard=1"):
        parallel_dims(DistributedArgs(tp_size=2, memory_parallel_size=2), 2)
    with pytest.raises(ValueError, match="memory_parallel_size=3 must divide distributed.dp_shard=4"):
        parallel_dims(DistributedArgs(dp_shard=4, memory_parallel_size=3), 4)


def test_parallel_dims_checks_the_layout():
    from lingua.distributed import DistributedArgs, parallel_dims

    assert parallel_dims(DistributedArgs(dp_shard=-1, tp_size=2), 8).dp_shard == 4
    with pytest.raises(ValueError, match="dp_shard=1 x tp_size=1 = 1 must equal the number of processes \\(2\\)"):
        parallel_dims(DistributedArgs(), 2)
    with pytest.raises(ValueError, match="not divisible"):
        parallel_dims(DistributedArgs(dp_shard=-1, tp_size=3), 8)


def test_clean_env_drops_launcher_variables(monkeypatch):
    from lingua.distributed import clean_env

    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "n1")
    monkeypatch.setenv("KEEP_ME", "yes")
    env = clean_env()
    assert "SLURM_JOB_ID" not in env and "RANK" not in env and "MASTER_ADDR" not in env
    assert env["KEEP_ME"] == "yes"


def test_two_processes_without_a_layout_fail_clearly(corpus, tmp_path):
    """Two processes but dp_shard=1: a clear error naming the keys, before any work."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "apps.main.train", *tiny_overrides(corpus, tmp_path / "d")]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "distributed.dp_replicate=1 x dp_shard=1 x tp_size=1" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_every_collective_runs_on_a_device_the_backend_serves(corpus, tmp_path):
    """NCCL serves only CUDA tensors: a flag, count or metric made without a device and reduced
    crashes every GPU run at its first step. Two ranks train through the real loop (FSDP,
    mHC, a column-parallel memory layer and its usage stats, preemption checks, in-loop
    validation) under tests/device_checks.py: no collective may receive a tensor made without a
    device, and on gloo no two functional collectives may be in flight at once (that corrupts
    the heap now and then: CI saw it)."""
    argv = tiny_overrides(corpus, tmp_path / "run", steps=2, **{
        "checkpoint.eval.every": 2, "data.load_async": "false", "distributed.dp_shard": 2,
        "distributed.memory_parallel_size": 2, "model.mhc.enabled": "true"}) + PK
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "checked_train.py"), str(tmp_path / "calls"), *argv]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure_report(proc)
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls.rank{rank}.json").read_text())
        ops = {c["op"] for c in calls}
        assert {"c10d.allreduce_.default", "c10d._allgather_base_.default"} <= ops, ops  # the checks saw them
        bad = [c for c in calls if c["deviceless"]]
        assert not bad, f"rank {rank}: collectives on tensors made without a device: {bad}"
        assert any(c["op"].startswith("_c10d_functional.") for c in calls)  # the column-parallel bag ran
        assert json.loads((tmp_path / f"calls.rank{rank}.summary.json").read_text())["peak_in_flight"] == 1


AGREE_SCRIPT = """
import os, signal, torch.distributed as dist
from lingua.distributed import PreemptionSignal, shutdown_distributed
from lingua.profiling import HostSyncs
dist.init_process_group("gloo")
rank = dist.get_rank()
preemption = PreemptionSignal()
seen = []
with HostSyncs() as syncs:
    for step in range(1, 7):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is signalled, during step 3
        seen.append(preemption.agreed())
preemption.close()
print(f"rank {rank}: {seen} syncs {syncs.calls}", flush=True)
shutdown_distributed()  # destroy_process_group alone may SIGABRT at exit (see its docstring)
"""


def test_preemption_agreement_reads_nothing_back_per_step(tmp_path):
    """agreed() read its all-reduced flag at once, a host sync every step. Now each call
    returns the reduction the previous one started: one step later, the same step on every rank."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure_report(proc)
    for rank in (0, 1):
        assert f"rank {rank}: [False, False, False, True, True, True] syncs []" in proc.stdout, proc.stdout


def test_compiled_memory_parallel_training_has_no_graph_breaks(corpus, tmp_path):
    """distributed.compile with memory parallelism: the column-parallel bag skipped dynamo (a
    size read in a generator) and the table's own FSDP unit, called inside the compiled block,
    broke its graph. Two ranks train compiled: no graph break, no collective work left
    unwaited, and the losses of the eager run."""
    losses = {}
    for compiled in ("false", "true"):
        argv = tiny_overrides(corpus, tmp_path / compiled, steps=3, **{
            "data.load_async": "false", "distributed.compile": compiled}) + MP_LAYOUT.split()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "checked_train.py"), "--no-modes", str(tmp_path / f"calls_{compiled}"), *argv]
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, failure_report(proc)
        losses[compiled] = read_losses(tmp_path / compiled)
        for rank in (0, 1):
            summary = json.loads((tmp_path / f"calls_{compiled}.rank{rank}.summary.json").read_text())
            assert summary["graph_breaks"] == {} and summary["unwaited_works"] == 0, summary
            assert (summary["compiled_graphs"] > 0) == (compiled == "true"), summary
    assert losses["true"].keys() == {1, 2, 3}
    for step, loss in losses["false"].items():
        assert abs(losses["true"][step] - loss) < 1e-4, (step, losses)


INIT_SCRIPT = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from lingua.transformer import ParamInit
from lingua.distributed import shutdown_distributed

class LargestTensor(TorchDispatchMode):
    largest = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
rows, cols = 4096, 64  # 16 blocks of 16384 values
for dim in (0, 1):
    param = nn.Parameter(distribute_tensor(torch.empty(rows, cols), mesh, [Shard(dim)], src_data_rank=None))
    with LargestTensor() as seen:
        ParamInit(7, block_elements=16384).trunc_normal_(param, 0.02)
    whole = torch.empty(rows, cols)  # one process, whole tensor: the same values
    ParamInit(7, block_elements=16384).trunc_normal_(whole, 0.02)
    assert torch.equal(param.to_local(), whole.chunk(2, dim=dim)[rank]), dim
    # Never the whole tensor: this rank's part, or one block, at a time.
    assert seen.largest <= max(rows * cols // 2, 16384), (dim, seen.largest)
    assert 0.019 < float(whole.std()) < 0.021 and float(whole.abs().max()) <= 0.06
print("ok", rank, flush=True)
shutdown_distributed()  # destroy_process_group alone may SIGABRT at exit
"""


def test_sharded_init_draws_only_this_ranks_part(tmp_path):
    """ParamInit drew every full tensor on every rank and distribute_tensor moved it to the
    device before slicing (8 GiB per rank for a 1024^2 x 2048 table). Now a rank draws the
    blocks of rows holding its part (row or column shards), with the values of one process."""
    script = tmp_path / "init.py"
    script.write_text(INIT_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure_report(proc)
    assert proc.stdout.count("ok ") == 2


def test_collective_device_follows_the_backend(tmp_path):
    """gloo restricted to CUDA (as NCCL is) gets CUDA tensors, full gloo CPU ones. On a
    machine without CUDA only the device index lookup is stubbed (torch.cuda.current_device)."""
    script = (
        "import sys, torch, torch.distributed as dist\n"
        "from lingua.distributed import collective_device\n"
        "torch.cuda.current_device = lambda: 0\n"
        "assert collective_device() == torch.device('cpu')  # no process group\n"
        "dist.init_process_group(sys.argv[1], rank=0, world_size=1, init_method='file://' + sys.argv[2])\n"
        "print(collective_device())\n"
    )
    seen = {}
    for i, backend in enumerate(("gloo", "cuda:gloo")):
        proc = subprocess.run([sys.executable, "-c", script, backend, str(tmp_path / f"init{i}")], env=_env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, failure_report(proc)
        seen[backend] = proc.stdout.split()[-1]
    assert seen == {"gloo": "cpu", "cuda:gloo": "cuda:0"}


def test_cpu_threads_divide_shared_cores_but_not_bound_ones():
    from lingua.distributed import WorldInfo, cpu_threads

    slurm = WorldInfo(rank=1, local_rank=1, world_size=8, local_world_size=8, launcher="slurm")
    torchrun = WorldInfo(rank=1, local_rank=1, world_size=8, local_world_size=8, launcher="torchrun")
    # srun bound each of 8 tasks to 16 cores of a 128-core node: its 16 are its own (was 2).
    assert cpu_threads(slurm, 16, {"SLURM_CPUS_PER_TASK": "16"}) == 16
    # No binding (task/none): every task sees all 128 cores, shared by 8.
    assert cpu_threads(slurm, 128, {"SLURM_CPUS_PER_TASK": "16"}) == 16
    assert cpu_threads(torchrun, 128, {}) == 16
    assert cpu_threads(torchrun, 4, {}) == 1


def test_device_index_wraps_around_the_visible_gpus(monkeypatch):
    """SLURM's --gpus-per-task shows each task one GPU, cuda:0, whatever its local rank."""
    from lingua.distributed import default_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert default_device(local_rank=3) == torch.device("cuda", 0) and chosen == [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert default_device(local_rank=3) == torch.device("cuda", 3) and chosen == [0, 3]


def test_grad_accumulation_under_fsdp_reduce_scatters_once_per_step(corpus, tmp_path):
    """With 3 micro-batches FSDP reduce-scattered after each backward; only the last one needs
    to. Counted per rank with tests/device_checks.py, against the same run without accumulation."""
    counts = {}
    for acc in (1, 3):
        argv = tiny_overrides(corpus, tmp_path / f"acc{acc}", steps=2, grad_acc_steps=acc, **{
            "data.load_async": "false", "distributed.dp_shard": 2, "eval": "null"})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "checked_train.py"), str(tmp_path / f"calls{acc}"), *argv]
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, failure_report(proc)
        calls = json.loads((tmp_path / f"calls{acc}.rank0.json").read_text())
        counts[acc] = sum(c["op"] == "c10d._reduce_scatter_base_.default" for c in calls)
    assert counts[1] > 0 and counts[3] == counts[1], counts


def test_memory_parallel_groups_and_nodes_of_ranks():
    from lingua.distributed import (ParallelDims, block_node_layout, check_memory_parallel_within_nodes,
                                    memory_parallel_groups, world_info)

    # build_mesh's layout: (dp_replicate, dp_shard_mem, mp, tp), tp innermost.
    assert memory_parallel_groups(ParallelDims(2, 4, 1, 2)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert memory_parallel_groups(ParallelDims(1, 2, 2, 2)) == [[0, 2], [1, 3]]
    assert block_node_layout(4, 2) == [0, 0, 1, 1]
    check_memory_parallel_within_nodes(ParallelDims(1, 4, 1, 2), [0, 0, 1, 1], allowed=False)
    # A launcher that deals ranks round-robin over nodes splits every pair.
    with pytest.raises(ValueError, match=r"group of ranks \[0, 1\] on nodes \[0, 1\]"):
        check_memory_parallel_within_nodes(ParallelDims(1, 4, 1, 2), [0, 1, 0, 1], allowed=False)
    check_memory_parallel_within_nodes(ParallelDims(1, 4, 1, 2), [0, 1, 0, 1], allowed=True)
    # Each process knows its node: srun's SLURM_NODEID, torchrun's GROUP_RANK.
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1"}
    assert world_info(srun).node == 1
    assert world_info({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "GROUP_RANK": "2"}).node == 2


def test_master_address_falls_back_to_the_node_name_without_a_node_addr(tmp_path, monkeypatch):
    """`scontrol show node` of a cluster that gives no NodeAddr (or fails): the expanded name."""
    from lingua.distributed import slurm_master_addr

    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\nif [ "$2" = hostnames ]; then printf "gpu-a7\\ngpu-a8\\n"; '
                    'elif [ "$3" = gpu-a7 ]; then echo "NodeName=gpu-a7 Arch=x86_64"; fi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert slurm_master_addr("gpu-a[7-8]") == "gpu-a7"
    fake.write_text(fake.read_text().replace("Arch=x86_64", "NodeAddr=10.1.2.7 NodeHostName=gpu-a7"))
    assert slurm_master_addr("gpu-a[7-8]") == "10.1.2.7"
