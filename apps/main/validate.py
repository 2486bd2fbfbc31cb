"""Health checks of a model, from a checkpoint or fresh from a training config: finite weights,
one forward and backward on a real batch of the run's data, and the invariants of the memory
modules it has (mHC mixing matrices, product-key usage, LM2 slots, LongMem bank). Prints one
line per check, writes validate.json; exit 0 when all pass, 1 when one fails, 2 on a config error.

    python -m apps.main.validate ckpt_dir=<dump_dir or checkpoint dir> [batch_size=4 seq_len=256]
    python -m apps.main.validate train_config=apps/main/configs/mhc_debug.yaml data_root=./data
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from apps.main.eval import load_model_from_checkpoint, resolve_ckpt_dir, step_checkpoint
from apps.main.train import TrainArgs, check_memory_model, data_and_tokenizer
from apps.main.transformer import IGNORE_INDEX, LMTransformer, LMTransformerArgs, build_model
from lingua.args import ConfigError, choice, cli_main, load_config, load_params
from lingua.data import VAL_GLOB, DataArgs, DataError, JSONLReader, TokenStream, assign_files, labels_from, source_files
from lingua.distributed import default_device
from lingua.logger import init_logger
from lingua.memory_slots import MemorySlots
from lingua.mhc import AMAX_WARN, amax_stats
from lingua.product_key.memory import ProductKeyMemory, auxiliary_losses
from lingua.storage import StoragePath, resolve, write_json
from lingua.tokenizer import Tokenizer
from lingua.transformer import Attention

logger = logging.getLogger(__name__)

REPORT = "validate.json"
TOOL = "apps.main.validate"  # written into the report: only such a file is ever overwritten
SHOWN_PROBLEMS = 3  # per printed line; the report has them all
GATES = ("in_gate", "forget_gate", "out_gate")  # of each LM2 memory block


@dataclass
class ValidateArgs:
    ckpt_dir: str = ""  # a checkpoint dir, or a dump dir (its newest checkpoint)
    train_config: str = ""  # instead: a training config, its model fresh from model.seed
    data_root: str = ""  # replaces the run's data.root_dir
    split: str = choice("auto", ("auto", "val", "train"))  # auto: *.val.jsonl when every source has one
    batch_size: int = 4
    seq_len: Optional[int] = None  # None: the run's data.seq_len
    tolerance: float = 1e-3  # mHC: every H_res row and column sums to 1 within this, entries >= 0
    max_amax: float = AMAX_WARN  # mHC: a composite Amax gain above this fails
    # Product keys: distinct value rows read / the most the batch could read (min(rows, reads));
    # below this the memory has collapsed onto a few rows. Scale-free, unlike the KL from
    # uniform, whose floor log(rows / reads) depends on the batch size (it is reported).
    min_pk_spread: float = 0.01
    out: str = ""  # a file or a dir; default <dump_dir>/validate.json (cwd with train_config)


@dataclass
class CheckResult:
    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)  # scalars print; dicts (per layer) go to JSON only
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items() if not isinstance(v, dict))
        why = "; ".join(self.problems[:SHOWN_PROBLEMS])
        if len(self.problems) > SHOWN_PROBLEMS:
            why += f"; and {len(self.problems) - SHOWN_PROBLEMS} more (all in {REPORT})"
        why = f"  | {why}" if why else ""
        return f"{self.name:<18} {'PASS' if self.passed else 'FAIL'}  {shown}{why}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t.detach())).sum())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _json_safe(obj: Any) -> Any:
    """NaN and infinities as strings: JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass
class Target:
    """What is validated, resolved and checked before any work."""

    data: DataArgs  # the run's, with data_root and seq_len applied
    split: str  # the files the batch comes from: "val" or "train"
    files: dict[str, list]
    out: StoragePath
    ckpt: Optional[StoragePath] = None  # None: fresh from train and its tokenizer (below)
    train: Optional[TrainArgs] = None
    tokenizer: Optional[Tokenizer] = None


