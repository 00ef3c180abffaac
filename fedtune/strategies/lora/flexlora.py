"""FlexLoRA: Bai et al., 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources" (NeurIPS 2024).

The server forms the exact weighted mean of the full updates, sum_i w_i s_i B_i @ A_i, then
gives each client the best rank-r_i approximation of it by truncated SVD (Eckart-Young).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.strategies.lora.factors import F64, ClientFactors, LoRAFactors
from fedtune.strategies.lora.ops import exact_mean_delta


def flexlora(clients: Sequence[ClientFactors]) -> Tensor:
    """Exact aggregated update sum_i w_i s_i B_i @ A_i (w normalised): [d_out, d_in]."""
    return exact_mean_delta(clients)


def flexlora_redistribute(delta: Tensor, rank: int, scale: float) -> LoRAFactors:
    """Factors (A', B') with scale * B' @ A' the best rank-`rank` approximation of delta.

    delta = U S V^T; B' = U_r sqrt(S_r / scale) ([d_out, r]), A' = sqrt(S_r / scale) V_r^T
    ([r, d_in]): singular values split symmetrically. Ranks above min(d_out, d_in) are zero-padded.
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    if rank < 1 or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"need rank >= 1 and scale > 0, got rank={rank}, scale={scale}")
    U, S, Vh = torch.linalg.svd(delta.to(F64), full_matrices=False)  # [d_out, k], [k], [k, d_in]
    k = min(rank, S.shape[0])
    root = torch.sqrt(S[:k] / scale)  # [k]
    A = torch.zeros(rank, delta.shape[1], dtype=F64)
    B = torch.zeros(delta.shape[0], rank, dtype=F64)
    A[:k] = root[:, None] * Vh[:k]
    B[:, :k] = U[:, :k] * root[None, :]
    return LoRAFactors(A.to(delta.dtype), B.to(delta.dtype), scale)


def flexlora_truncation_error(delta: Tensor, factors: LoRAFactors) -> float:
    """||delta - scale * B' @ A'||_F, measured. For flexlora_redistribute's output it equals
    the Frobenius norm of the dropped singular values, sqrt(sum_{j >= r} S_j^2) (Eckart-Young)."""
    return torch.linalg.matrix_norm(delta.to(F64) - factors.delta()).item()
