"""``adapter=sparse``: chosen entries of the targeted base weights (SpIEL, Ansell et al., 2024).

The code lives in fedtune.sparse (the layer, the selection rules, the local run) and
fedtune.strategies.sparse (the mask-aware mean); this is its ``AdapterKind``: a reply carries the
trained entries (indices + values), and their dense deltas come back as base deltas."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from fedtune import wire
from fedtune.adapter_kinds.base import AdapterKind, Shapes, load_trainable_state
from fedtune.config import ModelConfig


class Sparse(AdapterKind):
    name = "sparse"

    def build(self, base: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
        from fedtune.sparse.layer import attach_sparse

        return attach_sparse(base, cfg)

    def take_entries(self, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
        entries = getattr(model, "last_update", None) or {}
        if not entries:
            raise RuntimeError("a sparse adapter's reply needs its trained entries: train with fedtune.sparse.train")
        model.last_update = None  # used once
        return entries

    def reply_shapes(self, reference: Shapes, sent: Mapping[str, Tensor], layers: int, rank: int,
                     frozen: tuple[str, ...]) -> Shapes:
        """The head, and the decode screen's dense sparse deltas (fedtune.compression)."""
        return {**reference, **{k: tuple(t.shape) for k, t in sent.items() if k.startswith(wire.BASE)}}

    def load_saved(self, model: nn.Module, state: dict[str, Tensor]) -> list[str]:
        """The head; the sparse delta is in the base deltas (fedtune.sparse)."""
        load_trainable_state(model, state)
        return []


KIND = Sparse()