def prepare(args: ValidateArgs) -> Target:
    """ConfigError / DataError / FileNotFoundError naming the key, file or path at fault."""
    if bool(args.ckpt_dir) == bool(args.train_config):
        raise ConfigError("give one of ckpt_dir=<checkpoint or dump dir> and train_config=<training config yaml>")
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 2):
        raise ConfigError(f"batch_size must be >= 1 and seq_len >= 2, got {args.batch_size} and {args.seq_len}")
    if not args.tolerance >= 0 or not args.max_amax > 0 or not args.min_pk_spread >= 0:
        raise ConfigError("tolerance and min_pk_spread must be >= 0, max_amax > 0")
    ckpt, train, tokenizer = None, None, None
    if args.ckpt_dir:
        ckpt = resolve_ckpt_dir(args.ckpt_dir)
        model_args = load_params(ckpt / "params.json", LMTransformerArgs, "model")
        data = load_params(ckpt / "params.json", DataArgs, "data")
    else:
        train = load_config(TrainArgs, [f"config={args.train_config}"])
        model_args, data = train.model, train.data
    if args.data_root:
        data.root_dir = args.data_root
    if train is not None:
        check_memory_model(train)
        tokenizer = data_and_tokenizer(train)  # checks the training files; fills vocab_size and bos_id
    seq_len = args.seq_len or data.seq_len
    if seq_len > model_args.max_seqlen:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seqlen={model_args.max_seqlen}")
    data.seq_len = seq_len
    split, files = batch_files(data, args.split)
    return Target(data, split, files, report_path(args.out, ckpt), ckpt, train, tokenizer)


def batch_files(data: DataArgs, split: str) -> tuple[str, dict[str, list]]:
    if split != "train":
        try:
            return "val", source_files(data, VAL_GLOB)
        except DataError:
            if split == "val":
                raise
    return "train", source_files(data)


def report_path(out: str, ckpt: Optional[StoragePath]) -> StoragePath:
    """Where validate.json goes; an existing file there must be one this command wrote."""
    dump_dir = step_checkpoint(ckpt).parent.parent if ckpt is not None else resolve(os.getcwd())
    path = resolve(out) if out else dump_dir / REPORT
    if path.is_dir():
        path = path / REPORT
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("tool") == TOOL
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"out: '{path}' exists and is not a {REPORT} written by {TOOL}; not overwriting it")
    return path


def load_model(target: Target, device: torch.device) -> tuple[LMTransformer, Tokenizer]:
    if target.ckpt is not None:
        model, tokenizer, _ = load_model_from_checkpoint(target.ckpt, device)
        return model, tokenizer
    return build_model(target.train.model, device).eval(), target.tokenizer


def real_batch(data: DataArgs, files: dict[str, list], tokenizer: Tokenizer, batch_size: int):
    """batch_size windows of data.seq_len tokens packed as training packs them (documents joined,
    each with its bos / eos), the sources in turn, unshuffled: (inputs, labels) int64 arrays."""
    readers = [JSONLReader(assign_files(fs, 0, 1), data.on_bad_line == "skip", data.text_field,
                           data.text_field_separator) for fs in files.values()]
    try:
        streams = [TokenStream(r, tokenizer, data.add_bos, data.add_eos) for r in readers]
        windows = [streams[i % len(streams)].window(data.seq_len) for i in range(batch_size)]
    finally:
        for r in readers:
            r.close()
    tokens, masks = np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows])
    return tokens[:, :-1], labels_from(tokens, masks)


class RunningStats:
    """Mean, min, max and non-finite count of the values seen, without keeping them."""

    def __init__(self):
        self.total, self.count, self.low, self.high, self.nonfinite = 0.0, 0, math.inf, -math.inf, 0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().float()
        self.nonfinite += _nonfinite(t)
        t = t[torch.isfinite(t)]
        if t.numel():
            self.total, self.count = self.total + float(t.sum()), self.count + t.numel()
            self.low, self.high = min(self.low, float(t.min())), max(self.high, float(t.max()))

    def figures(self) -> dict[str, float]:
        return {"mean": self.total / max(self.count, 1), "min": self.low, "max": self.high}


