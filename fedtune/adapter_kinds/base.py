"""The ``AdapterKind`` interface: everything fedtune does differently per adapter kind (issue 15).

An adapter kind (``--set adapter=NAME``) is two halves under one name. The torch-free half,
``fedtune.catalog.AdapterKindInfo``, holds the flags fedtune.compat reads (which strategies
aggregate it, profiles, DP, quantized bases) and the names the federation layer resolves
(``aggregation``: what fedavg runs; ``training``: the client's local run; ``reply``: what a
train reply carries). This half, an :class:`AdapterKind`, is the model-side code: building the
adapter on a frozen base, what a reply states and which shapes it must have, loading a saved
adapter and merging it for export. Defaults fit a dense peft adapter whose trainable state is
sent whole (IA3); LoRA and sparse override what differs.

The trainable state (``trainable_state`` / ``load_trainable_state``, re-exported by
fedtune.modeling) is the wire boundary for every kind: adapter + head, detached CPU copies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedtune.catalog import AdapterKindInfo, adapter_kind
from fedtune.config import ModelConfig

Shapes = dict[str, tuple[int, ...]]


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """{name: tensor} of every trainable parameter (adapter + head), detached copies on the
    CPU: the wire boundary, where tensors leave the model's device."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the trainable parameters; keys and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise ValueError(f"adapter state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"adapter tensor {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
            p.copy_(state[name])


class AdapterKind(ABC):
    """One adapter kind's model-side code; ``name`` is its catalog name."""

    name: str = ""

    @property
    def info(self) -> AdapterKindInfo:
        """The torch-free half (fedtune.catalog): flags and the names other layers resolve."""
        return adapter_kind(self.name)

    # -- building ---------------------------------------------------------------------------
    @abstractmethod
    def build(self, base: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
        """The adapter on ``base`` (frozen, on its device, in its precision). The returned
        model's trainable parameters are the adapter and the head (fedtune.modeling places it)."""

    # -- a train reply ----------------------------------------------------------------------
    def stated_scale(self, model: nn.Module) -> float:
        """The scale a reply states (``wire.SCALE``): 1 for a kind with nothing scaled."""
        return 1.0

    def statement_mismatch(self, m: ModelConfig, rank: int, alpha: float, rslora: bool, scale: float) -> str | None:
        """Why a reply's statements (rank, alpha, rsLoRA, scale) do not fit the run, or None."""
        return None

    def take_entries(self, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
        """{base-delta/LAYER: (idx, values)} trained this round, for a kind whose ``reply`` is
        ``entries`` (taken once); {} for a kind that sends its trainable state."""
        return {}

    def reply_shapes(self, reference: Shapes, sent: Mapping[str, Tensor], layers: int, rank: int,
                     frozen: tuple[str, ...]) -> Shapes:
        """The {name: shape} a client of a profile (``layers``, ``rank``) sends back, given the
        shapes of what the server sends that it replies to (``reference``) and what it was sent.
        Default: every tensor at the shape it was sent."""
        return dict(reference)

    # -- a saved run, export ------------------------------------------------------------------
    def load_saved(self, model: nn.Module, state: dict[str, Tensor]) -> list[str]:
        """Load an adapter saved by ``save_pretrained`` (peft's format) into ``model``; returns
        the keys it did not take."""
        from peft.utils import set_peft_model_state_dict

        return list(set_peft_model_state_dict(model, state).unexpected_keys)

    def merge_for_export(self, model: nn.Module) -> nn.Module:
        """Fold the adapter into the base weights (in place) and return the plain model."""
        return model.merge_and_unload()
