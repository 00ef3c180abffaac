"""The strategy's state between rounds, read along its wrapper chain, and put back.

The chain is walked through ``.inner`` / ``.strategy`` (``Metered`` -> DP wrappers -> the
strategy, the same walk as ``rank_aware_of``); each known attribute of each object is saved
under ``<position>/<attribute>/<key>``. Attributes that are None (not started) are left as
built on restore.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

# Attributes that carry state from round to round (None = not started, left as built):
TENSOR_DICTS = ("m_t", "v_t", "canary_state")  # FedOpt moments (Reddi et al., 2021): {key: ndarray}; the audit's
TENSOR_LISTS = ("momentum_vector",)  # FedAvgM (Hsu et al., 2019): [ndarray] in key order
NESTED = ("group_B",)  # FedSA: {profile: {layer: Tensor}}
SCALARS = ("clipping_norm",)  # Flower's adaptive-clipping DP wrappers move the bound
ACCOUNTANTS = ("accountant",)  # fedtune.privacy ClientLevelDP: state_dict() / from_state_dict()


def chain(strategy: object) -> list[object]:
    """The strategy and every strategy it wraps, outermost first."""
    out: list[object] = []
    while strategy is not None and len(out) < 16:
        out.append(strategy)
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return out


def _t(x: Any) -> Tensor:
    return torch.from_numpy(np.array(x, copy=True)) if not isinstance(x, Tensor) else x.detach().cpu().clone()


def strategy_state(strategy: object) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """({'i/attr/key': tensor}, {json-able state}) of the chain."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for i, obj in enumerate(chain(strategy)):
        for attr in TENSOR_DICTS + TENSOR_LISTS + NESTED + SCALARS + ACCOUNTANTS:
            value = getattr(obj, attr, None)
            if value is None:
                continue
            key = f"{i}/{attr}"
            if attr in TENSOR_DICTS:
                tensors.update({f"{key}/{k}": _t(v) for k, v in value.items()})
            elif attr in TENSOR_LISTS:
                tensors.update({f"{key}/{j}": _t(v) for j, v in enumerate(value)})
                meta[key] = len(value)
            elif attr in NESTED:
                tensors.update({f"{key}/{g}/{k}": _t(v) for g, d in value.items() for k, v in d.items()})
                meta[key] = sorted(value)
            elif attr in SCALARS:
                meta[key] = float(value)
            elif hasattr(value, "state_dict"):
                meta[key] = value.state_dict()
    return tensors, meta


def restore_strategy(strategy: object, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Put a saved state back into a freshly built chain of the same configuration."""
    for i, obj in enumerate(chain(strategy)):
        for attr in TENSOR_DICTS:
            prefix = f"{i}/{attr}/"
            found = {k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
            if found:
                setattr(obj, attr, found)
        for attr in TENSOR_LISTS:
            key = f"{i}/{attr}"
            if key in meta:
                setattr(obj, attr, [tensors[f"{key}/{j}"].numpy() for j in range(int(meta[key]))])
        for attr in NESTED:
            key = f"{i}/{attr}"
            if key in meta:
                groups = {g: {} for g in meta[key]}
                for k, v in tensors.items():
                    if k.startswith(key + "/"):
                        g, _, name = k[len(key) + 1:].partition("/")
                        groups[g][name] = v
                setattr(obj, attr, groups)
        for attr in SCALARS:
            if f"{i}/{attr}" in meta:
                setattr(obj, attr, float(meta[f"{i}/{attr}"]))
        for attr in ACCOUNTANTS:
            current = getattr(obj, attr, None)
            if f"{i}/{attr}" in meta and hasattr(current, "state_dict"):
                setattr(obj, attr, type(current).from_state_dict(meta[f"{i}/{attr}"]))