@contextmanager
def memory_recorder(model: LMTransformer) -> Iterator[dict]:
    """Hooks that record, during the forward, what the segment memories read and write: per LM2
    block the slots after each segment and the sigmoid of its gates; per LongMem bank the bank
    after each segment and how many query tokens had a filled bank of their document to read."""
    rec: dict = {"slots": {}, "gates": {}, "bank": {}}
    handles = []

    def slots_hook(name):
        def hook(module, args, output):
            ctx, layer_id = args[1], args[2]
            if layer_id in ctx.updates:
                rec["slots"].setdefault(name, []).append(ctx.updates[layer_id].detach())
        return hook

    def gate_hook(name):
        return lambda module, args, output: rec["gates"].setdefault(name, RunningStats()).add(torch.sigmoid(output))

    def bank_hook(name):
        def hook(module, args, output):
            ctx = args[4] if len(args) > 4 else None
            if ctx is None:
                return
            key = ("bank", module.layer_id)
            before, entry = ctx.state.get(key), rec["bank"].setdefault(name, {"queries": 0, "with_memory": 0})
            entry["queries"] += ctx.segment.carried.numel()
            if before is not None:
                entry["with_memory"] += int((ctx.segment.carried & (before.n_chunks > 0)[:, None]).sum())
            if key in ctx.updates:
                entry["after"] = ctx.updates[key]
        return hook

    for name, m in model.named_modules():
        if isinstance(m, MemorySlots):
            handles.append(m.register_forward_hook(slots_hook(name)))
            for gate in GATES:
                handles.append(getattr(m, gate).register_forward_hook(gate_hook(f"{name}.{gate}")))
        elif isinstance(m, Attention) and m.memory_bank is not None:
            handles.append(m.register_forward_hook(bank_hook(name)))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def check_parameters(model: LMTransformer) -> CheckResult:
    bad, n = [], 0
    for name, p in model.named_parameters():
        n += p.numel()
        if k := _nonfinite(p):
            bad.append(f"{name}: {k} non-finite of {p.numel()}")
    return CheckResult("parameters_finite", not bad, {"parameters": n, "non_finite_tensors": len(bad)}, bad)


def check_forward_backward(model: LMTransformer, x: torch.Tensor, y: torch.Tensor, split: str) -> CheckResult:
    """One training-mode forward (the memories count their reads) and backward, with the product
    keys' auxiliary terms as the training step adds them."""
    figures = {"split": split, "batch": f"{x.shape[0]}x{x.shape[1]}", "tokens": int((y != IGNORE_INDEX).sum())}
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        loss = model(x, target=y)
        (loss + sum(auxiliary_losses(model).values())).backward()
    except Exception as e:  # noqa: BLE001 - the report says what broke; the other checks still run
        return CheckResult("forward_backward", False, figures, [f"forward/backward raised {type(e).__name__}: {e}"])
    finally:
        model.eval()
    loss = float(loss.detach())
    problems = [] if math.isfinite(loss) else [f"loss is {loss}"]
    norms, no_grad = [], 0
    for name, p in model.named_parameters():
        if p.grad is None:
            no_grad += p.requires_grad
            continue
        norms.append(torch.linalg.vector_norm(p.grad.float()))
        if k := _nonfinite(p.grad):
            problems.append(f"grad of {name}: {k} non-finite of {p.numel()}")
    grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    figures.update(loss=loss, grad_norm=grad_norm, params_without_grad=no_grad)
    return CheckResult("forward_backward", not problems, figures, problems)


