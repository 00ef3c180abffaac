"""Resume a run from its last checkpoint (fedtune.server.checkpoint).

Flower's ``Strategy.start`` always counts rounds from 1. ``Offset`` goes around the whole
strategy chain (outside ``Metered``) and adds the rounds already done to every round number,
so everything seeded per round (node sampling in ``Metered``, the clients' local seeds from
``server-round``, FedAdam's bias correction) sees the same numbers as in an uninterrupted
run. ``metrics.jsonl`` is cut back to the checkpointed round first, so a row written after
the last checkpoint (the crash came between the two) is measured again, not duplicated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.artifacts import METRICS, atomic_write
from fedtune.errors import FedtuneError
from fedtune.server import checkpoint

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class ResumeError(FedtuneError):
    """A run directory that cannot be resumed."""


class Offset(Strategy):
    """``inner`` with every round number shifted by ``done`` (the rounds already run)."""

    def __init__(self, inner: Strategy, done: int) -> None:
        self.inner, self.done = inner, done

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.done, replies)

    def evaluate_fn(self, fn: EvaluateFn) -> EvaluateFn:
        """``fn`` on true round numbers; Flower's round-0 call (the resumed model, already
        evaluated and recorded before the interruption) is skipped."""

        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and self.done > 0:
                return None
            return fn(server_round + self.done, arrays)

        return shifted


def truncate_metrics(run_path: str | Path, last_round: int) -> int:
    """Keep the rows of rounds <= ``last_round`` (atomically); returns how many were dropped."""
    path = Path(run_path) / METRICS
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["round"]) <= last_round:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a row cut short by the crash
            continue
    atomic_write(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def load_for_resume(run_path: str | Path, rounds: int) -> checkpoint.Checkpoint:
    """The checkpoint to continue from, with ``metrics.jsonl`` cut back to it."""
    ckpt = checkpoint.latest(run_path)
    if ckpt is None:
        raise ResumeError(f"no checkpoint in {Path(run_path) / checkpoint.CHECKPOINT_DIR}: nothing to resume")
    if ckpt.round > rounds:
        raise ResumeError(f"the checkpoint is of round {ckpt.round} but the run has {rounds} rounds")
    truncate_metrics(run_path, ckpt.round)
    return ckpt


def resume_config(run_path: str | Path, config_file: str | None, overrides: list[str], out: str | None):
    """The RunConfig of the run in ``run_path`` (its config.json), refusing anything that would
    change it: a resumed run is the same run."""
    from fedtune.artifacts import CONFIG, RunDir

    if config_file or overrides or (out and Path(out).resolve() != Path(run_path).resolve()):
        raise ResumeError("--resume continues a run with its own config.json: drop --config, --set and --out")
    if not (Path(run_path) / CONFIG).is_file():
        raise ResumeError(f"not a run directory (no {CONFIG}): {run_path}")
    if checkpoint.latest(run_path) is None:
        raise ResumeError(f"no checkpoint in {Path(run_path) / checkpoint.CHECKPOINT_DIR}: nothing to resume")
    return RunDir(run_path).config()
