"""A plugin: a new aggregation strategy for clients of mixed LoRA ranks.

``holder-avg`` averages each rank component over the clients that hold it. Zero-padded
FedAvg (fedtune's ``fedavg`` with profiles) averages the zeros of lower-rank clients into
the higher components, shrinking them by the share of clients that lack them; here
component k of A and B is the example-weighted mean over the clients whose rank is above k
only (HetLoRA, Cho et al., 2024, pads the same way but reweights whole clients instead).

Use it with ``plugins=["my_strategy"], strategy="holder-avg"`` (examples/plugin_strategy.py)
or ``fedtune simulate --set plugins=my_strategy --set strategy=holder-avg``; the module must
be importable (on PYTHONPATH, or installed with a ``fedtune.plugins`` entry point).
"""

from __future__ import annotations

import torch

from fedtune.plugins import ClientFactors, LoRAFactors, StrategyInfo, register_strategy


def holder_avg(clients: list[ClientFactors]) -> LoRAFactors:
    """One layer: A [R, d_in] and B [d_out, R] at the largest rank R, component k the weighted
    mean over the clients with rank > k; the scale is the weighted mean of the clients' scales."""
    R = max(c.rank for c in clients)
    A = torch.zeros(R, clients[0].A.shape[1], dtype=torch.float64)
    B = torch.zeros(clients[0].B.shape[0], R, dtype=torch.float64)
    held = torch.zeros(R, dtype=torch.float64)  # total weight of the clients holding each component
    for c in clients:
        A[: c.rank] += c.weight * c.A.double()
        B[:, : c.rank] += c.weight * c.B.double()
        held[: c.rank] += c.weight
    held = held.clamp(min=1e-12)  # a component whose holders all have weight 0 stays 0
    total = sum(c.weight for c in clients)
    scale = sum(c.weight * c.scale for c in clients) / total
    dtype = clients[0].A.dtype
    return LoRAFactors((A / held[:, None]).to(dtype), (B / held[None, :]).to(dtype), scale)


register_strategy(
    StrategyInfo("holder-avg", rank_aware=True, secagg="it divides each component by the weight of its holders"),
    holder_avg,
)
