"""Learning-rate range test (Smith 2015, "Cyclical Learning Rates"; the fastai / Lightning lr
finder): a throwaway copy of the configured model trains with an lr rising exponentially from
lr_min to lr_max, and the smoothed loss curve gives a suggested `optim.lr` (or the lr of the
component that trains: `optim.memory_lr` with a frozen base, say; see swept_group).

    python -m apps.main.lr_find config=apps/main/configs/debug.yaml [lr_min=1e-6 lr_max=1 steps=100]

lr_min, lr_max and steps are this command's own keys (steps: range-test steps; the config's
`steps`, the training run's length, does not apply); every other key is a TrainArgs key. Only
dump_dir/lr_find/ is written (lr_find.json, lr_find.png, lr_find.log), by rank 0; no checkpoint is
read or written. The suggestion rule is `suggest_lr`'s docstring.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import shlex
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from apps.main.train import (
    TrainArgs,
    batch_to_device,
    data_and_tokenizer,
    setup_model,
    start_processes,
    train_step,
    validate_args,
)
from apps.main.transformer import build_model
from lingua.args import ConfigError, load_config
from lingua.storage import StagedFile, StoragePath, resolve, write_bytes_atomic, write_text_atomic
from lingua.data import DataError, build_data_loader
from lingua.distributed import (
    autocast_context,
    dp_rank_and_size,
    loader_start_method,
    shutdown_distributed,
    world_info,
)
from lingua.logger import init_logger
from lingua.optim import build_optimizer

logger = logging.getLogger(__name__)

SMOOTHING_DECADES = 0.25  # the moving average's time constant, in decades of lr (smoothing_beta)
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of its best (as fastai and Lightning)
END_OF_DESCENT = 0.95  # the descent ends where the smoothed loss has made this fraction of its fall
DIVISOR = 3.0  # suggestion = the lr at the end of the descent / DIVISOR (Smith 2015: 1/3 to 1/4 of max_lr)
METHOD = "end of the descent of the smoothed loss / 3"


@dataclass
class LRFindArgs:
    lr_min: float = 1e-6
    lr_max: float = 1.0
    steps: int = 100  # range-test steps, not the training run's


def split_argv(argv: list[str]) -> tuple[LRFindArgs, list[str]]:
    """This command's keys (lr_min, lr_max, steps) from the command line; the rest is TrainArgs'."""
    own = list(LRFindArgs.__dataclass_fields__)
    mine = [a for a in argv if a.split("=", 1)[0] in own]
    for arg in argv:  # TrainArgs' check would name the closest TrainArgs key, never one of ours
        key = arg.split("=", 1)[0]
        near = difflib.get_close_matches(key, own, n=1, cutoff=0.75)
        if key not in own and key not in TrainArgs.__dataclass_fields__ and near:
            raise ConfigError(f"unknown config key '{key}'; did you mean lr_find's '{near[0]}'?")
    find = load_config(LRFindArgs, mine, config_file=False)
    if not 0 < find.lr_min < find.lr_max:
        raise ConfigError(f"lr_find needs 0 < lr_min < lr_max, got lr_min={find.lr_min} lr_max={find.lr_max}")
    if find.steps < 2:
        raise ConfigError(f"lr_find key 'steps' must be >= 2 (a range has two ends), got {find.steps}")
    return find, [a for a in argv if a not in mine]


def exponential_lrs(lr_min: float, lr_max: float, steps: int) -> list[float]:
    """lr_min * (lr_max / lr_min) ** (i / (steps - 1)): evenly spaced in log(lr), both ends included."""
    return [lr_min * (lr_max / lr_min) ** (i / (steps - 1)) for i in range(steps)]


def exponential_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, lrs: list[float]) -> LambdaLR:
    """Step i runs at lrs[i] for the groups whose lr is `base_lr` (optim.lr); every other group (a
    memory table's own lr, say) gets the same factor, so the per-group ratios stay as configured.
    LambdaLR scales each group's `initial_lr`, which the scheduler it replaces left untouched."""
    return LambdaLR(optimizer, lambda i: lrs[min(i, len(lrs) - 1)] / base_lr)


COMPONENT_LR_KEYS = {"base": "base_model_lr", "memory": "memory_lr", "lora": "lora_lr"}


def swept_group(optimizer: torch.optim.Optimizer, optim) -> tuple[dict, str]:
    """The param group whose lr is the test's axis, and the key that sets it: the base model's
    when it trains, else the memory's, else LoRA's (a component's own key when given, else
    optim.lr). With base_model_lr=0 and memory_lr=1e-3 the axis is memory_lr: optim.lr's groups
    do not exist."""
    by_label = {g.get("label"): g for g in reversed(optimizer.param_groups)}
    for component, key in COMPONENT_LR_KEYS.items():
        if component in by_label:
            return by_label[component], f"optim.{key}" if getattr(optim, key) is not None else "optim.lr"
    return optimizer.param_groups[0], "optim.lr"


def scaled_lr_settings(optim, factor: float) -> dict[str, float]:
    """optim.lr and every component lr the config sets (frozen ones, 0, aside), times `factor`:
    the lrs the test ran at, with their ratios, at the suggested point."""
    out = {"optim.lr": optim.lr * factor}
    for key in COMPONENT_LR_KEYS.values():
        value = getattr(optim, key)
        if value:
            out[f"optim.{key}"] = value * factor
    return out


def smoothing_beta(lr_min: float, lr_max: float, steps: int) -> float:
    """The EMA's beta for a time constant of SMOOTHING_DECADES of lr: 0.76 for 100 steps over six
    decades. The average lags the loss by about beta / (1 - beta) steps, so a beta fixed in steps
    smooths a fine range test too little or a coarse one far too much: fastai's and Lightning's
    0.98 lags by 49 steps, three decades in a 100-step test over six, and moved the minimum of
    the debug model's curve from 7e-3 to 0.6."""
    steps_per_decade = (steps - 1) / math.log10(lr_max / lr_min)
    return 1 - 1 / max(1.0, SMOOTHING_DECADES * steps_per_decade)


def smooth(losses: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (without it the first points would be
    pulled towards 0, where the average starts)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def noise_of(losses: list[float]) -> float:
    """The step-to-step noise of the loss (standard deviation), from the median absolute
    deviation of its differences: a trend cancels in the differences, and spikes do not count."""
    diffs = np.diff(np.asarray(losses, dtype=np.float64))
    if len(diffs) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2))