def check_mhc(model: LMTransformer, tolerance: float, max_amax: float) -> CheckResult:
    """Every H_res of the forward doubly stochastic within `tolerance` (Sinkhorn-Knopp converged),
    and the Amax gains (lingua.mhc.amax_stats) per connection and over the whole residual path."""
    connections, layers, problems = model.hyper_connections(), {}, []
    for name, hc in connections:
        if hc.last_h_res is None:
            problems.append(f"{name}: no H_res recorded (no forward)")
            continue
        h = hc.last_h_res.double()
        if k := _nonfinite(h):
            problems.append(f"{name}: H_res has {k} non-finite entries")
            continue
        rows, cols = float((h.sum(-1) - 1).abs().max()), float((h.sum(-2) - 1).abs().max())
        layers[name] = {"row_sum_error": rows, "col_sum_error": cols, "min_entry": float(h.min())}
        if max(rows, cols) > tolerance or h.min() < 0:
            problems.append(f"{name}: not doubly stochastic (row sums off by {rows:.2e}, columns by {cols:.2e}, "
                            f"min entry {float(h.min()):.2e}; tolerance {tolerance:g})")
    amax = amax_stats(connections)
    for name in layers:
        layers[name].update(amax_forward=amax[f"{name}/amax_forward"], amax_backward=amax[f"{name}/amax_backward"])
    worst = {key: max((v[key] for v in layers.values()), default=math.nan)
             for key in ("row_sum_error", "col_sum_error")}
    composite = {k: amax.get(f"composite_amax_{k}", math.nan) for k in ("forward", "backward")}
    for k, v in composite.items():
        if not v <= max_amax:
            problems.append(f"composite Amax gain ({k}) {v:.4g} > {max_amax:g}")
    figures = {"connections": len(connections), "max_row_err": worst["row_sum_error"],
               "max_col_err": worst["col_sum_error"], "amax_fwd": amax.get("amax_forward", math.nan),
               "amax_bwd": amax.get("amax_backward", math.nan), "composite_amax_fwd": composite["forward"],
               "composite_amax_bwd": composite["backward"], "layers": layers}
    return CheckResult("mhc", not problems, figures, problems)


def check_product_keys(model: LMTransformer, min_spread: float) -> CheckResult:
    """Per memory layer, the value rows read on the batch (ProductKeyMemory.usage_stats): hit
    fraction, KL from uniform (nats) and the spread; fails on no reads, a non-finite KL or a
    spread below min_spread (see ValidateArgs)."""
    layers, problems = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, ProductKeyMemory):
            continue
        name, reads, rows = name.removesuffix(".feed_forward"), float(m.row_hits.sum()), m.n_keys**2
        stats = m.usage_stats()  # resets the counts
        if not stats:
            problems.append(f"{name}: no value row read")
            continue
        spread = stats["hit_fraction"] * rows / min(rows, reads)
        layers[name] = {**stats, "spread": spread, "kl_floor": max(0.0, math.log(rows / reads)), "reads": reads}
        if not math.isfinite(stats["kl_uniform"]) or not spread >= min_spread:
            problems.append(f"{name}: KL from uniform {stats['kl_uniform']:.4g}, spread {spread:.4g} "
                            f"(min {min_spread:g}): the memory reads collapse onto few rows")
    figures = {"memory_layers": len(layers)}
    for name, s in layers.items():
        figures.update({f"{name}.hit": s["hit_fraction"], f"{name}.kl": s["kl_uniform"], f"{name}.spread": s["spread"]})
    return CheckResult("product_key_usage", not problems, {**figures, "layers": layers}, problems)


def check_memory_slots(rec: dict) -> CheckResult:
    """The LM2 slots every segment wrote and the gates' values: finite; norms of the final slots."""
    layers, problems = {}, []
    for name, states in rec["slots"].items():
        if k := sum(_nonfinite(s) for s in states):
            problems.append(f"{name}: {k} non-finite slot values over {len(states)} segments")
        norms = states[-1].float().norm(dim=-1)
        layers[name] = {"segments": len(states), "slot_norm_mean": float(norms.mean()),
                        "slot_norm_max": float(norms.max())}
    for name, stats in rec["gates"].items():
        if stats.nonfinite:
            problems.append(f"{name}: {stats.nonfinite} non-finite gate values")
        block, gate = name.rsplit(".", 1)
        layers.setdefault(block, {})[gate] = stats.figures()
    if not rec["slots"]:
        problems.append("no slots written (no forward through segments)")
    slots = [v for v in layers.values() if "slot_norm_mean" in v]
    figures = {"blocks": len(slots), "slot_norm_mean": _mean([v["slot_norm_mean"] for v in slots]),
               "slot_norm_max": max((v["slot_norm_max"] for v in slots), default=math.nan),
               **{g: _mean([v[g]["mean"] for v in layers.values() if g in v]) for g in GATES}, "layers": layers}
    return CheckResult("memory_slots", not problems, figures, problems)


