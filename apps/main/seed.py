"""The hybrid trainer's seed command lines, mapped onto apps.main (the entry points at the
repository root call these):

    python data_proc/prepare_io_data.py --input_file in.jsonl --output_file out.jsonl --save_dir datasets/io_pairs
    python train.py model=llama_hybrid train.batch_size=4 train.learning_rate=1e-4
    torchrun --nproc_per_node=4 train.py model=llama_hybrid train.batch_size=2
    bash scripts/train_hybrid.sh
    python eval.py --checkpoint checkpoints/best_model.pt --test_data datasets/io_pairs/test

`model=NAME` is a config group: apps/main/configs/NAME.yaml (or a YAML path). `train.KEY=V`
maps onto our keys (SEED_TRAIN_KEYS); any other `a.b=c` is one of our keys as it stands. The
mapping is printed once (rank 0). The seed saved `checkpoints/best_model.pt`; here the run keeps
its best validated checkpoint as DUMP/checkpoints/best (checkpoint.save_best on), and eval.py
resolves `checkpoints/best_model.pt` to it (the newest run under ./dump when ./checkpoints is
not a checkpoints folder of ours).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Optional

from lingua.args import ConfigError

CONFIGS = Path(__file__).resolve().parent / "configs"

# The seed trainer's `train.*` keys -> ours.
SEED_TRAIN_KEYS = {
    "batch_size": "data.batch_size",
    "learning_rate": "optim.lr",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "warmup_steps": "optim.warmup",
    "max_grad_norm": "optim.clip",
    "grad_clip": "optim.clip",
    "max_steps": "steps",
    "num_steps": "steps",
    "steps": "steps",
    "gradient_accumulation_steps": "grad_acc_steps",
    "seq_len": "data.seq_len",
    "max_seq_len": "data.seq_len",
    "seed": "seed",
    "save_every": "checkpoint.dump.every",
    "eval_every": "checkpoint.eval.every",
    "log_every": "logging.freq",
    "output_dir": "dump_dir",
    "data_dir": "data.root_dir",
}

# eval.py's flags -> apps.main.eval keys (--checkpoint is resolved separately).
SEED_EVAL_FLAGS = {
    "test_data": "pairs.path",
    "max_samples": "pairs.max_pairs",
    "max_new_tokens": "pairs.max_gen_len",
    "output_dir": "dump_dir",
}


def config_group(name: str) -> str:
    """`model=NAME` -> the config file: a YAML path as given, else apps/main/configs/NAME.yaml."""
    if name.endswith((".yaml", ".yml")):
        return name
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean model={close[0]}?" if close else ""
        raise ConfigError(f"model={name}: no config apps/main/configs/{name}.yaml{hint} (known: {', '.join(known)})")
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def map_train_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The seed train.py's arguments -> (apps.main.train arguments, the mapping's lines)."""
    out, lines = ["checkpoint.save_best=true"], ["checkpoint.save_best=true (the seed kept best_model.pt)"]
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"'{arg}' is not of the form key=value (e.g. model=llama_hybrid train.batch_size=4)")
        if key == "model":
            mapped = f"config={config_group(value)}"
        elif key.startswith("train."):
            name = key[len("train."):]
            if name not in SEED_TRAIN_KEYS:
                close = difflib.get_close_matches(name, list(SEED_TRAIN_KEYS), n=1)
                hint = f"; did you mean train.{close[0]}?" if close else ""
                raise ConfigError(f"unknown seed key {key}{hint} (known: train.{', train.'.join(SEED_TRAIN_KEYS)}; "
                                  "or give one of our keys, e.g. optim.lr=...)")
            mapped = f"{SEED_TRAIN_KEYS[name]}={value}"
        else:
            out.append(arg)
            continue
        out.append(mapped)
        lines.append(f"{arg} -> {mapped}")
    return out, lines