def suggest_lr(lrs: list[float], losses: list[float], beta: float) -> dict:
    """The suggested optim.lr and how it was chosen, from the losses smoothed with `beta`.

    Rule: Smith's max_lr, "the lr at which the loss stops falling", divided by 3. The descent
    ends at the first step whose smoothed loss is as close to the minimum as END_OF_DESCENT of
    the whole fall from the first step (95%) or as the smoothed noise allows (3 standard
    deviations: on a flat plateau noise alone puts the minimum that far below the plateau);
    the suggestion is that step's lr / DIVISOR.

    Why not the usual rules (their lrs are in the result too): on a language model the loss
    falls twice, first as the model learns token frequencies (at a low lr: 1e-4 on debug), then
    as it learns context, and the first fall is often the steeper, so "steepest descent before
    the minimum" (Lightning) picked 1.2e-4 on debug, 25x below its tuned 3e-3. After the second
    fall the loss stays on a ragged plateau for a decade or two before it diverges, and where on
    the plateau noise puts the minimum decides "minimum / 10" (fastai): 7e-4 to 6e-2 on the same
    curve smoothed a little more or less. The end of the descent is the plateau's start, which
    noise moves little. Like every rule on a smoothed curve it comes late by the average's lag,
    most after a sudden fall (up to about three time constants, 0.75 of a decade)."""
    s = np.asarray(smooth(losses, beta), dtype=np.float64)
    i_min = int(np.argmin(s))
    fall = s[0] - s[i_min]
    noise = noise_of(losses) * math.sqrt((1 - beta) / (1 + beta))  # an EMA's share of white noise
    tolerance = max((1 - END_OF_DESCENT) * fall, 3 * noise)
    i_end = int(np.argmax(s <= s[i_min] + tolerance))  # the first such step (i_min is one)
    notes = []
    if fall <= tolerance:
        notes.append("the loss never fell: lower lr_min")
    elif i_min == len(s) - 1:
        notes.append("the loss still falls at the last lr: raise lr_max (or steps, if it stopped early)")
    slope = np.gradient(s, np.log10(lrs)) if len(s) > 1 else np.zeros(1)
    skip = min(len(s) // 10, i_min)  # as Lightning: the first points' slope is mostly noise
    i_steep = skip + int(np.argmin(slope[skip : i_min + 1]))
    return {
        "suggested_lr": lrs[i_end] / DIVISOR, "method": METHOD, "index": i_end, "end_of_descent_lr": lrs[i_end],
        "tolerance": float(tolerance), "smoothed_noise": noise, "end_of_descent_fraction": END_OF_DESCENT,
        "divisor": DIVISOR, "notes": notes, "min_index": i_min, "lr_at_min": lrs[i_min],
        "min_smoothed_loss": float(s[i_min]),
        # The usual rules' answers on the same curve, for comparison (not used):
        "steepest_descent_lr": lrs[i_steep], "min_over_10_lr": lrs[i_min] / 10,
    }


def lr_find(args: TrainArgs, find: LRFindArgs, build_model_fn: Callable = build_model) -> dict:
    """Run the range test; rank 0 writes dump_dir/lr_find/. Returns the result (on every rank)."""
    _, world, dims = validate_args(args)
    if args.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0 (the lr the schedule scales), got {args.optim.lr}")
    data_and_tokenizer(args)

    out_dir = resolve(args.dump_dir) / "lr_find"  # a path or an fsspec URL, as train's
    if world.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = StagedFile(out_dir / "lr_find.log") if world.rank == 0 else None
    init_logger(world.rank, str(log.local) if log is not None else None)
    try:
        return _range_test(args, find, build_model_fn, world, dims, out_dir)
    finally:
        if log is not None:
            log.sync()


def _range_test(args: TrainArgs, find: LRFindArgs, build_model_fn: Callable, world, dims, out_dir) -> dict:
    device, mesh = start_processes(args, world, dims)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    torch.manual_seed(args.seed)

    model = setup_model(args, mesh, dims, device, build_model_fn)
    precision = autocast_context(args.distributed, device, fsdp=dims.dp > 1)
    optimizer, _ = build_optimizer(model, args.optim, find.steps)  # its schedule is replaced by ours
    lrs = exponential_lrs(find.lr_min, find.lr_max, find.steps)
    swept, lr_key = swept_group(optimizer, args.optim)
    axis_lr = swept["initial_lr"]  # its configured lr (build_optimizer's schedule set "lr" to its warmup)
    scheduler = exponential_scheduler(optimizer, axis_lr, lrs)
    beta = smoothing_beta(find.lr_min, find.lr_max, find.steps)
    logger.info("lr range test: %d steps, lr %.1e -> %.1e, %d process(es) on %s", find.steps, find.lr_min,
                find.lr_max, world.world_size, device)

    # The lr actually in the swept group at each step: what the test ran at, not what the formula
    # meant it to.
    ran_at: list[float] = []
    losses: list[float] = []
    stop = {"reason": "completed", "step": find.steps}
    loader = build_data_loader(args.data, dp_rank, dp_size, None, start_method=loader_start_method(args.distributed))
    try:
        model.train()
        best = math.inf
        for i in range(find.steps):
            micro_batches = [batch_to_device(next(loader), device) for _ in range(args.grad_acc_steps)]
            lr = swept["lr"]
            result = train_step(model, optimizer, scheduler, micro_batches, args.optim.clip, mesh, precision)
            # The global mean over all ranks' tokens: every rank reads the same value, so every
            # rank takes the same stop decision and none is left waiting in a collective.
            loss = float(result.loss)
            if not bool(result.finite):  # train_step skipped this update; the curve ends before it
                stop = {"reason": f"diverged: loss {loss} or its gradient is not finite", "step": i + 1}
                break
            ran_at.append(lr)
            losses.append(loss)
            smoothed = smooth(losses, beta)[-1]  # recomputed whole: a few hundred points at most
            best = min(best, smoothed)
            if (i + 1) % max(1, find.steps // 10) == 0:
                logger.info("step %d  lr %.2e  loss %.4f  smoothed %.4f", i + 1, lr, loss, smoothed)
            if smoothed > DIVERGE_FACTOR * best:
                stop = {"reason": f"diverged: smoothed loss {smoothed:.4g} > {DIVERGE_FACTOR:g} x best {best:.4g}",
                        "step": i + 1}
                break
    finally:
        loader.close()
    if not losses:
        raise ConfigError(f"lr_find: the first step already {stop['reason']}; lower lr_min")

    n = len(losses)
    smoothed_all = smooth(losses, beta)
    suggestion = suggest_lr(ran_at, losses, beta)
    result = {
        "suggested_lr": suggestion["suggested_lr"],
        "suggestion": suggestion,
        "stop": stop,
        "lr_key": lr_key,  # the key whose lr is the axis (swept_group)
        "lr": ran_at,  # the lr of lr_key's group at each step (its loss is measured before that update)
        "loss": losses,
        "smoothed_loss": smoothed_all,
        "config_lr": axis_lr,
        # every lr the config sets, scaled together to the suggestion (their ratios as tested)
        "suggested": scaled_lr_settings(args.optim, suggestion["suggested_lr"] / axis_lr),
        "range": {"lr_min": find.lr_min, "lr_max": find.lr_max, "steps": find.steps},
        "smoothing": {"method": "exponential moving average, bias-corrected", "beta": beta},
        "diverge_factor": DIVERGE_FACTOR,
        "world_size": world.world_size,
        "tokens_per_step": args.data.batch_size * args.data.seq_len * args.grad_acc_steps * dp_size,
    }
    if world.rank == 0:
        write_report(out_dir, result)
        print(f"lr_find: suggested {lr_key}={result['suggested_lr']:.3g} ({suggestion['method']}) after {n} steps "
              f"({stop['reason']}); config's {lr_key} {axis_lr:g}\n"
              f"  results: {out_dir / 'lr_find.json'}\n"
              f"  plot:    {out_dir / 'lr_find.png'}", flush=True)
    return result


def write_report(out_dir: StoragePath, result: dict) -> None:
    """lr_find.json and lr_find.png (loss against lr, log x axis, the suggestion marked)."""
    # The object API with the Agg canvas: no pyplot, so no process-wide figure state or GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    write_text_atomic(out_dir / "lr_find.json", json.dumps(result, indent=1) + "\n")
    lrs, raw, smoothed = result["lr"], result["loss"], result["smoothed_loss"]
    s = result["suggestion"]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(lrs, raw, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", lw=2, label=f"smoothed (EMA, beta {result['smoothing']['beta']:.2f})")
    ax.plot([lrs[s["index"]]], [smoothed[s["index"]]], "o", color="tab:red", label="end of the descent")
    ax.axvline(s["suggested_lr"], color="tab:red", ls="--", lw=1.5,
               label=f"suggested lr {s['suggested_lr']:.2g} ({s['method']})")
    ax.axvline(result["config_lr"], color="gray", ls=":", lw=1, label=f"config's lr {result['config_lr']:g}")
    ax.set_xscale("log")
    # The divergence would squash the useful part of the curve: show up to the start's level.
    top = max(smoothed[: s["min_index"] + 1]) * 1.15
    ax.set_ylim(min(raw) - 0.05 * abs(min(raw)), max(top, min(raw) + 1e-6))
    ax.set_xlabel(f"learning rate ({result.get('lr_key', 'optim.lr')})")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test: {len(lrs)} steps, {result['stop']['reason']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_bytes_atomic(out_dir / "lr_find.png", png.getvalue())


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        find, train_argv = split_argv(argv)
        args = load_config(TrainArgs, train_argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        result = lr_find(args, find)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if world_info().rank == 0:
        keys = result["suggested"]
        same = " ".join(shlex.quote(a) for a in train_argv if a.split("=", 1)[0] not in keys)
        settings = " ".join(f"{k}={v:.3g}" for k, v in keys.items())
        print(f"next: python -m apps.main.train {same} {settings}", flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
