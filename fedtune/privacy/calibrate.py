"""Noise calibration: one sigma for a client's whole federation plan.

The budget (epsilon, delta) covers every round the client may train in, so the noise is
calibrated for ``rounds x local steps per round`` Poisson-subsampled steps at sample rate
``batch_size / n_local``, not for a single round.
"""

from __future__ import annotations

import functools
import math

from opacus.accountants.utils import get_noise_multiplier

from fedtune.config import TrainConfig
from fedtune.errors import ConfigError
from fedtune.privacy.accountant import ACCOUNTANTS
from fedtune.training import num_local_steps


def sample_rate(batch_size: int, n_local: int) -> float:
    """Poisson sampling probability of each local example per step (the expected batch is
    ``batch_size``); capped at 1 when the client has fewer examples than a batch."""
    if n_local < 1:
        raise ValueError("no training examples on this client")
    return min(1.0, batch_size / n_local)


def planned_steps(cfg: TrainConfig, n_local: int, rounds: int) -> int:
    """DP-SGD steps one client takes if it trains in all ``rounds`` rounds."""
    if rounds < 1:
        raise ConfigError(f"bad value rounds={rounds!r}: must be >= 1")
    return rounds * num_local_steps(cfg, n_local)


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
    rel_tolerance: float = 1e-3,
) -> float:
    """The smallest sigma (to ``rel_tolerance`` of epsilon) whose epsilon after ``steps``
    steps at ``sample_rate`` is <= ``target_epsilon``. Deterministic, so every round of a
    client derives the same sigma without storing it."""
    ACCOUNTANTS.get(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"bad value target-epsilon={target_epsilon!r}: must be a finite number > 0")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=rel_tolerance * target_epsilon,
            )
        )
    except ValueError as exc:  # opacus: "The privacy budget is too low."
        raise ConfigError(
            f"bad value target-epsilon={target_epsilon!r}: unreachable at delta={delta}, "
            f"sample rate {sample_rate:.4g} and {steps} steps ({exc})"
        ) from None


def calibrate(
    target_epsilon: float, delta: float, cfg: TrainConfig, n_local: int, rounds: int, accountant: str = "rdp"
) -> float:
    """Sigma for one client with ``n_local`` examples to spend exactly (to 0.1%) its
    ``(target_epsilon, delta)`` budget over ``rounds`` rounds of ``cfg``'s local steps."""
    return noise_multiplier_for(
        float(target_epsilon), float(delta), sample_rate(cfg.batch_size, n_local),
        planned_steps(cfg, n_local, rounds), accountant,
    )
