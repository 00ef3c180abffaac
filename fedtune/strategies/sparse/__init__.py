"""Mask-aware aggregation of sparse updates, as a pure function (tensors in, tensors out).

Each coordinate of a sparse layer is averaged over the clients that updated it, weighted by
their examples (as in SpIEL's and Composable Sparse Fine-Tuning's federated variants: a
client's untouched entries are not votes for zero); the union of the clients' masks becomes
the new global sparse delta. Coordinates no client updated keep the previous global value
(every client's dense state agrees there). Tensors without masks (the head) get the plain
example-weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedtune.strategies.aggregation import weighted_mean


def masked_mean(states: Sequence[Tensor], masks: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """One tensor: sum_{i: c in m_i} w_i x_i[c] / sum_{i: c in m_i} w_i where any client updated
    c, else the plain weighted mean. states: n x [shape]; masks: n x [k_i] flat int64 indices."""
    num = torch.zeros(states[0].numel(), dtype=torch.float64)
    den = torch.zeros_like(num)
    plain = torch.zeros_like(num)
    total = float(sum(weights))
    for x, m, w in zip(states, masks, weights):
        flat = x.flatten().to(torch.float64)
        num.index_add_(0, m, flat[m] * w)
        den.index_add_(0, m, torch.full((len(m),), float(w), dtype=torch.float64))
        plain += flat * (w / total)
    out = torch.where(den > 0, num / den.clamp_min(1e-300), plain)
    return out.reshape(states[0].shape).to(states[0].dtype)


def mask_aware_mean(states: Sequence[Mapping[str, Tensor]], masks: Sequence[Mapping[str, Tensor]],
                    weights: Sequence[float]) -> dict[str, Tensor]:
    """Per key: ``masked_mean`` for keys with masks, ``weighted_mean`` for the rest."""
    if not states or len(states) != len(masks) or len(states) != len(weights):
        raise ValueError(f"{len(states)} states, {len(masks)} masks, {len(weights)} weights")
    masked = set(masks[0])
    if any(set(m) != masked for m in masks):
        raise ValueError("clients' masks cover different tensors")
    out = weighted_mean([{k: v for k, v in s.items() if k not in masked} for s in states], weights)
    for key in sorted(masked):
        out[key] = masked_mean([s[key] for s in states], [m[key] for m in masks], weights)
    return out


def union_fraction(masks: Sequence[Mapping[str, Tensor]], numels: Mapping[str, int]) -> float:
    """The share of the sparse layers' entries that at least one client updated."""
    covered = sum(len(torch.unique(torch.cat([m[k] for m in masks]))) for k in numels)
    return covered / max(1, sum(numels.values()))
