"""Training-step throughput of apps.main's LMTransformer against a plain-PyTorch reference.

`python -m apps.bench.train_step [--steps N] [--warmup N] [--repeats R] [--no-compile]` times
a full step (forward, backward, grad clipping, AdamW, zero_grad) of both models, interleaved,
and prints one JSON object (tokens/s, MFU, speedups, machine, torch) on stdout; logs go to
stderr. The headline is apps.main's step as run for throughput (distributed.compile=true)
against the plain eager reference; eager/eager and compiled/compiled ratios sit beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from apps.bench.common import machine_info, stderr_logging
from apps.main.transformer import LMTransformer, LMTransformerArgs, build_model
from apps.main.train import train_step
from lingua.distributed import DistributedArgs, autocast_context, compile_blocks, training_dtype
from lingua.metrics import peak_flops
from lingua.optim import OptimArgs, build_optimizer
from lingua.profiling import DevicelessFactories, HostSyncs

logger = logging.getLogger(__name__)

TARGET_SPEEDUP = 1.0
TARGET_MFU = 0.5


@dataclass
class BenchShape:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    batch_size: int = 8
    vocab_size: int = 258  # the bytes tokenizer
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 42

    def model_args(self) -> LMTransformerArgs:
        return LMTransformerArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            max_seqlen=self.seq_len,
            vocab_size=self.vocab_size,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            seed=self.seed,
        )


# Same settings for both optimizers; a constant schedule without warmup keeps our lr equal
# to the reference's fixed lr at every step.
OPTIM = OptimArgs(lr=3e-3, weight_decay=0.1, epsilon=1e-8, beta1=0.9, beta2=0.95, clip=1.0,
                  scheduler="constant", warmup=0)


# ---------------------------------------------------------------------------------------
# Reference: a straightforward Llama-like LM in plain PyTorch, as one would write it from
# scratch. It is the baseline, so it must stay natural: no tricks, no deliberate slowness.
# ---------------------------------------------------------------------------------------


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RefBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden_dim: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.attn_norm = RefRMSNorm(dim, eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = RefRMSNorm(dim, eps)
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, s, d))
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class RefTransformer(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, hidden_dim: int,
                 max_seq_len: int, rope_theta: float = 10000.0, eps: float = 1e-5):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(RefBlock(dim, n_heads, hidden_dim, eps) for _ in range(n_layers))
        self.norm = RefRMSNorm(dim, eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        head_dim = dim // n_heads
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


def build_reference(shape: BenchShape, device: torch.device | str = "cpu") -> RefTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape.seed)
        return RefTransformer(
            shape.vocab_size, shape.dim, shape.n_layers, shape.n_heads, shape.model_args().ffn_hidden_dim(),
            shape.seq_len, shape.rope_theta, shape.norm_eps,
        ).to(device)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One model with its optimizer; `step()` is one full training step."""

    name: str
    step: Callable[[], torch.Tensor]
    sync: Callable[[], None]

    def timed(self, n: int) -> float:
        """Seconds per step over n back-to-back steps."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        self.sync()
        return (time.perf_counter() - t0) / n


def _autocast(device: torch.device):
    """The precision the training loop gives a one-process step (distributed.model_dtype, bf16
    by default, under autocast on a GPU; fp32 on CPU, where the peak is an fp32 matmul rate)."""
    return autocast_context(DistributedArgs(), device, fsdp=False)()


def make_ours(
    shape: BenchShape, x: torch.Tensor, y: torch.Tensor, device: torch.device, compile: bool = False
) -> tuple[LMTransformer, Runner]:
    model = build_model(shape.model_args(), device)
    model.train()
    if compile:  # exactly what apps.main.train does for distributed.compile=true
        compile_blocks(model)
    optimizer, scheduler = build_optimizer(model, OPTIM, n_steps=1_000_000)
    precision = autocast_context(DistributedArgs(), device, fsdp=False)

    def step() -> torch.Tensor:  # the training loop's own step, in its precision
        return train_step(model, optimizer, scheduler, [(x, y)], OPTIM.clip, precision=precision).loss

    return model, Runner("ours_compiled" if compile else "ours", step, _sync_fn(device))


def make_reference(
    shape: BenchShape, x: torch.Tensor, y: torch.Tensor, device: torch.device, compile: bool = False
) -> tuple[RefTransformer, Runner]:
    model = build_reference(shape, device)
    model.train()
    if compile:  # the same per-block compile as ours, for the like-for-like compiled ratio
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2),
                                  eps=OPTIM.epsilon, weight_decay=OPTIM.weight_decay, fused=False)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip)
        optimizer.step()
        return loss

    return model, Runner("reference_compiled" if compile else "reference", step, _sync_fn(device))


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_peak(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, source): the training loop's own peak (GPU table, or measured matmul rate in the
    training dtype); the bench measures it at start and end and takes the max."""
    return peak_flops(device, training_dtype(DistributedArgs(), device))


