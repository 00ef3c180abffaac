"""Plugins: a user module adds its own strategy, dataset source, model or adapter kind.

One registration function per kind; each adds the name to the torch-free catalog the config
is checked against (``fedtune.catalog``) and the implementation to the registry fedtune
itself uses, so the name then works everywhere a built-in one does (``--set strategy=NAME``,
``dataset=NAME``, ``model=NAME``, ``adapter=NAME``). A name that is already taken, by
fedtune or by another plugin, is a one-line ``ConfigError`` naming both.

A plugin is selected by module name: ``--set plugins=my_module`` on the CLI,
``plugins=["my_module"]`` in the API, or an installed package's ``fedtune.plugins`` entry
point (fedtune/plugin_loader.py); every process of a run imports it before it reads the
run's config. docs/api.md has a complete example; examples/my_strategy.py is one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedtune import catalog, compat
from fedtune.adapter_kinds import AdapterKind, register_adapter_kind as _add_kind
from fedtune.bases import MODELS, ModelBuilder, builtin_models
from fedtune.catalog import AdapterKindInfo, StrategyInfo
from fedtune.config import DataConfig, RunConfig
from fedtune.data.sources import SOURCES, Split, TextDataset
from fedtune.errors import ConfigError
from fedtune.strategies import RANK_AWARE, SPECS, STRATEGIES, StrategySpec
from fedtune.strategies.fedavg import sampling
from fedtune.strategies.lora import ClientFactors, LoRAFactors
from fedtune.strategies.rank_aware import GlobalState, RankAware
from fedtune.strategies.recipes import RECIPES

__all__ = ["AdapterKind", "AdapterKindInfo", "ClientFactors", "LoRAFactors", "RankAware", "Split", "StrategyInfo", "TextDataset", "owner",
           "register_adapter_kind", "register_dataset", "register_model", "register_strategy"]

_OWNERS: dict[tuple[str, str], str] = {}  # (kind, name) -> the plugin module that registered it


def owner(kind: str, name: str) -> str:
    """Who registered ``name`` of ``kind``: 'fedtune' (built in) or the plugin module's name."""
    return _OWNERS.get((kind, name), "fedtune")


def _caller(depth: int = 2) -> str:
    return str(sys._getframe(depth).f_globals.get("__name__", "?"))


def _claim(kind: str, name: str, taken: bool, by: str) -> bool:
    """Take ``name`` for plugin ``by``; False when ``by`` already holds it (a re-import: nothing to do)."""
    if not name or not isinstance(name, str) or name != name.strip():
        raise ConfigError(f"plugin {by}: bad {kind} name {name!r}")
    if (kind, name) in _OWNERS and _OWNERS[(kind, name)] == by:
        return False
    if taken:
        holder = _OWNERS.get((kind, name))
        other = f"plugin {holder}'s" if holder else "fedtune's built-in"
        raise ConfigError(f"plugin {by}: {kind} {name!r} clashes with {other} {kind} {name!r}; choose another name")
    _OWNERS[(kind, name)] = by
    return True


def _math_strategy(name: str, math: Callable[[list[ClientFactors]], LoRAFactors]) -> type[RankAware]:
    """A rank-aware Flower strategy whose per-layer aggregate is ``math(clients)``."""

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, None]:
        return math(clients), None

    return type(f"Plugin_{name}", (RankAware,), {"combine": combine, "__doc__": math.__doc__,
                                                  "__module__": getattr(math, "__module__", __name__)})


def _refresh_compat() -> None:
    """compat's strategy lists, read from the catalog's flags (a plugin's flags count like a built-in's)."""
    compat.CLIENT_LEVEL_STRATEGIES = catalog.strategies_where("client_dp")
    compat.SECAGG_STRATEGIES = catalog.strategies_where("secagg")
    compat.ROBUST_STRATEGIES = catalog.strategies_where("robust")
    compat.SPARSE_STRATEGIES = catalog.strategies_where("sparse")


