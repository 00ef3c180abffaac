"""Apply a one-layer aggregation method to every LoRA layer of a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from fedtune.strategies.lora.factors import ClientFactors

T = TypeVar("T")


def by_layer(per_client: Sequence[Mapping[str, ClientFactors]]) -> dict[str, list[ClientFactors]]:
    """[{layer: factors} per client] -> {layer: [factors per client]}, layers sorted, client order kept."""
    if not per_client:
        raise ValueError("empty client list: nothing to aggregate")
    keys = set(per_client[0])
    for i, layers in enumerate(per_client):
        if set(layers) != keys:
            diff = sorted(keys ^ set(layers))[:3]
            raise ValueError(f"client {i} has different LoRA layers than client 0, e.g. {diff}")
    return {name: [layers[name] for layers in per_client] for name in sorted(keys)}


def aggregate_layers(
    method: Callable[[Sequence[ClientFactors]], T], per_client: Sequence[Mapping[str, ClientFactors]]
) -> dict[str, T]:
    """{layer: method(clients' factors for that layer)}; a ValueError names the failing layer.

    Options go in with functools.partial, e.g. ``aggregate_layers(partial(ffa, atol=0), replies)``.
    """
    out: dict[str, T] = {}
    for name, clients in by_layer(per_client).items():
        try:
            out[name] = method(clients)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from e
    return out
