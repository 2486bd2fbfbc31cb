"""Checkpoints: DCP shards in `checkpoints/{step:010d}/` with params.json and one
train_state_{dp_rank:05d}.json per data-parallel rank.

A save is written into `.tmp_{step}` and renamed when complete, so a crash mid-save leaves
the previous checkpoint as the newest one (on an fsspec URL, which has no atomic rename, it is
written in place and counts once its `.committed` marker exists, written last); a save that fills the disk is removed and raises
DiskFull naming the path and the bytes it needs. Keep-N applies to dump and eval saves
separately, `total_limit` caps the step checkpoints in all, and `checkpoints/best` (save_best)
is a full copy of the best validated checkpoint, outside both.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lingua.args import choice
from lingua.storage import (
    StoragePath, copy_dir, dcp_reader, dcp_writer, free_bytes, is_remote, move_dir, resolve, rmtree, tree_bytes,
    write_json,
)

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^\d{10}$")
TMP_PREFIX = ".tmp_"
BEST = "best"
BEST_OLD = ".best_old"  # the previous best while the new one is renamed in
BEST_INFO = "best.json"  # written last into a best copy: a best without it is incomplete
COMMITTED = ".committed"  # a remote step checkpoint is complete once this exists
CONSOLIDATED_NAME = "consolidated.pth"  # consolidate_checkpoint's file, in <ckpt>/consolidated/
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SaveEvery:
    every: int = 1000
    keep: int = 0  # <= 0 keeps all


@dataclass
class CheckpointArgs:
    dump: SaveEvery = field(default_factory=SaveEvery)
    eval: SaveEvery = field(default_factory=SaveEvery)
    path: Optional[str] = None
    init_ckpt_path: Optional[str] = None
    continue_training_from_init: bool = False
    # Not in Meta Lingua:
    save_best: bool = False  # keep the checkpoint of the best validation metric as checkpoints/best
    total_limit: int = 0  # at most this many step checkpoints in all (besides best); <= 0: no limit
    save_precision: str = choice("fp32", tuple(SAVE_DTYPES))  # of consolidated / exported weights


class DiskFull(OSError):
    """A save ran out of space; the partial save is gone and earlier checkpoints are intact."""


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _gather(obj: Any) -> list:
    """Every rank's `obj` (all_gather_object), or [obj] on one process."""
    if not _is_dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _describe(error: BaseException) -> str:
    """The error and its causes as text: DCP wraps each rank's failure (CheckpointException)."""
    parts, seen = [], error
    while seen is not None and len(parts) < 8:
        # CheckpointException's text holds each rank's traceback: its last line is the error.
        lines = [line for line in str(seen).splitlines() if line.strip()]
        parts.append(f"{type(seen).__name__}: {lines[-1].strip() if lines else ''}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


def _is_disk_full(message: str) -> bool:
    return any(s in message for s in ("No space left on device", "Disk quota exceeded", "[Errno 28]"))


def _state_bytes(state: dict) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: its share of a save."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _state_bytes(value)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return total


def _human(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def is_complete(ckpt: StoragePath) -> bool:
    """A step checkpoint's directory holds a whole save: locally it was renamed into place
    complete; remotely it carries the commit marker."""
    return not is_remote(ckpt) or (ckpt / COMMITTED).exists()


def list_checkpoints(path: str | os.PathLike | StoragePath) -> list[StoragePath]:
    """Complete checkpoints under `path` (a path or fsspec URL), oldest first."""
    path = resolve(path)
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if STEP_DIR.match(p.name) and p.is_dir() and is_complete(p))


def train_state_file(ckpt: StoragePath, dp_rank: int) -> StoragePath:
    return ckpt / f"train_state_{dp_rank:05d}.json"


class CheckpointManager:
    def __init__(self, args: CheckpointArgs, dump_dir: str | os.PathLike, eval_enabled: bool = True):
        self.args = args
        self.path = resolve(args.path) if args.path else resolve(dump_dir) / "checkpoints"
        # Without an eval the eval cadence saves nothing, so it must keep nothing either (its
        # defaults, every 1000 and keep all, would otherwise pin every 1000th dump).
        self.cadences = [args.dump, args.eval] if eval_enabled else [args.dump]

    def existing(self) -> list[StoragePath]:
        return list_checkpoints(self.path)

    def latest(self) -> Optional[StoragePath]:
        found = self.existing()
        return found[-1] if found else None

    def remove_stale_tmp(self) -> None:
        """Half-written saves of an earlier crash: ours by name, never user files (remotely also
        step directories without their commit marker). A crash while save_best swapped copies
        left the previous best as BEST_OLD: it is restored unless the new best is complete."""
        if _rank() == 0 and self.path.is_dir():
            for p in self.path.iterdir():
                stale = p.name.startswith(TMP_PREFIX) or (STEP_DIR.match(p.name) and not is_complete(p))
                if stale and p.is_dir():
                    logger.warning("removing incomplete checkpoint %s left by an interrupted save", p)
                    rmtree(p)
            old, best = self.path / BEST_OLD, self.path / BEST
            if old.is_dir():
                if (best / BEST_INFO).exists() or not (old / BEST_INFO).exists():
                    rmtree(old, BEST_INFO)
                else:
                    if best.exists():
                        rmtree(best, BEST_INFO)
                    move_dir(old, best, BEST_INFO)
        _barrier()

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: dict,
        params: dict,
        step: int,
        dp_rank: int = 0,
        write_train_state: bool = True,
    ) -> StoragePath:
        """Collective: every rank calls it. `write_train_state` is False on ranks whose data-
        parallel replica already writes the same train state (tensor-parallel peers).
        Raises DiskFull (on every rank) when any rank's writes run out of space."""
        final = self.path / f"{step:010d}"
        if final.exists() and is_complete(final):
            logger.info("checkpoint %s already exists; not saving again", final)
            return final
        # Remotely a directory rename is a copy: write in place, commit with the marker.
        tmp = final if is_remote(self.path) else self.path / f"{TMP_PREFIX}{step:010d}"
        if _rank() == 0:
            if tmp.exists():
                rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        error = None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, checkpoint_id=str(tmp), storage_writer=dcp_writer(tmp))
            if write_train_state:
                write_json(train_state_file(tmp, dp_rank), train_state)
            if _rank() == 0:
                write_json(tmp / "params.json", params)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must learn of any failure
            error = e  # (DCP's CheckpointException is a BaseException)
        # One exchange instead of the barrier: a rank whose own write failed must not leave the
        # others waiting at a barrier it never reaches. Free space is read before the partial
        # save is removed: torch's writer often reports a full disk as a bare "unexpected pos".
        free = free_bytes(self.path) if error is not None else None
        failures = _gather((None if error is None else _describe(error), _state_bytes(state), free))
        if any(f[0] for f in failures):
            if _rank() == 0:
                rmtree(tmp)
            _barrier()
            needed = tree_bytes(self.latest()) or sum(f[1] for f in failures)
            messages = [f[0] for f in failures if f[0]]
            if any(_is_disk_full(m) for m in messages) or any(f[2] is not None and f[2] < needed for f in failures):
                raise DiskFull(errno.ENOSPC, f"disk full (no space left on device) while saving checkpoint {final}: "
                               f"it needs about {_human(needed)}, the filesystem of {self.path} had "
                               f"{_human(min(f[2] for f in failures if f[2] is not None))} left; the partial save was "
                               f"removed, the checkpoints before it are intact (newest: {self.latest() or 'none'}). "
                               "Free space, or lower checkpoint.dump.keep / checkpoint.total_limit (a save needs room "
                               f"for one more checkpoint before the oldest is removed). The error: {messages[0]}") from None
            if error is not None:
                raise error
            raise RuntimeError(f"saving checkpoint {final} failed on another rank: {messages[0]}")
        if _rank() == 0:
            if is_remote(final):
                (final / COMMITTED).write_text("")
            else:
                os.replace(tmp, final)
            self.clean_up()
        _barrier()
        logger.info("saved checkpoint %s", final)
        return final

    def save_best(self, step_ckpt: StoragePath, info: dict) -> StoragePath:
        """Collective. `checkpoints/best` becomes a full copy of the step checkpoint `step_ckpt`
        plus best.json (`info`), replaced whole: the new copy is complete before the two moves.
        Locally the copy is of hard links where the filesystem has them: DCP and write_json
        never rewrite a file in place, so sharing files with the step checkpoint is safe, and
        free. Remotely the moves are copies that write best.json last and delete it first."""
        best = self.path / BEST
        if _rank() == 0:
            tmp, old = self.path / f"{TMP_PREFIX}{BEST}", self.path / BEST_OLD
            if tmp.exists():
                rmtree(tmp)
            copy_dir(step_ckpt, tmp)
            write_json(tmp / BEST_INFO, info)
            if best.exists():
                move_dir(best, old, BEST_INFO)
            move_dir(tmp, best, BEST_INFO)
            if old.exists():
                rmtree(old, BEST_INFO)
        _barrier()
        logger.info("best checkpoint: %s (step %s, %s %.4f)", best, info.get("step"), info.get("metric"),
                    info.get("value", float("nan")))
        return best

    def reconcile_best(self, best_step: Optional[int], info: dict) -> None:
        """Collective. Make `checkpoints/best` the checkpoint of `best_step`, the resumed run's
        best (its cadence state). A crash between a step's save (which already records the new
        best) and save_best left best at the old one; later evaluations that did not beat the
        recorded best never copied it. Nothing to do when best already holds that step."""
        if best_step is None:
            return
        held = self.path / BEST / BEST_INFO
        if held.exists() and json.loads(held.read_text()).get("step") == best_step:
            return
        step_ckpt = next((c for c in self.existing() if c.name == f"{best_step:010d}"), None)
        if step_ckpt is None:
            logger.warning("checkpoints/best does not hold the run's best step %d, and that step's checkpoint is "
                           "gone (keep / total_limit): best stays as it is until a better evaluation", best_step)
            return
        logger.warning("checkpoints/best did not hold the run's best step %d (an interrupted save_best): "
                       "copying it now", best_step)
        self.save_best(step_ckpt, {**info, "step": best_step, "checkpoint": step_ckpt.name})

    def clean_up(self) -> None:
        """Keep the newest `keep` of each cadence in use (dump; eval when an eval is configured)
        and always the newest save; then at most `total_limit` of those, the newest. Nothing is
        removed while every cadence keeps all and there is no limit. `best` is not a step
        checkpoint: neither rule touches it."""
        found = self.existing()
        limit = self.args.total_limit
        if not found or (all(c.keep <= 0 for c in self.cadences) and limit <= 0):
            return
        keep = {found[-1]}
        for cadence in self.cadences:
            matching = [p for p in found if cadence.every > 0 and int(p.name) % cadence.every == 0]
            keep.update(matching[-cadence.keep :] if cadence.keep > 0 else matching)
        if limit > 0:
            keep = set(sorted(keep)[-limit:])
        for p in found:
            if p not in keep:
                rmtree(p, COMMITTED if is_remote(p) else None)

    def load(
        self, ckpt: StoragePath, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], dp_rank: int = 0
    ) -> Optional[dict]:
        """Load model (and optimizer) state; returns this rank's train state if present."""
        load_model_and_optim(ckpt, model, optimizer)
        ts = train_state_file(ckpt, dp_rank)
        if not ts.exists():
            return None
        return json.loads(ts.read_text())


