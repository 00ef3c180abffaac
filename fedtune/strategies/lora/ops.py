"""Shared operations over one layer's client list: validation, weights, zero-padding, exact mean.

All accumulation is float64 in list order (callers sort clients by id), so results are
deterministic; outputs come back in the dtype of the first client's ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.strategies.lora.factors import F64, ClientFactors, LoRAFactors


def check_clients(clients: Sequence[ClientFactors]) -> list[ClientFactors]:
    """Validate one layer's client list: non-empty, same d_in / d_out, positive total weight."""
    clients = list(clients)
    if not clients:
        raise ValueError("empty client list: nothing to aggregate")
    for c in clients:
        if not isinstance(c, ClientFactors):
            raise ValueError(f"expected ClientFactors, got {type(c).__name__}")
    d_in, d_out = clients[0].A.shape[1], clients[0].B.shape[0]
    for i, c in enumerate(clients):
        if c.A.shape[1] != d_in or c.B.shape[0] != d_out:
            raise ValueError(
                f"layer shape mismatch: client {i} has d_out x d_in = {c.B.shape[0]} x {c.A.shape[1]}, "
                f"client 0 has {d_out} x {d_in}"
            )
    if sum(c.weight for c in clients) <= 0:
        raise ValueError("weights sum to zero: at least one client needs a positive weight")
    return clients


def normalized_weights(clients: Sequence[ClientFactors]) -> Tensor:
    """w_i / sum_j w_j as float64 [n]."""
    w = torch.tensor([c.weight for c in check_clients(clients)], dtype=F64)
    return w / w.sum()


def pad_rank(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad A with rows and B with columns up to `rank` (float64): [rank, d_in], [d_out, rank]."""
    r = A.shape[0]
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    A_pad = torch.zeros(rank, A.shape[1], dtype=F64)
    B_pad = torch.zeros(B.shape[0], rank, dtype=F64)
    A_pad[:r], B_pad[:, :r] = A.to(F64), B.to(F64)
    return A_pad, B_pad


def padded_average(clients: Sequence[ClientFactors], weights: Tensor) -> LoRAFactors:
    """sum_i w_i pad(A_i), sum_i w_i pad(B_i), sum_i w_i s_i for normalised weights w: [n]."""
    clients = check_clients(clients)
    if weights.shape != (len(clients),):
        raise ValueError(f"{len(clients)} clients but weights of shape {tuple(weights.shape)}")
    R, dtype = max(c.rank for c in clients), clients[0].A.dtype
    A = torch.zeros(R, clients[0].A.shape[1], dtype=F64)  # [R, d_in]
    B = torch.zeros(clients[0].B.shape[0], R, dtype=F64)  # [d_out, R]
    scale = 0.0
    for c, w in zip(clients, weights.tolist()):
        A_i, B_i = pad_rank(c.A, c.B, R)
        A += w * A_i
        B += w * B_i
        scale += w * c.scale
    return LoRAFactors(A.to(dtype), B.to(dtype), scale)


def exact_mean_delta64(clients: Sequence[ClientFactors]) -> Tensor:
    """sum_i w_i s_i B_i @ A_i, w normalised, kept in float64: [d_out, d_in]."""
    clients = check_clients(clients)
    acc = torch.zeros(clients[0].B.shape[0], clients[0].A.shape[1], dtype=F64)
    for c, w in zip(clients, normalized_weights(clients).tolist()):
        acc += w * c.delta()
    return acc


def exact_mean_delta(clients: Sequence[ClientFactors]) -> Tensor:
    """The target every exact method must hit: sum_i w_i s_i B_i @ A_i, w normalised. [d_out, d_in]."""
    return exact_mean_delta64(clients).to(clients[0].A.dtype)


def slice_to_rank(g: LoRAFactors, rank: int, scale: float) -> LoRAFactors:
    """First `rank` rows of A / columns of B, B rescaled by g.scale / scale, so that
    scale * B' @ A' == g.scale * B[:, :rank] @ A[:rank] (exact when rank >= g.rank).
    Ranks above g.rank are zero-padded."""
    if rank < 1 or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"need rank >= 1 and scale > 0, got rank={rank}, scale={scale}")
    A, B = pad_rank(g.A[:rank], g.B[:, :rank], rank)
    return LoRAFactors(A.to(g.A.dtype), (B * (g.scale / scale)).to(g.B.dtype), scale)
