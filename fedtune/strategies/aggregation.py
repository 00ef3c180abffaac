"""Aggregation math as pure functions: tensors in, tensors out, no Flower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def weighted_mean(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_i w_i * x_i / sum_i w_i per key (FedAvg, McMahan et al., 2017).

    Accumulates in float64 in the given order, so the result does not depend on thread
    timing; callers pass replies in a fixed order (by client id).
    """
    if not states:
        raise ValueError("weighted_mean of no states")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError(f"states have different keys: {sorted(keys ^ s.keys())[:3]}")
    total = float(sum(weights))
    out: dict[str, Tensor] = {}
    for k in keys:
        acc = torch.zeros(states[0][k].shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            if s[k].shape != acc.shape:
                raise ValueError(f"{k}: shape {tuple(s[k].shape)} != {tuple(acc.shape)}")
            acc += s[k].to(torch.float64) * (w / total)
        out[k] = acc.to(states[0][k].dtype)
    return out


def momentum_step(state: dict[str, Tensor], mean: dict[str, Tensor], velocity: dict[str, Tensor], beta: float,
                  lr: float) -> dict[str, Tensor]:
    """FedAvgM's server step (Hsu et al., 2019; the update flwr's FedAvgM applies): with the
    pseudo-gradient g = x - mean, v <- beta v + g (v = g in the first round), x <- x - lr v.
    ``velocity`` holds v between rounds and is updated in place."""
    for k in state:
        g = state[k] - mean[k]
        velocity[k] = beta * velocity[k] + g if k in velocity else g
    return {k: state[k] - lr * velocity[k] for k in state}
