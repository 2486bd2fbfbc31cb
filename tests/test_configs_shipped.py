"""Every config shipped in apps/main/configs loads strictly into its args class (EvalArgs for
eval.yaml, TrainArgs for the rest, whose `eval` section loads into EvalArgs too), passes the
trainer's pre-flight checks on the world it is written for, builds its model on the meta
device, and says in its header how to run it."""

from __future__ import annotations

import pytest
import torch

from apps.main.eval import EvalArgs
from apps.main.train import TrainArgs, validate_args
from apps.main.transformer import LMTransformer
from lingua.args import load_config
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "apps/main/configs").glob("*.yaml"))
EVAL_CONFIGS = {"eval.yaml"}


def test_the_memory_layers_readme_configs_are_shipped():
    # Its commands name these files (facebookresearch/memory README).
    assert {"pkplus_373m_1024k.yaml", "pk_7b.yaml", "eval.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_strictly_and_says_how_to_run_it(path, monkeypatch):
    header = path.read_text().split("\n\n")[0].splitlines()
    assert header[0].startswith("#") and any(
        line.startswith("#") and f"config=apps/main/configs/{path.name}" in line for line in header), path.name
    if path.name in EVAL_CONFIGS:
        load_config(EvalArgs, [f"config={path}"])
        return
    args = load_config(TrainArgs, [f"config={path}"])
    # GPU configs fill dp_shard from the world (-1): check them on one node of 8 (RANK and
    # WORLD_SIZE are what torchrun sets); CPU configs on one process.
    world = 8 if args.distributed.dp_shard == -1 else 1
    if world > 1:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    eval_args, info, _ = validate_args(args)  # its `eval` section too, strictly, into EvalArgs
    assert info.world_size == world and (eval_args is None) == (args.eval is None)
    args.model.vocab_size = 32000  # set from the tokenizer at run time
    if args.model.bos_id < 0:
        args.model.bos_id = 1  # so is the BOS that segment models find documents by
    with torch.device("meta"):
        LMTransformer(args.model)  # layer ids, head and memory shapes are consistent
