"""One registry per pluggable kind (strategies, partitioners, datasets, ...).

Usage::

    STRATEGIES = Registry("strategy")

    @STRATEGIES.register("fedavg")
    def build_fedavg(cfg): ...

    STRATEGIES.get("fedavg")   # unknown names raise ConfigError listing the valid ones
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedtune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table whose lookup errors list the valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
