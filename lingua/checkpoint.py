"""Checkpoints: DCP shards in `checkpoints/{step:010d}/` with params.json and one
train_state_{dp_rank:05d}.json per data-parallel rank.

A save is written into `.tmp_{step}` and renamed when complete, so a crash mid-save leaves
the previous checkpoint as the newest one. Keep-N applies to dump and eval saves separately.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^\d{10}$")
TMP_PREFIX = ".tmp_"


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


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `path`, oldest first."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def train_state_file(ckpt: Path, dp_rank: int) -> Path:
    return ckpt / f"train_state_{dp_rank:05d}.json"


class CheckpointManager:
    def __init__(self, args: CheckpointArgs, dump_dir: str | os.PathLike, eval_enabled: bool = True):
        self.args = args
        self.path = Path(args.path) if args.path else Path(dump_dir) / "checkpoints"
        # Without an eval the eval cadence saves nothing, so it must keep nothing either (its
        # defaults, every 1000 and keep all, would otherwise pin every 1000th dump).
        self.cadences = [args.dump, args.eval] if eval_enabled else [args.dump]

    def existing(self) -> list[Path]:
        return list_checkpoints(self.path)

    def latest(self) -> Optional[Path]:
        found = self.existing()
        return found[-1] if found else None

    def remove_stale_tmp(self) -> None:
        """Half-written saves of an earlier crash: ours by name, never user files."""
        if _rank() == 0 and self.path.is_dir():
            for p in self.path.iterdir():
                if p.name.startswith(TMP_PREFIX) and p.is_dir():
                    logger.warning("removing incomplete checkpoint %s left by an interrupted save", p)
                    shutil.rmtree(p)
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
    ) -> Path:
        """Collective: every rank calls it. `write_train_state` is False on ranks whose data-
        parallel replica already writes the same train state (tensor-parallel peers)."""
        final = self.path / f"{step:010d}"
        if final.exists():
            logger.info("checkpoint %s already exists; not saving again", final)
            return final
        tmp = self.path / f"{TMP_PREFIX}{step:010d}"
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp))
        if write_train_state:
            _write_json(train_state_file(tmp, dp_rank), train_state)
        if _rank() == 0:
            _write_json(tmp / "params.json", params)
        _barrier()
        if _rank() == 0:
            os.replace(tmp, final)
            self.clean_up()
        _barrier()
        logger.info("saved checkpoint %s", final)
        return final

    def clean_up(self) -> None:
        """Keep the newest `keep` of each cadence in use (dump; eval when an eval is configured)
        and always the newest save. Nothing is removed while every cadence keeps all."""
        found = self.existing()
        if not found or all(c.keep <= 0 for c in self.cadences):
            return
        keep = {found[-1]}
        for cadence in self.cadences:
            matching = [p for p in found if cadence.every > 0 and int(p.name) % cadence.every == 0]
            keep.update(matching[-cadence.keep :] if cadence.keep > 0 else matching)
        for p in found:
            if p not in keep:
                shutil.rmtree(p)

    def load(
        self, ckpt: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], dp_rank: int = 0
    ) -> Optional[dict]:
        """Load model (and optimizer) state; returns this rank's train state if present."""
        load_model_and_optim(ckpt, model, optimizer)
        ts = train_state_file(ckpt, dp_rank)
        if not ts.exists():
            return None
        return json.loads(ts.read_text())


def load_model_and_optim(ckpt: str | os.PathLike, model: torch.nn.Module, optimizer=None) -> None:
    ckpt = Path(ckpt)
    if not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"'{ckpt}' is not a DCP checkpoint (no .metadata file)")
    state: dict = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Model weights only, from a DCP checkpoint dir or a consolidated .pth file."""
    path = Path(path)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    load_model_and_optim(path, model, None)


def consolidate_checkpoint(ckpt: str | os.PathLike, out_file: Optional[str | os.PathLike] = None) -> Path:
    """Merge the DCP shards of a checkpoint into one torch.save file (model + optimizer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = Path(ckpt)
    if not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"'{ckpt}' is not a DCP checkpoint (no .metadata file)")
    out = Path(out_file) if out_file else ckpt / "consolidated" / "consolidated.pth"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    dcp_to_torch_save(str(ckpt), str(tmp))
    os.replace(tmp, out)
    if (ckpt / "params.json").exists() and out.parent != ckpt:
        shutil.copy(ckpt / "params.json", out.parent / "params.json")
    return out
