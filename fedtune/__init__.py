"""fedtune: federated and edge fine-tuning of low-rank adapters with Flower.

The public API (docs/api.md)::

    import fedtune
    run = fedtune.simulate(preset="quick", rounds=2)    # the run directory, as a Run
    run.metrics[-1]["accuracy"], run.summary, run.config
    fedtune.export(run, "edge/")                       # ONNX, verified
    fedtune.EdgeClassifier("edge/").predict(["some text"])

Importing ``fedtune`` is cheap: the functions load torch and Flower when first used.
Plugins (your own strategy, dataset, model, adapter kind) register through ``fedtune.plugins``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError
from fedtune.version import __version__

__all__ = ["ConfigError", "EdgeClassifier", "EdgeGenerator", "Run", "__version__", "centralized", "export",
           "load_run", "simulate"]

_API = ("simulate", "centralized", "export", "load_run", "Run")

if TYPE_CHECKING:
    from fedtune.api import Run, centralized, export, load_run, simulate
    from fedtune.edge_export.generator import EdgeGenerator
    from fedtune.edge_export.runtime import EdgeClassifier


def __getattr__(name: str) -> Any:
    """The API on first use (``import fedtune`` and ``import fedtune.config`` load no torch, no flwr)."""
    if name in _API:
        from fedtune import api

        value = getattr(api, name)
    elif name == "EdgeClassifier":
        from fedtune.edge_export.runtime import EdgeClassifier as value
    elif name == "EdgeGenerator":
        from fedtune.edge_export.generator import EdgeGenerator as value
    else:
        raise AttributeError(f"module 'fedtune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
