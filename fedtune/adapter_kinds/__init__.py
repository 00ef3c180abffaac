"""Adapter kinds (``--set adapter=NAME``), one registry: ``KINDS`` maps a name to its ``AdapterKind``.

Built in: ``lora`` (peft LoRA), ``sparse`` (chosen entries of the base weights, fedtune.sparse)
and ``ia3`` (peft IA3). Every module of this package but ``base`` defines ``KIND``, an
:class:`~fedtune.adapter_kinds.base.AdapterKind`, and is registered here under its catalog name
(``fedtune.catalog.ADAPTERS`` holds the torch-free halves); adding a kind is one module here
plus its ``AdapterKindInfo`` in the catalog (docs/architecture.md, "How to add an adapter kind").

From outside fedtune (a plugin), one call adds both halves::

    from fedtune.adapter_kinds import register_adapter_kind
    from fedtune.catalog import AdapterKindInfo

    register_adapter_kind(AdapterKindInfo("mykind", strategies="dense", profiles=False), MyKind())

after which ``--set adapter=mykind`` validates and runs. A name that exists already (a built-in
kind, or one registered before) is a ConfigError; ``impl.name`` must be the info's name.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedtune import catalog
from fedtune.adapter_kinds.base import AdapterKind, load_trainable_state, trainable_state
from fedtune.errors import ConfigError
from fedtune.registry import Registry

KINDS: Registry[AdapterKind] = Registry("adapter")

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        _kind: AdapterKind = importlib.import_module(f"{__name__}.{_mod}").KIND
        KINDS.register(_kind.name)(_kind)
assert KINDS.names() == sorted(catalog.BUILTIN_ADAPTER_KINDS), "every built-in adapter kind has a catalog entry"


def kind_of(adapter: str) -> AdapterKind:
    """The registered kind ``adapter`` (a ModelConfig's ``adapter``); unknown: a ConfigError."""
    return KINDS.get(adapter)


def register_adapter_kind(info: catalog.AdapterKindInfo, impl: AdapterKind) -> AdapterKind:
    """Add an adapter kind from outside fedtune: its catalog entry (what fedtune.compat and
    config validation read) and its implementation. Refuses a name that exists already."""
    if impl.name != info.name:
        raise ConfigError(f"adapter kind {info.name!r}: its implementation is named {impl.name!r}")
    if info.name in KINDS:
        raise ConfigError(f"adapter kind {info.name!r} exists already"
                          f"{' (built in)' if info.name in catalog.BUILTIN_ADAPTER_KINDS else ''}")
    catalog.add_adapter_kind(info)
    KINDS.register(info.name)(impl)
    return impl


__all__ = ["AdapterKind", "KINDS", "kind_of", "register_adapter_kind", "trainable_state", "load_trainable_state"]
