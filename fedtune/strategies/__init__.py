"""Server strategies, selected by ``--set strategy=NAME``: one ``StrategySpec`` per strategy.

A spec joins the torch-free half of a strategy (``fedtune.catalog.StrategyInfo``: what it
sends down and up, its client recipe, and the flags fedtune.compat reads: rank-aware,
sparse, client-level DP, robust, codec and SecAgg+ compatible) to its Flower class, its pure
per-layer math (``fedtune.strategies.lora.METHODS``) and its client recipe. ``STRATEGIES`` is
the registry of their builders; a new strategy is one catalog entry plus one spec here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedtune.catalog import STRATEGIES as CATALOG, StrategyInfo, adapter_kind
from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.profiles import candidates
from fedtune.registry import Registry
from fedtune.strategies.fedavg import FedAdam, FedAvg, FedAvgM, sampling
from fedtune.strategies.hetero import FedExLoRA, FedSALoRA, FFALoRA, FLoRA, FlexLoRA, HetLoRA, RankFedAvg
from fedtune.strategies.lora import METHODS
from fedtune.strategies.recipes import ClientRecipe, recipe_for
from fedtune.strategies.rank_aware import RankAware

STRATEGIES: Registry[Callable[[RunConfig], Strategy]] = Registry("strategy")


def _mask_aware(cfg: RunConfig) -> Strategy:
    """The mask-aware mean of sparse deltas (fedtune/strategies/sparse)."""
    from fedtune.strategies.sparse.strategy import SparseFedAvg

    return SparseFedAvg(**sampling(cfg))


# fedavg's aggregation of an adapter kind other than its own mean, by the kind's catalog name for it
# (fedtune.catalog.AdapterKindInfo.aggregation): the model layer names it, this layer resolves it.
AGGREGATIONS: dict[str, Callable[[RunConfig], Strategy]] = {"mask-aware": _mask_aware}


@STRATEGIES.register("fedavg")
def _fedavg(cfg: RunConfig) -> Strategy:
    if (own := AGGREGATIONS.get(adapter_kind(cfg.model.adapter).aggregation)) is not None:
        return own(cfg)
    if cfg.federation.profiles:  # clients of several ranks: zero-padded per-factor average
        return RankFedAvg(cfg, **sampling(cfg))
    return FedAvg(**sampling(cfg))


def _rank_aware(cls: type[RankAware]) -> Callable[[RunConfig], Strategy]:
    def build(cfg: RunConfig) -> Strategy:
        return cls(cfg, **sampling(cfg))

    return build


# The class that aggregates clients of several LoRA ranks, per rank-aware strategy (docs/strategies.md).
_RANK_AWARE: dict[str, type[RankAware]] = {"fedavg": RankFedAvg, "hetlora": HetLoRA, "flexlora": FlexLoRA,
                                           "flora": FLoRA, "ffa": FFALoRA, "fedsa": FedSALoRA, "fedex": FedExLoRA}
for _name, _cls in _RANK_AWARE.items():  # hetlora, flexlora, flora, ffa, fedsa, fedex (fedavg: below)
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
    return FedAvgM(**sampling(cfg), server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum)


@STRATEGIES.register("fedadam")
def _fedadam(cfg: RunConfig) -> Strategy:
    _equal_ranks(cfg, "fedadam")
    return FedAdam(**sampling(cfg), eta=cfg.federation.server_lr * 1e-2, eta_l=cfg.train.lr)


@dataclass(frozen=True)
class StrategySpec:
    """Everything fedtune knows about one strategy, in one place."""

    info: StrategyInfo  # name, what goes down / up, client recipe kind, compatibility flags (torch-free)
    build: Callable[[RunConfig], Strategy]  # the Flower strategy for a run
    rank_aware: type[RankAware] | None  # the class for clients of several profiles (None: one shape only)
    math: Callable[..., Any] | None  # the pure per-layer aggregation (fedtune.strategies.lora), if it has one

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def recipe(self) -> ClientRecipe:
        return recipe_for(self.info.name)


SPECS: dict[str, StrategySpec] = {
    name: StrategySpec(info, STRATEGIES.get(name), _RANK_AWARE.get(name), METHODS.get(name))
    for name, info in CATALOG.items()
}
assert sorted(SPECS) == STRATEGIES.names(), "every registered strategy has a catalog entry and a spec"
assert all((s.rank_aware is not None) == s.info.rank_aware for s in SPECS.values()), "catalog rank-aware flags"
RANK_AWARE: dict[str, type[RankAware]] = {n: s.rank_aware for n, s in SPECS.items() if s.rank_aware is not None}


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
