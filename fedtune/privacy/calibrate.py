"""Noise calibration: one sigma for a client's whole federation plan.

The budget (epsilon, delta) covers every round the client may train in, so the noise is
calibrated for ``rounds x local steps per round`` Poisson-subsampled steps at sample rate
``batch_size / n_local``, not for a single round, composed (in the accountant, not by adding
epsilons) with any release planned before training: the DP FedNCM head (``prior``).
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


Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as in the accountant


def epsilon_of(history: tuple[Entry, ...], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a composed history, from a fresh accountant (no state kept)."""
    from fedtune.privacy.accountant import PrivacyAccountant

    state = {"mechanism": accountant, "history": [[float(s), float(q), int(t)] for s, q, t in history]}
    return PrivacyAccountant.from_state_dict(state).epsilon(delta)


@functools.lru_cache(maxsize=64)
def noise_multiplier_after(
    prior: tuple[Entry, ...], target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str = "rdp", rel_tolerance: float = 1e-3,
) -> float:
    """The smallest sigma (to ``rel_tolerance`` of epsilon, by bisection as opacus'
    ``get_noise_multiplier``) such that ``prior`` followed by ``steps`` steps at
    (sigma, ``sample_rate``) spends at most ``target_epsilon``."""
    if not prior:
        return noise_multiplier_for(target_epsilon, delta, sample_rate, steps, accountant, rel_tolerance)
    spent = epsilon_of(prior, delta, accountant)
    if spent >= target_epsilon:
        raise ConfigError(
            f"bad value target-epsilon={target_epsilon!r}: the releases before training already spend "
            f"{spent:.3g} at delta={delta}; raise target-epsilon or lower dp-head-share"
        )

    def eps(sigma: float) -> float:
        return epsilon_of((*prior, (sigma, sample_rate, steps)), delta, accountant)

    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ConfigError(f"bad value target-epsilon={target_epsilon!r}: unreachable after the head release")
    while target_epsilon - eps(hi) > rel_tolerance * target_epsilon:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


def calibrate(
    target_epsilon: float, delta: float, cfg: TrainConfig, n_local: int, rounds: int, accountant: str = "rdp",
    prior: tuple[Entry, ...] = (),
) -> float:
    """Sigma for one client with ``n_local`` examples to spend exactly (to 0.1%) its
    ``(target_epsilon, delta)`` budget over ``prior`` and ``rounds`` rounds of ``cfg``'s local steps."""
    return noise_multiplier_after(
        tuple(prior), float(target_epsilon), float(delta), sample_rate(cfg.batch_size, n_local),
        planned_steps(cfg, n_local, rounds), accountant,
    )
