"""What a client does with its adapter, per strategy, beyond "load what the server sent,
train, send the trainable tensors back". Used by the ClientApp and by the server's own model.

- ``ffa`` (FFA-LoRA, Sun et al., 2024): every A is frozen at ``ffa_init_A(seed, layer)``,
  the same on every client and the server; only B (and the head) is trained and sent.
- ``fedsa`` (FedSA-LoRA, Guo et al., 2024): B never comes from the server; each client keeps
  its own B in ``context.state`` between rounds (Flower's per-node state).
- every other strategy: the default (tensors the server does not send, e.g. FLoRA's adapter,
  start from the adapter as built: a fresh adapter).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtune.adapters import A_SUFFIX, set_trainable
from fedtune.catalog import STRATEGIES
from fedtune.strategies.lora import ffa_init_A


@dataclass(frozen=True)
class ClientRecipe:
    frozen: tuple[str, ...] = ()  # adapter parts ('lora_A', 'lora_B') never trained
    local: tuple[str, ...] = ()  # adapter parts that stay on the client between rounds

    def keeps(self, name: str) -> bool:
        """Whether the tensor ``name`` stays local (context.state), never taken from the server."""
        return any(f".{part}." in name for part in self.local)

    def prepare(self, model: nn.Module, initial: Mapping[str, Tensor], seed: int) -> None:
        """Set which of the model's adapter/head tensors train, and their strategy-given values
        (idempotent: a process's cached model may have served another strategy or client before)."""
        set_trainable(model, [n for n in initial if not any(f".{part}." in n for part in self.frozen)])
        self.initialize(model, seed)

    def initialize(self, model: nn.Module, seed: int) -> None:
        """Write the tensors the strategy fixes (none by default). The server calls only this:
        its global state keeps every tensor, frozen on clients or not."""


@functools.lru_cache(maxsize=256)
def _shared_A(seed: int, layer: str, rank: int, d_in: int) -> Tensor:
    return ffa_init_A(seed, layer, rank, d_in)


@dataclass(frozen=True)
class SharedFrozenA(ClientRecipe):
    """FFA-LoRA: A := the seeded shared A, frozen (requires_grad False)."""

    frozen: tuple[str, ...] = ("lora_A",)

    def initialize(self, model: nn.Module, seed: int) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(A_SUFFIX):
                    p.copy_(shared_A(seed, name[: -len(A_SUFFIX)], p.shape[0], p.shape[1]).to(p.dtype))


def shared_A(seed: int, layer: str, rank: int, d_in: int) -> Tensor:
    """FFA-LoRA's frozen A of ``layer``: [rank, d_in]; a rank-r A is the first r rows of any larger one."""
    return _shared_A(seed, layer, rank, d_in)


# The recipe kinds; each strategy names its own in the catalog (StrategyInfo.client).
RECIPES: dict[str, ClientRecipe] = {"plain": ClientRecipe(), "shared-frozen-A": SharedFrozenA(),
                                    "local-B": ClientRecipe(local=("lora_B",))}


def recipe_for(strategy: str) -> ClientRecipe:
    """The client recipe the catalog names for ``strategy`` (plain for a name it does not know)."""
    info = STRATEGIES.get(strategy)
    return RECIPES[info.client if info else "plain"]
