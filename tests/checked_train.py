"""apps.main.train under the device checks of tests/device_checks.py, for tests that run it
under torchrun: each rank writes the collectives it issued to OUT.rank{R}.json, and to
OUT.rank{R}.summary.json the most functional collectives it had in flight at once, dynamo's
graph breaks (reason -> count), the graphs it compiled and the collective works left unwaited
after training.

    torchrun --nproc-per-node 2 tests/checked_train.py OUT key=value ...
    torchrun --nproc-per-node 2 tests/checked_train.py --no-modes OUT key=value ...

--no-modes trains without the dispatch modes (no collective log, in-flight peak -1): dynamo
does not compile under an active mode, so compile checks need it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from apps.main.train import TrainArgs, train  # noqa: E402
from lingua.args import load_config  # noqa: E402
from lingua.distributed import shutdown_distributed  # noqa: E402
from tests.device_checks import CollectiveLog, DevicelessFactories, InFlightCollectives  # noqa: E402


def run(out: str, argv: list[str], modes: bool = True) -> None:
    from torch._dynamo.utils import counters

    args = load_config(TrainArgs, argv)
    log, flight = None, None
    with contextlib.ExitStack() as stack:
        if modes:
            made = stack.enter_context(DevicelessFactories())
            log = stack.enter_context(CollectiveLog(made))
            flight = stack.enter_context(InFlightCollectives())
        train(args)
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(f"{out}.rank{rank}.json").write_text(json.dumps([asdict(c) for c in log.calls] if log else []))
    summary = {"peak_in_flight": flight.peak if flight else -1, "graph_breaks": dict(counters["graph_break"]),
               "compiled_graphs": counters["stats"]["unique_graphs"],
               "unwaited_works": torch._C._distributed_c10d._get_work_registry_size()}
    Path(f"{out}.rank{rank}.summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    no_modes = sys.argv[1] == "--no-modes"
    rest = sys.argv[2:] if no_modes else sys.argv[1:]
    run(rest[0], rest[1:], modes=not no_modes)
    shutdown_distributed()