def register_strategy(
    info: StrategyInfo | str,
    math: Callable[[list[ClientFactors]], LoRAFactors] | None = None,
    *,
    rank_aware: type[RankAware] | None = None,
    build: Callable[[RunConfig], Strategy] | None = None,
) -> StrategySpec:
    """Add an aggregation strategy under ``info.name``.

    ``info``: the strategy's torch-free description (``StrategyInfo(name, rank_aware=True,
    secagg="why not", ...)``; a bare name means a rank-aware strategy that sends and trains A
    and B, with no SecAgg+, robust, client-DP or sparse support). Then one of:

    - ``math``: a pure function from one layer's clients (``list[ClientFactors]``, sorted by
      client id; each with its own rank) to the aggregate ``LoRAFactors`` at the largest rank;
      fedtune wraps it in a ``RankAware`` Flower strategy (clients of mixed ranks, per-node
      messages, the head averaged by examples), as it does ``fedtune.strategies.lora.hetlora``;
    - ``rank_aware``: a ``RankAware`` subclass of your own (its ``combine`` per layer);
    - ``build``: ``build(cfg) -> flwr Strategy`` for a strategy of one adapter shape.
    """
    by = _caller()
    if isinstance(info, str):
        info = StrategyInfo(info, rank_aware=True, secagg="a plugin strategy sees each client's factors")
    if sum(x is not None for x in (math, rank_aware, build)) != 1:
        raise ConfigError(f"plugin {by}: register_strategy({info.name!r}) takes exactly one of math, rank_aware, build")
    if info.client not in RECIPES:
        raise ConfigError(f"plugin {by}: strategy {info.name!r} names client recipe {info.client!r}; "
                          f"valid: {', '.join(RECIPES)}")
    if math is not None:
        rank_aware = _math_strategy(info.name, math)
    if (rank_aware is not None) != info.rank_aware:
        raise ConfigError(f"plugin {by}: strategy {info.name!r} has rank_aware={info.rank_aware} in its StrategyInfo "
                          f"but {'a' if rank_aware else 'no'} rank-aware class")
    if not _claim("strategy", info.name, info.name in catalog.STRATEGIES, by):
        return SPECS[info.name]
    if rank_aware is not None:
        cls = rank_aware
        build = lambda cfg: cls(cfg, **sampling(cfg))  # noqa: E731
        RANK_AWARE[info.name] = cls
    catalog.STRATEGIES[info.name] = info
    STRATEGIES.register(info.name)(build)
    SPECS[info.name] = spec = StrategySpec(info, build, rank_aware, math)
    _refresh_compat()
    return spec


def register_dataset(name: str, load: Callable[[DataConfig], TextDataset]) -> None:
    """Add a dataset source: ``load(cfg.data) -> TextDataset(name, label_names, train, test)``
    (each split a ``Split(texts, labels, groups)``); selected with ``dataset=NAME``. It is
    loaded once per process and partitioned like the built-in ones."""
    if _claim("dataset", name, name in SOURCES, _caller()):
        SOURCES.register(name)(load)


def register_model(name: str, build: Callable[[int], Any], tokenizer: str = "minilm") -> None:
    """Add a classifier base: ``build(num_labels)`` returns a transformers sequence
    classifier (its weights frozen by fedtune, LoRA added on ``target-modules``);
    ``tokenizer`` is a model name or folder whose tokenizer reads its input. Selected with
    ``model=NAME`` (task=classify)."""
    if _claim("model", name, name in MODELS or name in builtin_models(), _caller()):
        MODELS.register(name)(ModelBuilder(build, tokenizer))


def register_adapter_kind(kind: str | AdapterKindInfo, impl: AdapterKind | Callable[[Any, Any, int], Any],
                          params: tuple[str, ...] = ()) -> None:
    """Add an adapter kind (selected with ``adapter=NAME``) through fedtune's own interface.

    Full form: ``register_adapter_kind(AdapterKindInfo(NAME, ...), MyKind())``, an
    ``AdapterKind`` (fedtune/adapter_kinds/base.py: build, what a reply states and carries,
    loading and merging for export) and its torch-free flags (which strategies aggregate it,
    profiles, DP, quantized bases), as the built-in lora / sparse / ia3 are.
    Short form: ``register_adapter_kind(NAME, build)`` with ``build(base, model_cfg, seed) ->
    model`` (only the adapter and the head trainable; ``params``: fragments of the adapter's
    parameter names, the rest trains at head-lr): a dense kind whose trainable state travels
    whole and is averaged, like ia3 (fedavg / fedavgm / fedadam, no profiles)."""
    if isinstance(kind, str):
        info = AdapterKindInfo(kind, params=tuple(params), strategies="dense", profiles=False)
        impl = _BuiltKind(kind, impl)
    else:
        info = kind
    if _claim("adapter kind", info.name, info.name in catalog.ADAPTERS, _caller()):
        _add_kind(info, impl)


class _BuiltKind(AdapterKind):
    """A dense adapter kind from one build function (register_adapter_kind's short form)."""

    def __init__(self, name: str, build: Callable[[Any, Any, int], Any]) -> None:
        self.name, self._build = name, build

    def build(self, base: Any, cfg: Any, seed: int) -> Any:
        return self._build(base, cfg, seed)

