"""FedAvg and FedOpt-family strategies: Flower's classes over our pure aggregation.

Flower's FedAvgM / FedAdam call ``super().aggregate_train`` for the plain average and then
apply the server optimiser; putting ``FedAvg`` below them in the MRO makes that average ours.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedtune import wire
from fedtune.strategies.aggregation import weighted_mean


def ordered(replies: Iterable[Message]) -> list[Message]:
    """Replies without errors, sorted by client id, so aggregation is deterministic."""
    ok = [m for m in replies if not m.has_error()]
    return sorted(ok, key=lambda m: int(m.content[wire.METRICS][wire.CLIENT_ID]))


class FedAvg(flwr_strategy.FedAvg):
    """Example-weighted average of the clients' adapter tensors."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        valid = ordered(valid)
        states = [wire.from_record(m.content[wire.ARRAYS]) for m in valid]
        weights = [float(m.content[wire.METRICS][wire.WEIGHT]) for m in valid]
        arrays = wire.to_record(weighted_mean(states, weights))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class FedAvgM(flwr_strategy.FedAvgM, FedAvg):
    """FedAvg with server momentum (Hsu et al., 2019)."""


class FedAdam(flwr_strategy.FedAdam, FedAvg):
    """Adam on the averaged update as pseudo-gradient (Reddi et al., 2021)."""


__all__ = ["FedAvg", "FedAvgM", "FedAdam", "aggregate_metricrecords", "ordered"]
