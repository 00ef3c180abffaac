"""HetLoRA: Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models" (EMNLP 2024).

Zero-padding of heterogeneous-rank factors to the max rank, sparsity-weighted aggregation
(weights proportional to ||B_i @ A_i||_F), and local rank self-pruning. Redistribution: client i
takes the first r_i rows of A / columns of B: ``slice_to_rank(global, r_i, s_i)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.strategies.lora.factors import F64, ClientFactors, LoRAFactors, check_pair
from fedtune.strategies.lora.ops import check_clients, padded_average


def hetlora_weights(clients: Sequence[ClientFactors]) -> Tensor:
    """w_i proportional to weight_i * ||B_i @ A_i||_F (the unscaled product, as in the paper), normalised.

    Falls back to the data weights when every product is zero (e.g. B initialised at zero). [n], float64.
    """
    clients = check_clients(clients)
    data = torch.tensor([c.weight for c in clients], dtype=F64)
    norms = torch.stack([torch.linalg.matrix_norm(c.B.to(F64) @ c.A.to(F64)) for c in clients])
    w = data * norms
    if w.sum() <= 0:
        w = data
    return w / w.sum()


def hetlora(clients: Sequence[ClientFactors]) -> LoRAFactors:
    """Sparsity-weighted mean of zero-padded A ([R, d_in]), B ([d_out, R]) and scale, R = max rank."""
    return padded_average(clients, hetlora_weights(clients))


def hetlora_prune_rank(A: Tensor, B: Tensor, gamma: float, min_rank: int = 1) -> int:
    """Rank self-pruning: drop trailing components j (from the last one down) while the norm of
    their rank-1 term, ||B[:, j] A[j, :]||_F = ||B[:, j]|| * ||A[j, :]||, is below `gamma`.

    A: [r, d_in], B: [d_out, r]. Returns the pruned rank (>= min_rank); the client keeps
    A[:rank] and B[:, :rank].
    """
    check_pair(A, B)
    if gamma < 0 or min_rank < 1:
        raise ValueError(f"need gamma >= 0 and min_rank >= 1, got gamma={gamma}, min_rank={min_rank}")
    norms = torch.linalg.vector_norm(B.to(F64), dim=0) * torch.linalg.vector_norm(A.to(F64), dim=1)  # [r]
    rank = A.shape[0]
    while rank > min_rank and norms[rank - 1].item() < gamma:
        rank -= 1
    return rank
