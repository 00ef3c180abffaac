"""FLoRA: Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations" (NeurIPS 2024).

Stacking: A_stack = concat_i A_i along the rank ([sum r_i, d_in]), B_stack = concat_i w_i s_i B_i
([d_out, sum r_i]), so B_stack @ A_stack == sum_i w_i s_i B_i @ A_i exactly, whatever the ranks.
The server merges that dense update into the base weight and clients start fresh adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.strategies.lora.factors import F64, ClientFactors
from fedtune.strategies.lora.ops import check_clients, normalized_weights


def flora_stack(clients: Sequence[ClientFactors]) -> tuple[Tensor, Tensor]:
    """(A_stack [sum r_i, d_in], B_stack [d_out, sum r_i]), client order kept, float64."""
    clients = check_clients(clients)
    w = normalized_weights(clients).tolist()
    A_stack = torch.cat([c.A.to(F64) for c in clients], dim=0)
    B_stack = torch.cat([(wi * c.scale) * c.B.to(F64) for c, wi in zip(clients, w)], dim=1)
    return A_stack, B_stack


def flora(clients: Sequence[ClientFactors]) -> Tensor:
    """Dense update B_stack @ A_stack = sum_i w_i s_i B_i @ A_i to add to the base weight: [d_out, d_in]."""
    A_stack, B_stack = flora_stack(clients)
    return (B_stack @ A_stack).to(clients[0].A.dtype)