def syncs_per_step(make: Callable[[], Runner]) -> list[tuple[str, str]]:
    """The ops of a step that make the host wait for a GPU, counted by op on any device: a new
    runner's second step, built under DevicelessFactories so that reads of tensors that live on
    the host in a GPU run too (AdamW's non-fused step counters) are not counted."""
    with DevicelessFactories() as made:
        runner = make()
        runner.step()  # optimizer state is created
        with HostSyncs(made) as syncs:
            runner.step()
    runner.sync()
    return syncs.calls






def run_bench(shape: Optional[BenchShape] = None, steps: int = 10, warmup: int = 3, repeats: int = 5,
              device: Optional[torch.device | str] = None, compile: bool = True) -> dict:
    """Run the interleaved benchmark and return the result dict (what main prints).

    With `compile`, our step is measured as apps.main runs it for throughput
    (distributed.compile=true, per-block torch.compile) and is the headline; the eager
    step and a per-block-compiled reference are measured too, so the like-for-like
    ratios (eager/eager, compiled/compiled) are always in the JSON beside it.
    """
    shape = shape or BenchShape()
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1, repeats >= 1, warmup >= 0 (got {steps}, {repeats}, {warmup})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    peak_start, peak_source = measure_peak(device)
    logger.info("peak at start: %.1f GFLOP/s (%s)", peak_start / 1e9, peak_source)

    gen = torch.Generator().manual_seed(shape.seed)
    tokens = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    ours, ours_runner = make_ours(shape, x, y, device)
    ref, ref_runner = make_reference(shape, x, y, device)
    runners = [ours_runner, ref_runner]
    if compile:
        runners += [make_ours(shape, x, y, device, compile=True)[1], make_reference(shape, x, y, device, True)[1]]
    ours_params, ref_params = n_params(ours), n_params(ref)
    assert ours_params == ref_params, f"parameter counts differ: ours {ours_params}, reference {ref_params}"
    with torch.no_grad(), _autocast(device):
        init_loss = {"ours": float(ours(x, target=y)), "reference": float(ref(x, y))}
    logger.info("%d parameters each; loss at init ours %.4f, reference %.4f (ln V = %.4f)",
                ours_params, init_loss["ours"], init_loss["reference"], math.log(shape.vocab_size))

    for runner in runners:
        t0 = time.perf_counter()
        for _ in range(max(warmup, 2 if "compiled" in runner.name else 0)):
            runner.step()
        runner.sync()
        logger.info("%s: warmup %.1f s", runner.name, time.perf_counter() - t0)

    times: dict[str, list[float]] = {r.name: [] for r in runners}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            order = runners if r % 2 == 0 else runners[::-1]
            for runner in order:
                gc.collect()
                gc.disable()  # a collection inside one model's window would charge it to that model
                times[runner.name].append(runner.timed(steps))
                gc.enable()
            logger.info("repeat %d/%d: %s", r + 1, repeats,
                        ", ".join(f"{k} {v[-1]:.4f} s/step" for k, v in times.items()))
    finally:
        if gc_was_enabled:
            gc.enable()
        else:
            gc.disable()

    # Counted on eager steps: a dispatch mode would make dynamo re-trace the compiled ones,
    # which run the same Python around their graphs.
    syncs = {"ours": syncs_per_step(lambda: make_ours(shape, x, y, device)[1]),
             "reference": syncs_per_step(lambda: make_reference(shape, x, y, device)[1])}
    peak_end, _ = measure_peak(device)
    logger.info("peak at end: %.1f GFLOP/s", peak_end / 1e9)
    peak = max(peak_start, peak_end)

    tokens_per_step = shape.batch_size * shape.seq_len
    median = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens_per_step / v for k, v in median.items()}
    flops_per_token = ours.flops_per_token(shape.seq_len)
    mfu_of = {k: v * flops_per_token / peak for k, v in tps.items()}
    headline = "ours_compiled" if compile else "ours"
    speedup = tps[headline] / tps["reference"]
    mfu = mfu_of[headline]
    ratios = {"speedup_vs_reference_eager": tps["ours"] / tps["reference"]}
    if compile:
        ratios["speedup_vs_reference_both_compiled"] = tps["ours_compiled"] / tps["reference_compiled"]

    return {
        "bench": "train_step",
        "headline": f"{headline} (apps.main step{' with distributed.compile=true' if compile else ', eager'}) "
                    "vs the plain eager PyTorch reference",
        "tokens_per_s": tps[headline],
        "reference_tokens_per_s": tps["reference"],
        "speedup_vs_reference": speedup,
        **ratios,
        # Host syncs per step (reads of device values, data-dependent shapes): each drains a GPU.
        "syncs_per_step": len(syncs["ours"]),
        "syncs_per_step_by_variant": {k: len(v) for k, v in syncs.items()},
        "sync_sites": sorted({f"{op} at {site}" for calls in syncs.values() for op, site in calls}),
        "mfu": mfu,
        "reference_mfu": mfu_of["reference"],
        "mfu_by_variant": mfu_of,
        "tokens_per_s_by_variant": tps,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "peak_flops_start": peak_start,
        "peak_flops_end": peak_end,
        "peak_source": peak_source,
        "step_time_s": median,
        "step_times_per_repeat_s": times,
        "best_step_time_s": {k: min(v) for k, v in times.items()},
        # (max - min) / median of the per-repeat step times: a ratio closer to 1 than this
        # is within the run's noise.
        "relative_spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()},
        "n_params": {"ours": ours_params, "reference": ref_params},
        "loss_at_init": init_loss,
        "ln_vocab": math.log(shape.vocab_size),
        "config": {
            **asdict(shape),
            "ffn_hidden_dim": shape.model_args().ffn_hidden_dim(),
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            "warmup": warmup,
            "repeats": repeats,
            "compile": compile,
            "dtype": str(training_dtype(DistributedArgs(), device)).removeprefix("torch.")
                     + (" autocast" if device.type == "cuda" else ""),
            "optimizer": {"lr": OPTIM.lr, "betas": [OPTIM.beta1, OPTIM.beta2], "eps": OPTIM.epsilon,
                          "weight_decay": OPTIM.weight_decay, "clip": OPTIM.clip,
                          "fused": {"ours": True, "reference": False}},
            "timing": "median over repeats of per-step time of `steps` back-to-back steps; order alternates",
        },
        "threads": torch.get_num_threads(),
        "machine": machine_info(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "targets": {
            "speedup_vs_reference": {"target": TARGET_SPEEDUP, "value": speedup, "met": speedup >= TARGET_SPEEDUP},
            "mfu": {"target": TARGET_MFU, "value": mfu, "met": mfu >= TARGET_MFU},
        },
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    d = BenchShape()
    p = argparse.ArgumentParser(prog="python -m apps.bench.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the repeats")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="measure eager steps only (headline = eager ours vs eager reference)")
    for field in ("dim", "n_layers", "n_heads", "seq_len", "batch_size", "vocab_size"):
        p.add_argument(f"--{field}", type=int, default=getattr(d, field))
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    shape = BenchShape(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, seq_len=args.seq_len,
                       batch_size=args.batch_size, vocab_size=args.vocab_size)
    result = run_bench(shape, steps=args.steps, warmup=args.warmup, repeats=args.repeats, device=args.device,
                       compile=args.compile)
    print(json.dumps(result, indent=2))
    logger.info("result printed on stdout as JSON; nothing written to disk. Quote the ratio "
                "(speedup_vs_reference), not absolute times, across machines.")
    return result


if __name__ == "__main__":
    stderr_logging(logger)
    main()
