"""FedEx-LoRA: Singhal et al., 2024, "Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models" (NAACL 2025).

Average A and B as FedAvg does (zero-padded to the max rank R if ranks differ), and fold the
error of that average into the frozen base weight:
    R_res = sum_i w_i s_i B_i @ A_i - s_avg * B_avg @ A_avg            [d_out, d_in]
so W0 + R_res + s_avg * B_avg @ A_avg equals W0 + the exact mean update. Exactness holds for the
global model; a client of rank r_i < R that keeps only the first r_i components is not exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from fedtune.strategies.lora.factors import ClientFactors, LoRAFactors
from fedtune.strategies.lora.ops import check_clients, exact_mean_delta64, normalized_weights, padded_average


@dataclass(frozen=True, eq=False)
class FedExResult:
    """factors: the averaged adapter sent to clients; residual: [d_out, d_in], added to the base weight."""

    factors: LoRAFactors
    residual: Tensor


def fedex(clients: Sequence[ClientFactors]) -> FedExResult:
    """Averaged factors plus the residual that makes base + residual + s*B@A exact."""
    clients = check_clients(clients)
    factors = padded_average(clients, normalized_weights(clients))
    residual = exact_mean_delta64(clients) - factors.delta()  # float64, against the factors as sent
    return FedExResult(factors, residual.to(clients[0].A.dtype))
