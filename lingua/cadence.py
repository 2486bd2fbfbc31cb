"""When the training loop logs, saves, validates and stops: every cadence decision in one
place, so the loop reads as the steps of a training step and a new concern touches only this.

    cadence = Cadence(CadenceArgs.from_train_args(args), state.cadence)
    due = cadence.at(step, preempted)        # Due(log, dump, eval, ...)
    new_best = cadence.validated(step, results)  # after an in-loop validation
    cadence.stop_reason()                    # early stopping: why the run ends, or None

Early stopping follows the Hugging Face / Keras rule: an evaluation *improves* when the metric
drops below the best so far by more than `threshold`; after `patience` evaluations in a row
without improvement the run stops. The best value itself is the plain minimum (it is what
checkpoints/best holds). Its counters live in the train state, so a resumed run keeps counting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

VALIDATION_KEYS = ("loss", "bpb")


@dataclass
class EarlyStoppingArgs:
    patience: int = 0  # evaluations without improvement before the run stops; 0: never stops early
    threshold: float = 0.0  # an evaluation improves when the metric drops by more than this
    # "<source>/loss" or "<source>/bpb" for one validation source; "loss" / "bpb": their mean
    metric: str = "loss"


def check_metric(metric: str, sources: list[str], key: str = "early_stopping.metric") -> None:
    """Raise ValueError naming `key` unless `metric` names a validation figure of `sources`."""
    source, _, name = metric.rpartition("/")
    if name not in VALIDATION_KEYS:
        raise ValueError(f"config key '{key}' must end in one of {list(VALIDATION_KEYS)} "
                         f"(e.g. 'loss' or '<source>/loss'), got {metric!r}")
    if source and source not in sources:
        raise ValueError(f"config key '{key}' names source '{source}', which is not validated; "
                         f"sources: {', '.join(sorted(sources))}")


def metric_value(metric: str, results: dict[str, dict[str, float]]) -> float:
    """The metric of one validation's results ({source: {loss, bpb, ...}})."""
    source, _, name = metric.rpartition("/")
    if source:
        return float(results[source][name])
    values = [float(r[name]) for r in results.values()]
    return sum(values) / len(values)


@dataclass
class CadenceArgs:
    steps: int
    log_every: int
    dump_every: int
    eval_every: Optional[int]  # None: no in-loop or async validation
    early_stopping: EarlyStoppingArgs

    @classmethod
    def from_train_args(cls, args, validates: bool) -> "CadenceArgs":
        return cls(steps=args.steps, log_every=args.logging.freq, dump_every=args.checkpoint.dump.every,
                   eval_every=args.checkpoint.eval.every if validates else None,
                   early_stopping=args.early_stopping)


@dataclass
class Due:
    """What the loop does after a step."""

    log: bool = False
    dump: bool = False  # a save on the dump cadence (or the last step, or a preemption)
    eval: bool = False  # a validation (its checkpoint is saved too)
    preempted: bool = False

    @property
    def save(self) -> bool:
        return self.dump or self.eval


class Cadence:
    def __init__(self, args: CadenceArgs, state: Optional[dict] = None):
        self.args = args
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_without_improvement = 0
        if state:
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.evals_without_improvement = int(state.get("evals_without_improvement", 0))

    def at(self, step: int, preempted: bool = False) -> Due:
        a = self.args
        return Due(
            log=step % a.log_every == 0 or step in (1, a.steps),
            dump=step % a.dump_every == 0 or step == a.steps or preempted,
            # A preempted run saves and leaves: its validation waits for the requeued job.
            eval=a.eval_every is not None and step % a.eval_every == 0 and not preempted,
            preempted=preempted,
        )

    def validated(self, step: int, results: dict[str, dict[str, float]]) -> bool:
        """Record a validation; True when it is the best so far (the plain minimum)."""
        value = metric_value(self.args.early_stopping.metric, results)
        threshold = self.args.early_stopping.threshold
        improved = self.best is None or value < self.best - threshold
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        if self.best is None or value < self.best:
            self.best, self.best_step = value, step
            return True
        return False

    def stop_reason(self) -> Optional[str]:
        """Why early stopping ends the run now, or None."""
        es = self.args.early_stopping
        if es.patience <= 0 or self.evals_without_improvement < es.patience:
            return None
        return (f"early stopping: validation {es.metric} has not improved by more than {es.threshold:g} for "
                f"{self.evals_without_improvement} evaluation(s) (patience {es.patience}); best {self.best:.4f} "
                f"at step {self.best_step}")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}