def check_memory_bank(model: LMTransformer, rec: dict) -> CheckResult:
    """The LongMem bank after the batch: finite keys and values, not empty, how full, how many
    query tokens had memory to read; the joint-attention gate sigmoid(g) per head."""
    layers, problems = {}, []
    for name, m in model.named_modules():
        if not (isinstance(m, Attention) and m.memory_bank is not None):
            continue
        entry, gate = rec["bank"].get(name, {}), torch.sigmoid(m.memory_bank.gate.detach().float())
        bank = entry.get("after")
        if bank is None:
            problems.append(f"{name}: bank never written (no forward through segments)")
            continue
        if k := sum(_nonfinite(t) for t in (bank.keys, bank.values, bank.chunk_keys, gate)):
            problems.append(f"{name}: {k} non-finite values in the bank or its gate")
        tokens = bank.n_tokens().float()
        if float(tokens.max()) == 0:
            problems.append(f"{name}: bank empty after the batch")
        layers[name.removesuffix(".attention")] = {
            "tokens": float(tokens.mean()), "capacity": m.memory_bank.capacity_chunks * m.memory_bank.chunk_size,
            "read_share": entry["with_memory"] / max(entry["queries"], 1), "gate": float(gate.mean()),
            "gate_min": float(gate.min()), "gate_max": float(gate.max())}
    figures = {f"{name}.{k}": v for name, s in layers.items() for k, v in s.items()
               if k not in ("gate_min", "gate_max")}
    return CheckResult("memory_bank", not problems, {**figures, "layers": layers}, problems)


def run_checks(model: LMTransformer, x: torch.Tensor, y: torch.Tensor, args: ValidateArgs,
               split: str) -> Iterator[CheckResult]:
    """Yields each check as it completes (the forward-based ones share one forward)."""
    yield check_parameters(model)
    memories = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    for m in memories:
        m.usage_stats()  # zeroes the read counts: only this batch's reads count
    with memory_recorder(model) as rec:
        yield check_forward_backward(model, x, y, split)
    if model.args.mhc.enabled:
        yield check_mhc(model, args.tolerance, args.max_amax)
    if memories:
        yield check_product_keys(model, args.min_pk_spread)
    if model.args.use_internal_memory:
        yield check_memory_slots(rec)
    if model.args.use_external_memory:
        yield check_memory_bank(model, rec)


def validate(args: ValidateArgs, target: Target, device: torch.device) -> dict:
    """Run the checks, print the table, write the report; returns it."""
    start = time.perf_counter()
    model, tokenizer = load_model(target, device)
    x, y = (torch.from_numpy(a).to(device) for a in real_batch(target.data, target.files, tokenizer, args.batch_size))
    what = f"checkpoint {target.ckpt}" if target.ckpt is not None else f"fresh model of {args.train_config}"
    print(f"validating {what} on {device}\n{'check':<18} result  figures", flush=True)
    checks = []
    for check in run_checks(model, x, y, args, target.split):
        print(check.line(), flush=True)
        checks.append(check)
    passed = all(c.passed for c in checks)
    report = {"tool": TOOL, "checkpoint": str(target.ckpt) if target.ckpt is not None else None,
              "train_config": args.train_config or None, "device": str(device), "passed": passed,
              "seconds": time.perf_counter() - start, "args": asdict(args), "checks": [asdict(c) for c in checks]}
    target.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(target.out, _json_safe(report))
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"\nreport: {target.out}", flush=True)
    return report


def main(argv: Optional[list[str]] = None) -> None:
    """Exits 0 when every check passes, 1 when one fails, 2 on a config error (before any work)."""
    args = cli_main(ValidateArgs, argv)
    init_logger(0)
    try:
        target = prepare(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    report = validate(args, target, default_device(0))
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
