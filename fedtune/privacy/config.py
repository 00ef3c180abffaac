"""Sample-level DP-SGD settings for one client's local training."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.errors import ConfigError
from fedtune.privacy.accountant import ACCOUNTANTS


def _require(ok: bool, key: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"bad value {key}={value!r}: {why}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class DPConfig:
    """Exactly one of ``target_epsilon`` (the noise is calibrated over the whole federation
    plan, and the client stops once the budget is spent) and ``noise_multiplier`` (a fixed
    sigma; epsilon is only reported, nothing stops) must be set."""

    target_epsilon: float | None = None  # total (epsilon, delta) budget of one client over all rounds
    delta: float = 1e-5  # should be well below 1 / (examples on the client)
    noise_multiplier: float | None = None  # sigma: noise std / max-grad-norm; 0 = clipping only, no privacy
    max_grad_norm: float = 1.0  # per-example L2 clipping bound C over all trainable (adapter + head) tensors
    accountant: str = "rdp"  # rdp | prv

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError(
                f"bad value target-epsilon={self.target_epsilon!r}, noise-multiplier={self.noise_multiplier!r}: "
                "set exactly one of the two"
            )
        if self.target_epsilon is not None:
            _require(_is_number(self.target_epsilon) and self.target_epsilon > 0,
                     "target-epsilon", self.target_epsilon, "must be a finite number > 0")
        if self.noise_multiplier is not None:
            _require(_is_number(self.noise_multiplier) and self.noise_multiplier >= 0,
                     "noise-multiplier", self.noise_multiplier, "must be a finite number >= 0")
        _require(_is_number(self.delta) and 0.0 < self.delta < 1.0, "delta", self.delta, "must be in (0, 1)")
        _require(_is_number(self.max_grad_norm) and self.max_grad_norm > 0,
                 "max-grad-norm", self.max_grad_norm, "must be a finite number > 0")
        ACCOUNTANTS.get(self.accountant)  # unknown names raise ConfigError listing the valid ones
