"""PNG figures of the metrics of one or several training runs, overlaid for comparison.

    python -m apps.plots DUMP_DIR [DUMP_DIR ...] [--out DIR]

Reads each dump dir's metrics.jsonl (required), metrics.validation.jsonl and metrics.eval.jsonl
(both optional) and writes one PNG per figure group into --out (default: <first dump dir>/plots):

    loss.png        loss/* (loss/out and auxiliary losses): raw (faint) and EMA-smoothed
    validation.png  val/<source>/<metric> (loss, bpb, ...; the token/byte/doc counts left out)
    lr.png          optim/lr and optim/lr_group/<group>
    grad_norm.png   optim/grad_norm
    speed.png       speed/* (wps = tokens/s, MFU, iteration and data-loading times)
    memory.png      memory/<layer>/<stat> (product-key memory usage)
    gpu_memory.png  gpu_memory/* (peak allocated / reserved GiB, allocator retries)
    mhc.png         mhc/* (Amax gains of the hyper-connections)
    eval.png        every numeric leaf of metrics.eval.jsonl (stderr values left out)

One panel per metric key (its title), one line per run, labelled with the run's `name` from the
dump dir's config.yaml (the directory name without one); x is global_step. A figure is written
only when some run has data for it, and nothing but these PNGs is written. Every dump dir and
metrics file is read and checked before the first PNG: a missing dump dir or metrics.jsonl, or a
malformed line (named as file:line), stops with nothing written. Dump dirs and --out may be
fsspec URLs, as a training run's dump_dir may.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless; no pyplot, no global figure state
from matplotlib.figure import Figure

from lingua.storage import StoragePath, resolve, write_bytes_atomic

TRAIN, VALIDATION, EVAL = "metrics.jsonl", "metrics.validation.jsonl", "metrics.eval.jsonl"
EMA_SPAN = 0.05  # loss smoothing: an EMA whose time constant is this fraction of a run's points
NOT_PLOTTED = ("global_step", "created_at")
VALIDATION_COUNTS = ("tokens", "bytes", "docs")  # sizes of the validation set, not measurements


@dataclass(frozen=True)
class FigureGroup:
    """One PNG: the keys of metrics file `source` that start with one of `prefixes`."""

    file_name: str
    source: str
    prefixes: tuple[str, ...]
    description: str
    smoothed: bool = False

    def selects(self, key: str) -> bool:
        if self.source == VALIDATION and key.rsplit("/", 1)[-1] in VALIDATION_COUNTS:
            return False
        if self.source == EVAL and "stderr" in key:
            return False
        return key.startswith(self.prefixes)


FIGURE_GROUPS = (
    FigureGroup("loss.png", TRAIN, ("loss/",),
                f"training loss (faint: raw, solid: EMA over {EMA_SPAN:.0%} of the points)", smoothed=True),
    FigureGroup("validation.png", VALIDATION, ("val/",), "validation"),
    FigureGroup("lr.png", TRAIN, ("optim/lr",), "learning rate per parameter group"),
    FigureGroup("grad_norm.png", TRAIN, ("optim/grad_norm",), "gradient norm (before clipping)"),
    FigureGroup("speed.png", TRAIN, ("speed/",), "speed: tokens/s (wps), MFU, times (s)"),
    FigureGroup("memory.png", TRAIN, ("memory/",), "memory layer usage"),
    FigureGroup("gpu_memory.png", TRAIN, ("gpu_memory/",), "GPU memory"),
    FigureGroup("mhc.png", TRAIN, ("mhc/",), "mHC Amax gains (healthy < 2)"),
    FigureGroup("eval.png", EVAL, ("",), "evaluation"),
)

Series = dict[str, dict[int, float]]  # metric key -> {global_step: value}
Panels = dict[str, dict[str, dict[int, float]]]  # panel title (a metric key) -> {run label: {global_step: value}}


class MalformedMetrics(ValueError):
    """A metrics file line that is not a JSON object; the message names file:line."""


@dataclass(frozen=True)
class Run:
    label: str
    metrics: dict[str, Series]  # metrics file name -> its series


def numeric_leaves(row: dict, prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts with "/" (as lingua.metrics does) and keep the numbers (no bools)."""
    out = {}
    for key, value in row.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(numeric_leaves(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def read_series(path: StoragePath) -> Series:
    """{key: {step: value}} of a JSON-lines metrics file. A step logged twice (a resumed run
    repeats the steps after its last checkpoint) keeps its last value; rows without an integer
    global_step are skipped. An unterminated last line is a write in progress: left out, with a
    warning. Any other line that is not a JSON object raises MalformedMetrics."""
    series: Series = {}
    text = path.read_text()
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            if number == len(lines):  # no newline after it: still being written
                print(f"warning: {path}:{number}: incomplete last line left out ({e})", file=sys.stderr)
                break
            raise MalformedMetrics(f"{path}:{number}: malformed metrics line: {e}") from None
        step = row.get("global_step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for key, value in numeric_leaves(row).items():
            if key not in NOT_PLOTTED:
                series.setdefault(key, {})[step] = value
    return series


def run_name(dump_dir: StoragePath) -> str:
    """The `name` in the dump dir's config.yaml (what apps.main.train writes), else the dir name."""
    config = dump_dir / "config.yaml"
    if config.exists():
        try:
            name = (yaml.safe_load(config.read_text()) or {}).get("name")
        except (yaml.YAMLError, ValueError, AttributeError) as e:  # not YAML, not text, not a mapping
            print(f"warning: {config}: no run name read ({e}); using the directory name", file=sys.stderr)
            name = None
        if name:
            return str(name)
    return dump_dir.resolve().name if isinstance(dump_dir, Path) else dump_dir.name  # "." has a name too


def load_runs(dump_dirs: list) -> list[Run]:
    """Every run's metrics, checked before anything is drawn. Runs sharing a name are told
    apart by their directory names."""
    paths = [resolve(d) for d in dump_dirs]
    if not paths:
        raise ValueError("no dump dir given")
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"dump dir {path} does not exist")
        if not (path / TRAIN).is_file():
            raise FileNotFoundError(f"{path / TRAIN} not found: {path} is not a training dump dir")
    names = [run_name(p) for p in paths]
    labels = [f"{n} ({p.name})" if names.count(n) > 1 else n for n, p in zip(names, paths)]
    return [Run(label, {source: read_series(path / source) for source in (TRAIN, VALIDATION, EVAL)
                        if (path / source).is_file()})
            for label, path in zip(labels, paths)]


def group_panels(runs: list[Run], group: FigureGroup) -> Panels:
    """The panels of the keys the group selects, in the order the runs logged them."""
    panels: Panels = {}
    for run in runs:
        for key, points in run.metrics.get(group.source, {}).items():
            if group.selects(key) and points:
                panels.setdefault(key, {})[run.label] = points
    return panels


def ema(values: list[float], span: float = EMA_SPAN) -> list[float]:
    """Exponential moving average with weight 1 - 1/(span * len(values)) (none below 1/span
    points: a short run's few points would only lag); a NaN loss does not poison what follows."""
    weight = max(0.0, 1 - 1 / (span * len(values))) if values else 0.0
    out, average = [], None
    for value in values:
        if math.isfinite(value):
            average = value if average is None else weight * average + (1 - weight) * value
        out.append(average if average is not None else value)
    return out


def draw(group: FigureGroup, panels: Panels, labels: list[str]) -> Figure:
    """A grid of panels, one line per run; each run keeps its colour (its index in `labels`)."""
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5.5 * columns, 3.6 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for index, (title, lines) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(rows, columns, index)
        for label, points in lines.items():
            steps = sorted(points)
            values = [points[s] for s in steps]
            colour = f"C{labels.index(label) % 10}"
            if group.smoothed:
                ax.plot(steps, values, color=colour, alpha=0.3, lw=1)
                values = ema(values)
            ax.plot(steps, values, color=colour, lw=1.5, marker="." if len(steps) < 30 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("global_step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(group.description)
    fig.tight_layout()
    return fig


def plot_runs(dump_dirs: list, out_dir) -> dict[str, list[str]]:
    """Write the figures of the runs in `dump_dirs` into `out_dir`; returns {PNG name: [panel titles]}."""
    runs = load_runs(dump_dirs)
    out = resolve(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    figures = {g.file_name: (g, p) for g in FIGURE_GROUPS if (p := group_panels(runs, g))}
    if figures:
        out.mkdir(parents=True, exist_ok=True)
    labels = [run.label for run in runs]
    for file_name, (group, panels) in figures.items():
        png = io.BytesIO()
        draw(group, panels, labels).savefig(png, format="png")
        write_bytes_atomic(out / file_name, png.getvalue())
    return {file_name: list(panels) for file_name, (_, panels) in figures.items()}


def main(argv: Optional[list[str]] = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m apps.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("dump_dirs", nargs="+", metavar="DUMP_DIR", help="training dump dirs, overlaid")
    parser.add_argument("--out", help="where the PNGs go (default: <first DUMP_DIR>/plots)")
    args = parser.parse_args(argv)
    out = args.out or resolve(args.dump_dirs[0]) / "plots"
    try:
        written = plot_runs(args.dump_dirs, out)
    except (FileNotFoundError, FileExistsError, MalformedMetrics) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not written:
        print(f"no metrics to plot in {', '.join(args.dump_dirs)}: nothing written")
    for file_name, titles in written.items():
        print(f"{resolve(out) / file_name}  ({len(titles)} panels)")
    return written

