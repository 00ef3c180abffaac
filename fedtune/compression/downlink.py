"""The server-to-client direction of a sparse run: the global sparse delta as its nonzero entries.

The global delta of a sparse adapter is zero outside the union of the clients' masks, so the
server sends each ``base-delta/LAYER`` as ``NAME|idx`` (int32 flat indices of the nonzero
entries), ``NAME|val`` (float32) and ``NAME|shape`` (int64), instead of the dense [d_out, d_in]
tensor. ``densify`` is the exact inverse (and passes a plain dense state through unchanged);
clients apply it to every message they receive, the ``decode`` screen to ``sent``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fedtune import wire
from fedtune.compression.codecs import check_indices, scatter
from fedtune.compression.sparse_wire import SEP


def sparsify(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Base deltas as (idx, val, shape); every other tensor unchanged (idempotent)."""
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if not name.startswith(wire.BASE) or SEP in name:
            out[name] = t
            continue
        flat = t.flatten()
        idx = flat.nonzero().flatten()  # [nnz]
        out[f"{name}{SEP}idx"] = idx.to(torch.int32)
        out[f"{name}{SEP}val"] = flat[idx].float()
        out[f"{name}{SEP}shape"] = torch.tensor(t.shape, dtype=torch.int64)
    return out


def densify(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``sparsify`` (ValueError on an inconsistent payload)."""
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        name, sep, part = key.partition(SEP)
        if sep:
            parts.setdefault(name, {})[part] = t
        else:
            out[key] = t
    for name, p in parts.items():
        if set(p) != {"idx", "val", "shape"} or p["shape"].dtype != torch.int64 or p["shape"].dim() != 1:
            raise ValueError(f"{name}: a sparse tensor needs idx, val and an int64 shape, got {sorted(p)}")
        shape = tuple(int(s) for s in p["shape"])
        if any(s < 0 for s in shape):
            raise ValueError(f"{name}: bad shape {shape}")
        check_indices(p["idx"], math.prod(shape))
        if p["val"].shape != p["idx"].shape or p["val"].dtype != torch.float32:
            raise ValueError(f"{name}: {p['val'].numel()} float32 values expected for {p['idx'].numel()} indices")
        out[name] = scatter(shape, p["idx"], p["val"])
    return out
