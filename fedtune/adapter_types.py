"""Adapter types (``--set adapter=NAME``), one registry: what a client trains on the frozen base.

- ``lora``: peft LoRA (fedtune.modeling builds it);
- ``sparse``: a chosen subset of the targeted base weights' entries (fedtune.sparse).

The registry maps a name to ``build(base, cfg, seed) -> model``; ``lora`` is built by
fedtune.modeling itself (None here). Importing this module stays cheap: no torch, no peft.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedtune import catalog
from fedtune.registry import Registry

ADAPTERS: Registry[Callable[[Any, Any, int], Any] | None] = Registry("adapter")
ADAPTERS.register("lora")(None)


@ADAPTERS.register("sparse")
def _sparse(base: Any, cfg: Any, seed: int) -> Any:
    from fedtune.sparse.layer import attach_sparse

    return attach_sparse(base, cfg)


# The sparse selection rules (registered in fedtune.sparse.select, which needs torch): their
# names live in the catalog, which the config validates against.
SELECTIONS = catalog.SELECTIONS
