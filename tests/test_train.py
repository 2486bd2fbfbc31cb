"""The training loop end to end on a tiny model: exact resume after SIGKILL, crash-safe
saves, grad accumulation, non-finite loss, finished runs, in-process validation."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apps.main.train import NonFiniteLoss, TrainArgs, train
from lingua.args import load_config
from lingua.checkpoint import CheckpointManager, list_checkpoints
from tests.conftest import failure_report, ROOT, read_losses, run_module, tiny_overrides


def test_killed_run_resumes_with_identical_losses(corpus, tmp_path):
    """SIGKILL at a random step after the first checkpoint; the resumed run must log
    bit-identical losses to an uninterrupted one (async data loader, CPU, deterministic)."""
    a, b = tmp_path / "a", tmp_path / "b"
    # 60 fast steps, killed within the first half: margin enough that the kill always lands.
    argv = lambda d: tiny_overrides(corpus, d, steps=60, **{"data.load_async": "true"})  # noqa: E731
    done = run_module("apps.main.train", argv(a))
    assert done.returncode == 0, failure_report(done)

    kill_after = random.Random().randint(5, 30)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "apps.main.train", *argv(b)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if (b / "metrics.jsonl").exists() and max(read_losses(b), default=0) >= kill_after:
                break
        except json.JSONDecodeError:  # caught the trainer mid-line
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(read_losses(b))
    assert killed_at < 60, "the run finished before it could be killed"
    assert list_checkpoints(b / "checkpoints"), "no checkpoint before the kill"

    resumed = run_module("apps.main.train", argv(b))
    assert resumed.returncode == 0, failure_report(resumed)
    la, lb = read_losses(a), read_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 61))
    assert [la[s] for s in la] == [lb[s] for s in la], f"losses differ after resume (killed at step {killed_at})"


def _args(corpus: Path, dump: Path, **extra) -> TrainArgs:
    return load_config(TrainArgs, tiny_overrides(corpus, dump, **extra))


def test_crash_during_save_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    args = _args(corpus, tmp_path / "run", steps=4, **{"data.load_async": "false"})
    train(args)
    manager = CheckpointManager(args.checkpoint, args.dump_dir)
    assert [p.name for p in manager.existing()] == ["0000000004"]

    import lingua.checkpoint as ckpt_module

    real_save = ckpt_module.dcp.save

    def crashing_save(state, **kwargs):
        real_save(state, **kwargs)  # shards written ...
        raise OSError("disk went away")  # ... but the save never completes

    monkeypatch.setattr(ckpt_module.dcp, "save", crashing_save)
    args8 = _args(corpus, tmp_path / "run", steps=8, **{"data.load_async": "false"})
    with pytest.raises(OSError, match="disk went away"):
        train(args8)
    monkeypatch.setattr(ckpt_module.dcp, "save", real_save)
    assert [p.name for p in manager.existing()] == ["0000000004"], "a half-written save became visible"
    assert not (tmp_path / "run/checkpoints/.tmp_0000000008").exists(), "the failed save was left behind"

    # A process killed mid-save cannot clean up: the next start removes what it left, resumes
    # from step 4 and finishes.
    (tmp_path / "run/checkpoints/.tmp_0000000008").mkdir()
    (tmp_path / "run/checkpoints/.tmp_0000000008/__0_0.distcp").write_bytes(b"partial")
    state = train(args8)
    assert state.step == 8
    assert not (tmp_path / "run/checkpoints/.tmp_0000000008").exists()
    assert [p.name for p in manager.existing()] == ["0000000004", "0000000008"]


def test_grad_accumulation_matches_larger_batch(corpus, tmp_path):
    """2 micro-batches of B == 1 batch of 2B (same windows: the shuffle buffer holds the same
    number of windows, so the data order is the same)."""
    common = {"data.load_async": "false", "steps": 4, "optim.clip": 0}
    acc = _args(corpus, tmp_path / "acc", grad_acc_steps=2, **{"data.batch_size": 2, "data.prefetch_size": 8}, **common)
    big = _args(corpus, tmp_path / "big", grad_acc_steps=1, **{"data.batch_size": 4, "data.prefetch_size": 4}, **common)
    train(acc)
    train(big)
    la, lb = read_losses(tmp_path / "acc"), read_losses(tmp_path / "big")
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])
    # Parameters after 4 optimizer steps agree too.
    from lingua.checkpoint import load_model_and_optim
    from apps.main.transformer import build_model

    models = []
    for d, a in (("acc", acc), ("big", big)):
        m = build_model(a.model)
        load_model_and_optim(tmp_path / d / "checkpoints/0000000004", m)
        models.append(m)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=0), n


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    args = _args(corpus, tmp_path / "nan", steps=30, **{
        "data.load_async": "false", "optim.lr": 1e30, "optim.warmup": 0, "optim.clip": 0,
        "optim.scheduler": "constant", "checkpoint.dump.every": 1,
    })
    with pytest.raises(NonFiniteLoss, match="update was not applied; stopping. Last good checkpoint") as err:
        train(args)
    losses = read_losses(tmp_path / "nan")
    saved = list_checkpoints(tmp_path / "nan/checkpoints")
    assert saved and int(saved[-1].name) < 30
    assert str(saved[-1]) in str(err.value)
    assert all(torch.isfinite(torch.tensor(losses[s])) for s in losses if s <= int(saved[-1].name))
    # The checkpoint named as last good holds finite weights (a NaN gradient at a finite loss
    # used to be applied, then saved).
    from apps.main.eval import load_model_from_checkpoint

    model, _, _ = load_model_from_checkpoint(saved[-1], torch.device("cpu"))
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    assert bad == 0, f"{bad} non-finite parameters in {saved[-1]}"


def test_nan_gradient_at_a_finite_loss_is_not_applied():
    """The step is checked before optimizer.step(): weights, optimizer state and schedule stay put."""
    from apps.main.train import setup_model, train_step
    from lingua.distributed import parallel_dims
    from lingua.optim import build_optimizer

    args = load_config(TrainArgs, ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=64",
                                   "dump_dir=/unused"])
    model = setup_model(args, None, parallel_dims(args.distributed, 1), torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    train_step(model, optimizer, scheduler, [(x, x)], clip=1.0)  # one good step: Adam has state
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exp_avg = optimizer.state[model.norm.weight]["exp_avg"].clone()
    hook = model.norm.weight.register_hook(lambda g: g * float("nan"))
    result = train_step(model, optimizer, scheduler, [(x, x)], clip=1.0)
    hook.remove()
    assert torch.isfinite(result.loss) and not torch.isfinite(result.grad_norm)
    assert not result.finite
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(optimizer.state[model.norm.weight]["exp_avg"], exp_avg)
    assert int(optimizer.state[model.norm.weight]["step"]) == 1  # the skipped step is not counted
    # The skip is decided on the device; the next good step applies as usual.
    assert bool(train_step(model, optimizer, scheduler, [(x, x)], clip=1.0).finite)
    assert not torch.equal(model.norm.weight, before["norm.weight"])


def test_a_step_reads_nothing_back_from_the_device():
    """Each read of a device value (or a data-dependent shape) makes the host wait for the GPU,
    which then idles: a step reads none, on one process and, with grad accumulation, clipping,
    mHC and a product-key memory layer, through the loop's own step function (syncs are
    counted on CPU by op). The column-parallel bag and the Triton kernels are checked in
    test_distributed and test_embedding_bag."""
    from apps.main.train import setup_model, train_step
    from lingua.distributed import parallel_dims
    from lingua.optim import build_optimizer
    from lingua.profiling import HostSyncs

    args = load_config(TrainArgs, ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                                   "model.vocab_size=64", "dump_dir=/unused", "model.mhc.enabled=true",
                                   "model.productkey_args.is_enabled=true", "model.productkey_args.layers=1",
                                   "model.productkey_args.mem_n_keys=8", "model.productkey_args.mem_heads=2",
                                   "model.productkey_args.mem_knn=4", "model.productkey_args.mem_k_dim=16"])
    model = setup_model(args, None, parallel_dims(args.distributed, 1), torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
               for _ in range(2)]
    train_step(model, optimizer, scheduler, batches, clip=0.5)  # optimizer state is created
    with HostSyncs() as syncs:
        for _ in range(2):
            train_step(model, optimizer, scheduler, batches, clip=0.5)
    assert syncs.calls == [], syncs.calls


def test_setup_model_keeps_weight_tying():
    """The meta build is materialised with to_empty, which unties; the output then trained from
    uninitialised memory. Tied: one matrix, vocab x dim fewer parameters, initialised."""
    from apps.main.train import setup_model
    from lingua.distributed import parallel_dims

    counts = {}
    for tied in (False, True):
        args = load_config(TrainArgs, ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=64",
                                       "dump_dir=/unused", f"model.weight_tying={str(tied).lower()}"])
        model = setup_model(args, None, parallel_dims(args.distributed, 1), torch.device("cpu"))
        counts[tied] = sum(p.numel() for p in model.parameters())
        assert (model.output.weight is model.tok_embeddings.weight) == tied
        std = model.output.weight.std().item()
        assert 0.5 * 32**-0.5 < std < 32**-0.5, std  # the truncated-normal init, not leftover memory
    assert counts[False] - counts[True] == 64 * 32


def test_finished_run_exits_cleanly(corpus, tmp_path):
    args = _args(corpus, tmp_path / "done", steps=3, **{"data.load_async": "false"})
    train(args)
    before = (tmp_path / "done/metrics.jsonl").read_text()
    again = run_module("apps.main.train", tiny_overrides(corpus, tmp_path / "done", steps=3))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout + again.stderr
    assert (tmp_path / "done/metrics.jsonl").read_text() == before
    # Fewer steps than already trained is also a clean exit, not a crash.
    assert run_module("apps.main.train", tiny_overrides(corpus, tmp_path / "done", steps=2)).returncode == 0


@pytest.mark.parametrize("add_eos", [True, False])
def test_eval_cadence_writes_validation_metrics(corpus, tmp_path, add_eos):
    """Validation every 2 steps, scored as the model was trained. With the bytes tokenizer a
    document of n bytes framed [bos, b1..bn, eos] has n + 1 predictions, n without eos; bits
    per byte are the summed nats / ln 2 / the documents' UTF-8 bytes."""
    import math

    flag = str(add_eos).lower()
    args = _args(corpus, tmp_path / "ev", steps=4, **{"data.load_async": "false", "checkpoint.eval.every": 2,
                                                      "data.add_eos": flag, "eval.validation.max_steps": 1000})
    train(args)
    rows = [json.loads(l) for l in open(tmp_path / "ev/metrics.validation.jsonl")]
    assert [r["global_step"] for r in rows] == [2, 4]
    docs = [json.loads(l)["text"] for l in open(corpus / "src/src.val.jsonl")]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    for r in rows:
        assert r["val/src/docs"] == len(docs) and r["val/src/bytes"] == n_bytes
        assert r["val/src/tokens"] == n_bytes + (len(docs) if add_eos else 0)
        assert 0 < r["val/src/loss"] < 10
        expected_bpb = r["val/src/loss"] * r["val/src/tokens"] / math.log(2) / n_bytes
        assert abs(r["val/src/bpb"] - expected_bpb) < 1e-9 * expected_bpb
    config = (tmp_path / "ev/config.yaml").read_text()
    assert "seq_len: 32" in config and "vocab_size: 258" in config and f"add_eos: {flag}" in config


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.root_dir=/nonexistent/data", "data.root_dir"),
        ("data.sources={nosuch: 1.0}", "data.sources.nosuch"),
        ("data.seq_len=64", "model.max_seqlen"),
        ("steps=0", "steps"),
        ("checkpoint.dump.every=0", "checkpoint.dump.every"),
        ("checkpoint.eval.every=0", "checkpoint.eval.every"),
        ("gc_collect_freq=0", "gc_collect_freq"),
        ("distributed.model_dtype=fp16", "distributed.model_dtype"),
    ],
)
def test_bad_input_fails_before_work_and_touches_nothing(corpus, tmp_path, override, message):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "precious.txt").write_text("keep")
    out = run_module("apps.main.train", tiny_overrides(corpus, dump) + [override], timeout=120)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert sorted(p.name for p in dump.iterdir()) == ["precious.txt"]
    assert (dump / "precious.txt").read_text() == "keep"


