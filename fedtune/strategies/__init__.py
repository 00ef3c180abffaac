"""Server strategies, selected by ``--set strategy=NAME`` through one registry."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.profiles import candidates
from fedtune.registry import Registry
from fedtune.strategies.fedavg import FedAdam, FedAvg, FedAvgM, sampling
from fedtune.strategies.hetero import RANK_AWARE, RankFedAvg
from fedtune.strategies.rank_aware import RankAware

STRATEGIES: Registry[Callable[[RunConfig], Strategy]] = Registry("strategy")


@STRATEGIES.register("fedavg")
def _fedavg(cfg: RunConfig) -> Strategy:
    if cfg.model.adapter == "sparse":  # mask-aware mean of sparse deltas (fedtune/strategies/sparse)
        from fedtune.strategies.sparse.strategy import SparseFedAvg

        return SparseFedAvg(**sampling(cfg))
    if cfg.federation.profiles:  # clients of several ranks: zero-padded per-factor average
        return RankFedAvg(cfg, **sampling(cfg))
    return FedAvg(**sampling(cfg))


def _rank_aware(cls: type[RankAware]) -> Callable[[RunConfig], Strategy]:
    def build(cfg: RunConfig) -> Strategy:
        return cls(cfg, **sampling(cfg))

    return build


for _name, _cls in RANK_AWARE.items():  # hetlora, flexlora, flora, ffa, fedsa, fedex (docs/strategies.md)
    if _name != "fedavg":
        STRATEGIES.register(_name)(_rank_aware(_cls))


def _equal_ranks(cfg: RunConfig, name: str) -> None:
    if len({(p.lora_rank, p.layers) for p in candidates(cfg)}) > 1:
        raise ConfigError(f"strategy {name} averages tensors of one shape; clients of several profiles need one of "
                          f"{', '.join(sorted(RANK_AWARE))}")


@STRATEGIES.register("fedavgm")
def _fedavgm(cfg: RunConfig) -> Strategy:
    _equal_ranks(cfg, "fedavgm")
    fed = cfg.federation
    return FedAvgM(**sampling(cfg), server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum or 0.9)


@STRATEGIES.register("fedadam")
def _fedadam(cfg: RunConfig) -> Strategy:
    _equal_ranks(cfg, "fedadam")
    return FedAdam(**sampling(cfg), eta=cfg.federation.server_lr * 1e-2, eta_l=cfg.train.lr)


def build_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy, with the privacy wrappers ``dp`` asks for composed around it
    (fedtune.privacy.federation; dp=none returns the strategy itself)."""
    from fedtune.privacy.federation import wrap_privacy

    from fedtune.strategies.robust import robust_aggregator

    strategy = STRATEGIES.get(cfg.federation.strategy)(cfg)
    if (robust := robust_aggregator(cfg)) is not None:  # fedavg / fedavgm / fedadam only (check_robust)
        if type(strategy) not in (FedAvg, FedAvgM, FedAdam):  # e.g. adapter=sparse: its own aggregation
            raise ConfigError(f"bad value robust={cfg.federation.robust}: not supported with this strategy and "
                              f"adapter ({type(strategy).__name__})")
        strategy.robust = robust  # type: ignore[attr-defined]
    return wrap_privacy(strategy, cfg)
