"""FedSA-LoRA: Guo et al., 2024, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning" (ICLR 2025).

A learns general knowledge and is shared; B learns client-specific knowledge and is NOT
aggregated: the server averages only A, and each client keeps its own B (and scale) across
rounds, replacing only its A with the first r_i rows of the global A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.strategies.lora.factors import F64, ClientFactors
from fedtune.strategies.lora.ops import check_clients, normalized_weights


def fedsa(clients: Sequence[ClientFactors]) -> tuple[Tensor, None]:
    """(A_avg, None): A_avg = sum_i w_i pad(A_i), [R, d_in], R = max rank (zero rows pad); B stays local.

    Client i sets A_i <- A_avg[:r_i] and keeps its B_i. The B_i sent here are ignored.
    """
    clients = check_clients(clients)
    R = max(c.rank for c in clients)
    A = torch.zeros(R, clients[0].A.shape[1], dtype=F64)  # [R, d_in]
    for c, w in zip(clients, normalized_weights(clients).tolist()):
        A[: c.rank] += w * c.A.to(F64)
    return A.to(clients[0].A.dtype), None
