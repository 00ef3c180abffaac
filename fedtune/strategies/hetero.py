"""The seven heterogeneous-rank LoRA strategies: thin layers over ``fedtune.strategies.lora``.

See docs/strategies.md for what each one sends and computes. Every class aggregates one
layer at a time (``combine``); the per-node messages, the stated-rank checks and the head
average are ``RankAware``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedtune.adapters import B_SUFFIX, split
from fedtune.profiles import Profile
import fedtune.strategies.lora as L
from fedtune.strategies.aggregation import weighted_mean
from fedtune.strategies.lora import ClientFactors, LoRAFactors
from fedtune.strategies.rank_aware import GlobalState, RankAware, Update
from fedtune.catalog import STRATEGIES
from fedtune.strategies.recipes import recipe_for

F64 = torch.float64


class RankFedAvg(RankAware):
    """Zero-padded FedAvg of A and B (McMahan et al., 2017): the inexact baseline."""

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        return L.fedavg(clients), None


class HetLoRA(RankAware):
    """HetLoRA (Cho et al., 2024): zero-padding, aggregation weighted by ||B_i A_i||_F."""

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        return L.hetlora(clients), None


class FlexLoRA(RankAware):
    """FlexLoRA (Bai et al., 2024): the exact mean of the clients' full updates, redistributed
    to each client as its best rank-r_i approximation (truncated SVD). The server keeps the
    exact update as its rank-R truncation plus the residual in ``base`` (server-side only)."""

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        delta = L.flexlora(clients)
        top = L.flexlora_redistribute(delta, self.rank, self.scale)
        return top, (delta.to(F64) - top.delta()).to(delta.dtype)

    def client_factors(self, g: GlobalState, layer: str, rank: int, scale: float) -> LoRAFactors:
        if layer not in g.base:  # before the first aggregation: the initial adapter, sliced
            return super().client_factors(g, layer, rank, scale)
        parts = split(g.trainable)[0][layer]
        dense = g.base[layer].to(F64) + self.scale * (parts["B"].to(F64) @ parts["A"].to(F64))
        return L.flexlora_redistribute(dense, rank, scale)


class FLoRA(RankAware):
    """FLoRA (Wang et al., 2024): stacking gives the exact sum of the clients' updates; it is
    merged into every base weight and clients restart from fresh adapters each round."""

    sends = STRATEGIES["flora"].sends  # (): clients train a fresh adapter; only the head and the base deltas go down
    rewrites = ("B",)  # the global adapter is reset: B = 0 (A, unused, stays as built)

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        delta = L.flora(clients)
        parts = split(g.trainable)[0][layer]
        fresh = LoRAFactors(parts["A"], torch.zeros_like(parts["B"]), self.scale)
        return fresh, delta if layer not in g.base else g.base[layer] + delta

    def shared_base(self, g: GlobalState) -> dict[str, Tensor]:
        return g.base


class FedExLoRA(RankAware):
    """FedEx-LoRA (Singhal et al., 2024): FedAvg of A and B plus the residual that makes the
    global exact, folded into every client's base weight."""

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        res = L.fedex(clients)
        return res.factors, res.residual if layer not in g.base else g.base[layer] + res.residual

    def shared_base(self, g: GlobalState) -> dict[str, Tensor]:
        return g.base


class FFALoRA(RankAware):
    """FFA-LoRA (Sun et al., 2024): A frozen at a shared seeded init, only B trained and sent."""

    recipe = recipe_for("ffa")
    sends = STRATEGIES["ffa"].sends  # ("B",)
    rewrites = ("B",)  # A is the shared frozen A: never replaced (nor zero-padded)

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        return L.ffa(clients), None


class FedSALoRA(RankAware):
    """FedSA-LoRA (Guo et al., 2024): only A is aggregated and sent; each client keeps its own
    B. The server's *global* model (for evaluation only) uses the weighted mean of the
    clients' B; a profile's group model uses its own clients' mean B."""

    recipe = recipe_for("fedsa")
    sends = STRATEGIES["fedsa"].sends  # ("A",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_B: dict[str, dict[str, Tensor]] = {}  # {profile: {layer: mean B [d_out, r]}}

    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        A, _ = L.fedsa(clients)
        mean = L.fedavg(clients)  # B and scale: for the server's evaluation only
        return LoRAFactors(A, mean.B, mean.scale), None

    def after_aggregate(self, updates: list[Update]) -> None:
        for name in sorted({u.profile.name for u in updates}):
            group = [u for u in updates if u.profile.name == name]
            Bs = [{k: f.B for k, f in u.layers.items()} for u in group]
            self.group_B[name] = weighted_mean(Bs, [u.weight for u in group])

    def group_view(self, g: GlobalState, profile: Profile) -> dict[str, Tensor]:
        view = self.view(g, profile)
        for layer, B in self.group_B.get(profile.name, {}).items():
            view[layer + B_SUFFIX] = B
        return view
