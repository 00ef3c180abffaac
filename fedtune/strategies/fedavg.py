"""FedAvg and FedOpt-family strategies: Flower's classes over our pure aggregation.

Flower's FedAvgM / FedAdam call ``super().aggregate_train`` for the plain average and then
apply the server optimiser; putting ``FedAvg`` below them in the MRO makes that average ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from torch import Tensor

from fedtune import wire
from fedtune.strategies.aggregation import weighted_mean


def ordered(replies: Iterable[Message]) -> list[Message]:
    """Replies without errors, sorted by client id, so aggregation is deterministic."""
    ok = [m for m in replies if not m.has_error()]
    return sorted(ok, key=lambda m: int(m.content[wire.METRICS][wire.CLIENT_ID]))


class FedAvg(flwr_strategy.FedAvg):
    """Example-weighted average of the clients' adapter tensors; with ``robust`` set
    (fedtune.strategies.robust), a robust aggregate of the updates (reply - global) instead."""

    robust: Callable[[list[dict[str, Tensor]], list[float]], dict[str, Tensor]] | None = None
    sent: ArrayRecord | None = None  # the global arrays of this round's train messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def combine(self, states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
        if self.robust is None or self.sent is None:
            return weighted_mean(states, weights)
        g = wire.from_record(self.sent)
        update = self.robust([{k: s[k].double() - g[k].double() for k in s} for s in states], weights)
        return {k: (g[k].double() + u).to(states[0][k].dtype) for k, u in update.items()}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        valid = ordered(valid)
        states = [wire.from_record(m.content[wire.ARRAYS]) for m in valid]
        weights = [float(m.content[wire.METRICS][wire.WEIGHT]) for m in valid]
        arrays = wire.to_record(self.combine(states, weights))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class FedAvgM(flwr_strategy.FedAvgM, FedAvg):
    """FedAvg with server momentum (Hsu et al., 2019)."""


class FedAdam(flwr_strategy.FedAdam, FedAvg):
    """Adam on the averaged update as pseudo-gradient (Reddi et al., 2021)."""


__all__ = ["FedAvg", "FedAvgM", "FedAdam", "aggregate_metricrecords", "ordered"]


def sampling(cfg) -> dict:
    """Flower's sampling arguments of every fedtune strategy, from a RunConfig."""
    fed = cfg.federation
    n = cfg.partition.num_clients
    evaluate = fed.fraction_evaluate if cfg.partition.val_fraction > 0 else 0.0  # no local val data
    return dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=evaluate,
        min_train_nodes=min(fed.min_train_nodes, n),
        min_evaluate_nodes=1 if evaluate > 0 else 0,
        # wait for this many nodes only: a node lost mid-run must not stall every later round
        min_available_nodes=min(fed.min_train_nodes, n),
    )
