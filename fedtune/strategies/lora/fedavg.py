"""Naive FedAvg of zero-padded LoRA factors: the baseline the other methods improve on.

McMahan et al., 2017 ("Communication-Efficient Learning of Deep Networks from Decentralized
Data") applied to A and B separately. Averaging the factors is NOT averaging the updates:
s_avg * B_avg @ A_avg != sum_i w_i s_i B_i @ A_i in general (cross terms B_i @ A_j appear),
which is the inexactness FedEx-LoRA, FLoRA and FlexLoRA fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.strategies.lora.factors import ClientFactors, LoRAFactors
from fedtune.strategies.lora.ops import normalized_weights, padded_average


def fedavg(clients: Sequence[ClientFactors]) -> LoRAFactors:
    """Weighted mean of zero-padded A ([R, d_in]), B ([d_out, R]) and scale, R = max rank.

    Weights are the clients' data weights, normalised. Client i gets back
    ``slice_to_rank(result, r_i, s_i)`` (its first r_i components).
    """
    return padded_average(clients, normalized_weights(clients))
