"""Robust aggregation of client updates (reply - what the server sent): pure functions.

- ``norm-bound``: every update's L2 norm (over all its tensors) is clipped to a bound, then
  the usual example-weighted mean (Sun et al., 2019, "Can You Really Backdoor Federated
  Learning?").
- ``median``: the coordinate-wise median of the updates, unweighted (Yin et al., 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").
- ``trimmed-mean``: per coordinate, drop the k = floor(beta * n) largest and k smallest
  values and average the rest, unweighted (Yin et al., 2018).

Each takes ``updates`` (a list of {name: tensor [any shape]}, same keys and shapes),
``weights`` (one per update) and the run's FederationConfig, and returns one {name: float64
tensor}. The strategy adds it to the global model (fedtune.strategies.fedavg).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedtune.compat import ROBUST_STRATEGIES, check_robust, check_robust_dp  # noqa: F401 - the rules
from fedtune.registry import Registry

Updates = Sequence[dict[str, Tensor]]
Aggregator = Callable[[Updates, Sequence[float], object], dict[str, Tensor]]
ROBUST: Registry[Aggregator | None] = Registry("robust aggregation")
SUPPORTED = ROBUST_STRATEGIES  # strategies whose aggregate is a mean of same-shape updates (the catalog's flag)

F64 = torch.float64


def update_norm(update: dict[str, Tensor]) -> float:
    """L2 norm of an update over all its tensors."""
    return math.sqrt(sum(float(t.to(F64).pow(2).sum()) for t in update.values()))


def clip_to_norm(update: dict[str, Tensor], bound: float) -> dict[str, Tensor]:
    """``update`` scaled by min(1, bound / ||update||)."""
    norm = update_norm(update)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: t.to(F64) * factor for k, t in update.items()}


def weighted_average(updates: Updates, weights: Sequence[float]) -> dict[str, Tensor]:
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("robust aggregation of no updates (or weights summing to 0)")
    return {k: sum(u[k].to(F64) * (w / total) for u, w in zip(updates, weights)) for k in updates[0]}


def _stack(updates: Updates, key: str) -> Tensor:
    return torch.stack([u[key].to(F64) for u in updates])  # [n, *shape]


def coordinate_median(updates: Updates) -> dict[str, Tensor]:
    """Per coordinate, the median of the n values (mean of the two middle ones for even n)."""
    if not updates:
        raise ValueError("median of no updates")
    n, out = len(updates), {}
    for k in updates[0]:
        s = _stack(updates, k).sort(dim=0).values
        out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def trimmed_mean(updates: Updates, beta: float) -> dict[str, Tensor]:
    """Per coordinate, the mean after dropping the k = floor(beta n) smallest and largest values."""
    n = len(updates)
    k = int(math.floor(beta * n))
    if n == 0 or n - 2 * k <= 0:
        raise ValueError(f"trimmed mean of {n} updates with trim fraction {beta} keeps nothing")
    return {key: _stack(updates, key).sort(dim=0).values[k:n - k].mean(dim=0) for key in updates[0]}


ROBUST.register("none")(None)
ROBUST.register("norm-bound")(
    lambda u, w, fed: weighted_average([clip_to_norm(x, fed.robust_norm_bound) for x in u], w))
ROBUST.register("median")(lambda u, w, fed: coordinate_median(u))
ROBUST.register("trimmed-mean")(lambda u, w, fed: trimmed_mean(u, fed.trim_fraction))


def robust_aggregator(cfg) -> Callable[[Updates, Sequence[float]], dict[str, Tensor]] | None:
    """The run's robust aggregation as a function of (updates, weights), or None (the mean)."""
    fn = ROBUST.get(cfg.federation.robust)
    if fn is None:
        return None
    check_robust_dp(cfg)
    fed = cfg.federation
    return lambda updates, weights: fn(updates, weights, fed)
