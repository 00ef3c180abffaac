"""Aggregation math for heterogeneous-rank federated LoRA: pure torch functions, no Flower.

One module per method; each takes one layer's ``list[ClientFactors]`` (sorted by client id)
and returns what the server needs for that layer:

=========  ===================================  ==================================================
method     returns                              server / client then
=========  ===================================  ==================================================
fedavg     LoRAFactors (rank R = max r_i)       client i: slice_to_rank(g, r_i, s_i)
hetlora    LoRAFactors (rank R)                 client i: slice_to_rank(g, r_i, s_i); may prune
flexlora   Tensor delta [d_out, d_in] (exact)   client i: flexlora_redistribute(delta, r_i, s_i)
flora      Tensor delta [d_out, d_in] (exact)   merge into base weight; clients start fresh
ffa        LoRAFactors (A = shared frozen A)    client i: B_i <- slice_to_rank(g, r_i, s_i).B
fedsa      (A_avg [R, d_in], None)              client i: A_i <- A_avg[:r_i], keeps its own B_i
fedex      FedExResult(factors, residual)       base += residual; clients get the factors
=========  ===================================  ==================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

from fedtune.strategies.lora.factors import ClientFactors, LoRAFactors, check_pair, lora_scale, rslora_scale
from fedtune.strategies.lora.ops import (
    check_clients,
    exact_mean_delta,
    normalized_weights,
    pad_rank,
    padded_average,
    slice_to_rank,
)
from fedtune.strategies.lora.fedavg import fedavg
from fedtune.strategies.lora.fedex import FedExResult, fedex
from fedtune.strategies.lora.fedsa import fedsa
from fedtune.strategies.lora.ffa import ffa, ffa_init_A
from fedtune.strategies.lora.flexlora import flexlora, flexlora_redistribute, flexlora_truncation_error
from fedtune.strategies.lora.flora import flora, flora_stack
from fedtune.strategies.lora.hetlora import hetlora, hetlora_prune_rank, hetlora_weights
from fedtune.strategies.lora.layers import aggregate_layers, by_layer

METHODS: MappingProxyType[str, Callable[[Sequence[ClientFactors]], Any]] = MappingProxyType(
    {
        "fedavg": fedavg,
        "hetlora": hetlora,
        "flexlora": flexlora,
        "flora": flora,
        "ffa": ffa,
        "fedsa": fedsa,
        "fedex": fedex,
    }
)

# Methods whose aggregate reproduces sum_i w_i s_i B_i @ A_i exactly (for any ranks / scales).
EXACT_METHODS: frozenset[str] = frozenset({"flexlora", "flora", "fedex"})


def method_names() -> list[str]:
    """Sorted names of the aggregation methods in METHODS."""
    return sorted(METHODS)


def get_method(name: str) -> Callable[[Sequence[ClientFactors]], Any]:
    """METHODS[name]; an unknown name raises ValueError listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA aggregation method {name!r}; valid: {', '.join(method_names())}") from None


__all__ = [
    "EXACT_METHODS",
    "METHODS",
    "ClientFactors",
    "FedExResult",
    "LoRAFactors",
    "aggregate_layers",
    "by_layer",
    "check_clients",
    "check_pair",
    "exact_mean_delta",
    "fedavg",
    "fedex",
    "fedsa",
    "ffa",
    "ffa_init_A",
    "flexlora",
    "flexlora_redistribute",
    "flexlora_truncation_error",
    "flora",
    "flora_stack",
    "get_method",
    "hetlora",
    "hetlora_prune_rank",
    "hetlora_weights",
    "lora_scale",
    "method_names",
    "normalized_weights",
    "pad_rank",
    "padded_average",
    "rslora_scale",
    "slice_to_rank",
]
