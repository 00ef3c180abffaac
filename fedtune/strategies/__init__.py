"""Server strategies, selected by ``--set strategy=NAME`` through one registry."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

from fedtune.config import RunConfig
from fedtune.registry import Registry
from fedtune.strategies.fedavg import FedAdam, FedAvg, FedAvgM

STRATEGIES: Registry[Callable[[RunConfig], Strategy]] = Registry("strategy")


def _sampling(cfg: RunConfig) -> dict:
    fed = cfg.federation
    n = cfg.partition.num_clients
    evaluate = fed.fraction_evaluate if cfg.partition.val_fraction > 0 else 0.0  # no local val data
    return dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=evaluate,
        min_train_nodes=min(fed.min_train_nodes, n),
        min_evaluate_nodes=1 if evaluate > 0 else 0,
        min_available_nodes=n,
    )


@STRATEGIES.register("fedavg")
def _fedavg(cfg: RunConfig) -> Strategy:
    return FedAvg(**_sampling(cfg))


@STRATEGIES.register("fedavgm")
def _fedavgm(cfg: RunConfig) -> Strategy:
    fed = cfg.federation
    return FedAvgM(**_sampling(cfg), server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum or 0.9)


@STRATEGIES.register("fedadam")
def _fedadam(cfg: RunConfig) -> Strategy:
    return FedAdam(**_sampling(cfg), eta=cfg.federation.server_lr * 1e-2, eta_l=cfg.train.lr)


def build_strategy(cfg: RunConfig) -> Strategy:
    return STRATEGIES.get(cfg.federation.strategy)(cfg)