def map_eval_argv(argv: list[str], cwd: Optional[Path] = None) -> tuple[list[str], list[str]]:
    """The seed eval.py's `--flag value` arguments -> (apps.main.eval arguments, mapping lines).
    Every flag is checked before the checkpoint is looked for."""
    ours, flags, i = [], [], 0
    known = ["checkpoint", *SEED_EVAL_FLAGS]
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            ours.append(arg)  # one of our key=value settings
            continue
        name, eq, value = arg[2:].partition("=")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"unknown flag --{name}{hint} (known: --{', --'.join(known)}; or our key=value)")
        if not eq:
            if i >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value, i = argv[i], i + 1
        flags.append((name, value))
    if "checkpoint" not in dict(flags) and not any(a.startswith("ckpt_dir=") for a in ours):
        raise ConfigError("--checkpoint is required (e.g. --checkpoint checkpoints/best_model.pt or a dump dir)")
    out, lines = [], []
    for name, value in flags:
        if name == "checkpoint":
            ckpt, why = resolve_seed_checkpoint(value, cwd or Path.cwd())
            mapped = f"ckpt_dir={ckpt}"
            lines.append(f"--checkpoint {value} -> {mapped} ({why})")
        else:
            mapped = f"{SEED_EVAL_FLAGS[name]}={value}"
            lines.append(f"--{name} {value} -> {mapped}")
        out.append(mapped)
    return out + ours, lines


def resolve_seed_checkpoint(value: str, cwd: Path) -> tuple[str, str]:
    """The checkpoint dir a seed `--checkpoint` names, and why. `X/best_model.pt` (or X/best)
    means the best checkpoint of the checkpoints folder X; where X is none of ours, the newest
    run under ./dump that has one. A dump dir or checkpoint dir of ours is taken as it is."""
    given = cwd / value if not os.path.isabs(value) else Path(value)
    if given.is_dir():
        return value, "a directory of ours"
    if given.is_file():
        raise ConfigError(f"--checkpoint {value} is a file; this trainer saves checkpoint directories "
                          "(DUMP/checkpoints/best, DUMP/checkpoints/<step>): name one, or the run's dump dir")
    stem = given.name.removesuffix(".pt").removesuffix(".pth")
    if stem not in ("best_model", "best", "last_model", "last", "final_model", "latest"):
        raise ConfigError(f"--checkpoint {value}: no such file or directory")
    want_best = stem in ("best_model", "best")
    folder = given.parent
    candidates = [folder] if (folder / "best").is_dir() or _step_dirs(folder) else \
        sorted((p for p in (cwd / "dump").glob("*/checkpoints") if p.is_dir()),
               key=lambda p: p.stat().st_mtime, reverse=True)
    for checkpoints in candidates:
        best, steps = checkpoints / "best", _step_dirs(checkpoints)
        where = "the newest run under ./dump" if checkpoints != folder else "this checkpoints folder"
        if want_best and (best / "params.json").exists():
            return _shown(best, cwd), f"its best checkpoint, {where}"
        if steps:
            note = "no best checkpoint (validation never ran), so its newest step" if want_best else "its newest step"
            return _shown(steps[-1], cwd), f"{note}, {where}"
    raise ConfigError(f"--checkpoint {value}: no checkpoint found in {folder} nor under {cwd / 'dump'} "
                      "(train first: python train.py model=llama_hybrid)")


def _step_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9]" * 10) if (p / "params.json").exists()) if folder.is_dir() else []


def _shown(path: Path, cwd: Path) -> str:
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def print_once(lines: list[str], what: str) -> None:
    """The mapping, on rank 0 only (torchrun starts one process per rank)."""
    if lines and os.environ.get("RANK", "0") == "0":
        print(f"{what}: the seed's arguments as ours:\n  " + "\n  ".join(lines), flush=True)


def run_entry(what: str, map_argv, main, argv: list[str]) -> None:
    """An entry point at a seed path: map its arguments (a bad one: one line, exit 2), print the
    mapping once, run our `main` on the result."""
    try:
        ours, lines = map_argv(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_once(lines, what)
    main(ours)
