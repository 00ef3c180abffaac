"""The one-shot privacy audit's math (fedtune.privacy.audit; Andrew et al., ICLR 2024) on
problems whose true epsilon is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedtune.privacy.audit import cosines, direction, epsilon_of, estimate, gaussian_delta

DELTA = 1e-5


def balle_wang(eps: float, mu: float) -> float:
    """delta(eps) of the Gaussian mechanism N(0, 1) vs N(mu, 1) (Balle & Wang, 2018, Thm. 8)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("eps", [0.1, 1.0, 4.0])
def test_gaussian_delta_is_the_analytic_gaussian_mechanism(mu, eps):
    want = balle_wang(eps, mu)
    assert gaussian_delta(eps, 0.0, 1.0, mu, 1.0) == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert gaussian_delta(eps, 5.0, 2.0, 5.0 + 2 * mu, 2.0) == pytest.approx(want, rel=1e-9, abs=1e-15)  # shift, scale


def test_gaussian_delta_with_unequal_variances():
    """N(0, 1) vs N(0, 4): the region {log p/q > eps} is two tails; checked by numerical integration."""
    eps = 0.5
    x = np.linspace(-40, 40, 2_000_001)
    p, q = norm.pdf(x, 0, 2), norm.pdf(x, 0, 1)
    want = max(np.trapezoid(np.maximum(p - math.exp(eps) * q, 0), x), np.trapezoid(np.maximum(q - math.exp(eps) * p, 0), x))
    assert gaussian_delta(eps, 0.0, 1.0, 0.0, 2.0) == pytest.approx(want, rel=1e-6)


def test_epsilon_of_inverts_delta():
    for mu in (0.5, 1.0, 2.0):
        eps = epsilon_of(DELTA, 0.0, 1.0, mu, 1.0)
        assert balle_wang(eps, mu) == pytest.approx(DELTA, rel=1e-6)
    assert epsilon_of(DELTA, 0.0, 1.0, 0.0, 1.0) == 0.0


def test_directions_are_fixed_unit_and_nearly_orthogonal():
    a, b = direction(3, 0, 10_000), direction(3, 1, 10_000)
    assert torch.equal(a, direction(3, 0, 10_000)) and float(a.norm()) == pytest.approx(1.0)
    assert abs(float(a @ b)) < 5 / math.sqrt(10_000)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_the_audit_recovers_a_known_gaussian_mechanism(mu):
    """The release is sum of K inserted canaries (unit, sensitivity 1) + N(0, sigma^2 I), sigma = 1/mu:
    each canary faces a Gaussian mechanism of known epsilon. With 500 + 500 canaries in d = 50,000
    the estimate lands within 20% of the true epsilon, and the true epsilon is inside its 95% interval."""
    k, d, seed = 500, 50_000, 11
    g = torch.Generator().manual_seed(int(mu * 100))
    release = torch.randn(d, generator=g, dtype=torch.float64) / mu
    for i in range(k):
        release += direction(seed, i, d)
    res = estimate(cosines(release, seed, range(k)), cosines(release, seed, range(k, 2 * k)), DELTA)
    true = epsilon_of(DELTA, 0.0, 1.0, mu, 1.0)  # 1.99, 4.38, 10.0
    assert res.epsilon == pytest.approx(true, rel=0.2), (res, true)
    assert res.low <= true <= res.high, (res, true)


def test_without_noise_the_audit_is_large_and_with_only_noise_it_is_small():
    k, d, seed = 200, 20_000, 5
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(d, generator=g, dtype=torch.float64) * 0.05  # the real clients' updates, not noise
    no_dp = signal + sum(direction(seed, i, d) for i in range(k))
    res = estimate(cosines(no_dp, seed, range(k)), cosines(no_dp, seed, range(k, 2 * k)), DELTA)
    assert res.epsilon > 30
    only_noise = torch.randn(d, generator=g, dtype=torch.float64) * 100.0  # canaries drowned (mu = 0.01)
    only_noise += sum(direction(seed, i, d) for i in range(k))
    res = estimate(cosines(only_noise, seed, range(k)), cosines(only_noise, seed, range(k, 2 * k)), DELTA)
    assert res.epsilon < 0.5 and res.low == 0.0