def test_missing_config_file_is_named(tmp_path):
    out = run_module("apps.main.train", [f"config={tmp_path}/nope.yaml", f"dump_dir={tmp_path}/d"], timeout=120)
    assert out.returncode == 2 and "nope.yaml" in out.stderr
    assert not (tmp_path / "d").exists()


def test_compiled_training_matches_eager_and_saves_eager_names(corpus, tmp_path):
    common = {"data.load_async": "false", "steps": 3, "checkpoint.dump.every": 3}
    train(_args(corpus, tmp_path / "eager", **common))
    train(_args(corpus, tmp_path / "compiled", **common, **{"distributed.compile": "true"}))
    le, lc = read_losses(tmp_path / "eager"), read_losses(tmp_path / "compiled")
    for s in le:
        assert abs(le[s] - lc[s]) < 1e-3 * abs(le[s]), (s, le[s], lc[s])
    # Per-block compile keeps parameter names: the checkpoint loads into an eager model.
    from apps.main.transformer import build_model
    from lingua.checkpoint import load_model_and_optim

    args = _args(corpus, tmp_path / "x")
    args.model.vocab_size = 258
    load_model_and_optim(tmp_path / "compiled/checkpoints/0000000003", build_model(args.model))


def test_consolidated_checkpoint_loads_the_same_weights(corpus, tmp_path):
    from apps.main.transformer import build_model
    from lingua.checkpoint import consolidate_checkpoint, load_model_and_optim, load_model_weights

    args = _args(corpus, tmp_path / "c", steps=4, **{"data.load_async": "false"})
    train(args)
    ckpt = tmp_path / "c/checkpoints/0000000004"
    out = consolidate_checkpoint(ckpt)
    assert out == ckpt / "consolidated/consolidated.pth" and (out.parent / "params.json").exists()
    from_dcp, from_file, fresh = build_model(args.model), build_model(args.model), build_model(args.model)
    load_model_and_optim(ckpt, from_dcp)
    load_model_weights(out, from_file)
    x = torch.randint(0, 258, (2, 16))
    with torch.no_grad():
        assert torch.equal(from_dcp(x), from_file(x))
        assert not torch.allclose(fresh(x), from_file(x))
    with pytest.raises(FileNotFoundError, match="not a DCP checkpoint"):
        consolidate_checkpoint(tmp_path)


MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default")


def test_one_process_step_runs_its_matmuls_in_model_dtype(corpus, tmp_path, monkeypatch):
    """distributed.model_dtype used to apply under FSDP only: one GPU (or TP alone) trained in fp32
    while MFU took the bf16 peak. The dtype rule is made to answer bf16 on this CPU as it does on
    a GPU; every matmul of the step, and of in-loop validation, must then run in bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import lingua.distributed

    monkeypatch.setattr(lingua.distributed, "training_dtype", lambda args, device: torch.bfloat16)
    # The peak for MFU is the machine's fp32 matmul rate, measured with matmuls of its own.
    monkeypatch.setattr("apps.main.train.peak_flops", lambda device, dtype: (1e12, "a test peak"))

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in MATMULS:
                self.dtypes.add(args[1].dtype if str(func) == "aten.addmm.default" else args[0].dtype)
            return func(*args, **(kwargs or {}))

    args = _args(corpus, tmp_path / "bf16", steps=2, **{"data.load_async": "false", "checkpoint.eval.every": 2,
                                                        "eval.validation.max_steps": 1})
    with MatmulDtypes() as seen:
        train(args)
    assert seen.dtypes == {torch.bfloat16}, seen.dtypes
    assert all(torch.isfinite(torch.tensor(v)) for v in read_losses(tmp_path / "bf16").values())


def test_numerics_switches_do_what_they_say():
    from lingua.distributed import DistributedArgs, apply_numerics

    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.allow_tf32)
    try:
        apply_numerics(DistributedArgs(matmul_allow_tf32=True, allow_bf16_reduced_precision_reduction=False,
                                       detect_anomaly=True))
        assert matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not matmul.allow_bf16_reduced_precision_reduction
        assert torch.is_anomaly_enabled()
        apply_numerics(DistributedArgs())
        assert not matmul.allow_tf32 and not torch.is_anomaly_enabled()
    finally:  # process-wide switches: leave them as the other tests found them
        matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.allow_tf32 = saved
        torch.autograd.set_detect_anomaly(False)


def test_spawn_method_starts_the_loader(caplog):
    from lingua.distributed import DistributedArgs, loader_start_method

    assert loader_start_method(DistributedArgs()) == "fork"
    assert loader_start_method(DistributedArgs(spawn_method="spawn")) == "spawn"
    # Meta Lingua's default (in every config it dumped): spawn instead, and it says so.
    assert loader_start_method(DistributedArgs(spawn_method="forkserver")) == "spawn"
    assert "forkserver" in caplog.text and "spawn" in caplog.text


def test_training_with_a_spawned_loader(corpus, tmp_path):
    args = _args(corpus, tmp_path / "spawn", steps=3, **{"data.load_async": "true",
                                                         "distributed.spawn_method": "spawn"})
    assert train(args).step == 3


def test_batches_are_pinned_before_an_asynchronous_copy(monkeypatch):
    """non_blocking from pageable memory is a synchronous copy; pinned, it is not. The meta
    device stands in for a GPU (no CUDA here); CPU runs take the tensor as it is."""
    from apps.main.train import host_to_device

    pinned = []

    def pin_memory(self):
        pinned.append(self.shape)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    t = torch.arange(6).view(2, 3)
    assert host_to_device(t, torch.device("cpu")) is t and pinned == []
    assert host_to_device(t, torch.device("meta")).is_meta and pinned == [torch.Size([2, 3])]


def test_gpu_memory_stats_reach_the_metrics(monkeypatch):
    from apps.main.train import device_memory_stats

    reset = []
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {
        "allocated_bytes.all.peak": 3 * 2**30, "reserved_bytes.all.peak": 4 * 2**30, "num_alloc_retries": 2,
        "num_ooms": 0})
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: reset.append(device))
    stats = device_memory_stats(torch.device("cuda", 0))
    assert stats == {"max_allocated_gib": 3.0, "max_reserved_gib": 4.0, "alloc_retries": 2, "ooms": 0}
    assert reset == [torch.device("cuda", 0)]  # the next window's peak is its own
    assert device_memory_stats(torch.device("cpu")) == {}


def test_compiled_training_with_validation_compiles_each_block_once(corpus, tmp_path):
    """The blocks share one code object and its recompile limit (8). Block 0 used to get a
    stride-0 view of the mHC streams (a second graph), and in-loop validation, with its no-grad
    mode and other batch shapes, more; past the limit every block ran eager. Now: one graph."""
    script = (
        "import sys, torch._dynamo.utils as du\n"
        "from apps.main.train import TrainArgs, train\n"
        "from lingua.args import load_config\n"
        "train(load_config(TrainArgs, sys.argv[1:]))\n"
        "print('unique_graphs', du.counters['stats']['unique_graphs'])\n"
    )
    argv = tiny_overrides(corpus, tmp_path / "c", steps=4, **{
        "data.load_async": "false", "checkpoint.eval.every": 2, "eval.validation.max_steps": 1000,
        "distributed.compile": "true", "model.mhc.enabled": "true"})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCH_LOGS="recompiles")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, failure_report(proc)
    assert "unique_graphs 1" in proc.stdout, proc.stdout[-500:]
    assert "Recompiling function" not in proc.stderr, proc.stderr[-3000:]
    assert len(read_losses(tmp_path / "c")) == 4