def load_model_and_optim(ckpt: str | os.PathLike | StoragePath, model: torch.nn.Module, optimizer=None) -> None:
    ckpt = resolve(ckpt)
    if not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"'{ckpt}' is not a DCP checkpoint (no .metadata file)")
    state: dict = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt), storage_reader=dcp_reader(ckpt))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def load_model_weights(path: str | os.PathLike | StoragePath, model: torch.nn.Module,
                       key_map: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Model weights only, from a DCP checkpoint dir or a consolidated .pth file (paths or URLs).
    `key_map`: the checkpoint's name for each of the model's keys (None: a key the checkpoint
    does not hold, left as it is), e.g. a model whose layers an adapter wrapped since."""
    path = resolve(path)
    if key_map is None:
        if path.is_file():
            with path.open("rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
            state = state.get("model", state)
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
            return
        load_model_and_optim(path, model, None)
        return
    ours = get_model_state_dict(model)
    names = {key_map(k): k for k in ours if key_map(k) is not None}
    theirs = {name: ours[k] for name, k in names.items()}
    if path.is_file():
        with path.open("rb") as f:
            saved = torch.load(f, map_location="cpu", weights_only=True)
        saved = saved.get("model", saved)
        missing = sorted(set(theirs) - set(saved))
        if missing:
            raise KeyError(f"'{path}' lacks {missing[:5]}")
        theirs = {name: saved[name] for name in theirs}
    else:
        if not (path / ".metadata").exists():
            raise FileNotFoundError(f"'{path}' is not a DCP checkpoint (no .metadata file)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": theirs}, checkpoint_id=str(path), storage_reader=dcp_reader(path))
    set_model_state_dict(model, {names[name]: value for name, value in theirs.items()},
                         options=StateDictOptions(strict=False, full_state_dict=path.is_file()))


def save_model_checkpoint(model: torch.nn.Module, ckpt: str | os.PathLike, params: dict) -> Path:
    """A weights-only DCP checkpoint (no optimizer, no train state) with its params.json, which
    apps.main.eval loads and `checkpoint.init_ckpt_path` starts a run from; one process. Refuses
    a directory that exists (nothing is overwritten); written into a tmp dir and renamed."""
    final = Path(ckpt)
    if final.exists():
        raise FileExistsError(f"'{final}' exists: not overwriting it")
    tmp = final.with_name(TMP_PREFIX + final.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
    write_json(resolve(tmp) / "params.json", params)
    os.replace(tmp, final)
    return final


def consolidate_checkpoint(ckpt: str | os.PathLike, out_file: Optional[str | os.PathLike] = None,
                           precision: str = "fp32") -> Path:
    """Merge the DCP shards of a checkpoint into one torch.save file (model + optimizer), the
    model's floating-point weights in `precision` (checkpoint.save_precision: fp32 | bf16 |
    fp16; the optimizer's moments stay as trained, for a resume)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if precision not in SAVE_DTYPES:
        raise ValueError(f"checkpoint.save_precision must be one of {list(SAVE_DTYPES)}, got {precision!r}")

    if is_remote(resolve(ckpt)):  # torch's converter reads through its local-filesystem reader only
        raise ValueError(f"consolidating '{ckpt}' needs a local copy of it (e.g. `fsspec` / `aws s3 cp --recursive`)")
    ckpt = Path(resolve(ckpt))
    if not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"'{ckpt}' is not a DCP checkpoint (no .metadata file)")
    out = Path(out_file) if out_file else ckpt / "consolidated" / CONSOLIDATED_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    dcp_to_torch_save(str(ckpt), str(tmp))
    if precision != "fp32":
        dtype = SAVE_DTYPES[precision]
        state = torch.load(tmp, map_location="cpu", weights_only=True)
        state["model"] = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in state["model"].items()}
        torch.save(state, tmp)
    os.replace(tmp, out)
    if (ckpt / "params.json").exists() and out.parent != ckpt:
        shutil.copy(ckpt / "params.json", out.parent / "params.json")
    return out
