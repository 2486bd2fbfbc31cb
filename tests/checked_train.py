"""apps.main.train under the device checks of tests/device_checks.py, for tests that run it
under torchrun: each rank writes the collectives it issued to OUT.rank{R}.json and the most
functional collectives it had in flight at once to OUT.rank{R}.in_flight.

    torchrun --nproc-per-node 2 tests/checked_train.py OUT key=value ...
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from apps.main.train import TrainArgs, train  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.distributed import shutdown_distributed  # noqa: E402
from tests.device_checks import CollectiveLog, DevicelessFactories, InFlightCollectives  # noqa: E402


def run(out: str, argv: list[str]) -> None:
    args = load_config(TrainArgs, argv)
    with DevicelessFactories() as made, CollectiveLog(made) as log, InFlightCollectives() as flight:
        train(args)
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(f"{out}.rank{rank}.json").write_text(json.dumps([asdict(c) for c in log.calls]))
    Path(f"{out}.rank{rank}.in_flight").write_text(str(flight.peak))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
    shutdown_distributed()
