"""Differential privacy for local training.

Sample-level DP-SGD on the adapter (this package): each client's training examples are
protected by per-example clipping and Gaussian noise, with a per-client accountant whose
state survives rounds and restarts. Client-level DP (noise on the aggregated updates) is
configured on the server strategy instead; see docs/privacy.md.

(``calibrate``, the function, is imported from ``fedtune.privacy.calibrate``: once that
submodule is loaded, the package attribute of the same name is the module.) Names are imported on first use, so ``fedtune.privacy.config`` stays cheap to import
(opacus, torch and transformers load only with the training code).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ACCOUNTANTS": "accountant",
    "PrivacyAccountant": "accountant",
    "noise_multiplier_for": "calibrate",
    "planned_steps": "calibrate",
    "sample_rate": "calibrate",
    "DPConfig": "config",
    "LogitsModule": "dp_train",
    "noise_multiplier": "dp_train",
    "train_local_dp": "dp_train",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from fedtune.privacy.accountant import ACCOUNTANTS, PrivacyAccountant
    from fedtune.privacy.calibrate import noise_multiplier_for, planned_steps, sample_rate
    from fedtune.privacy.config import DPConfig
    from fedtune.privacy.dp_train import LogitsModule, noise_multiplier, train_local_dp


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
