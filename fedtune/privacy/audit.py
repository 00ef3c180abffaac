"""One-shot empirical privacy estimation: the math (Andrew et al., ICLR 2024, "One-shot
Empirical Privacy Estimation for Federated Learning").

K canary clients each send, whenever sampled, C times their own fixed random unit direction
c_i (C: the clipping norm). After training, the cosines cos(c_i, delta) between the final
model delta and the K inserted directions are compared with the cosines for K directions
that were never inserted. In high dimension the never-inserted cosines are ~ N(0, 1/d); the
paper fits a Gaussian to each set and reports the epsilon at the run's delta of the pair of
Gaussians N(mu_null, s_null^2) vs N(mu_obs, s_obs^2): the privacy of a Gaussian mechanism
that an adversary, seeing only the final model, faces for one client (here with the two
Gaussians' variances pooled: see ``estimate``). It is an *estimate*
(not a bound) for the final-model threat model: it should sit at or below the accountant's
epsilon, which covers every intermediate model too.

Here: ``gaussian_delta`` is the exact delta(epsilon) of two Gaussians of any variances (the
region where the log-likelihood ratio exceeds epsilon is where a quadratic is positive),
``epsilon_of`` inverts it, ``estimate`` fits the two sets and adds a bootstrap confidence
interval over the canaries. ``direction`` / ``cosines`` rebuild each canary's direction from
its seed, so K directions cost O(d) memory, not O(K d).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

_EPS_MAX = 100.0  # an estimate this large means "no measurable privacy"; reported as is


def _region_prob(intervals: list[tuple[float, float]], mu: float, s: float) -> float:
    return float(sum(norm.cdf(b, mu, s) - norm.cdf(a, mu, s) for a, b in intervals))


def _one_way_delta(eps: float, mu_p: float, s_p: float, mu_q: float, s_q: float) -> float:
    """sup_S P(S) - e^eps Q(S) for P = N(mu_p, s_p^2), Q = N(mu_q, s_q^2): S = {log p/q > eps}."""
    # log p(x) - log q(x) - eps = a x^2 + b x + c
    a = 1 / (2 * s_q**2) - 1 / (2 * s_p**2)
    b = mu_p / s_p**2 - mu_q / s_q**2
    c = mu_q**2 / (2 * s_q**2) - mu_p**2 / (2 * s_p**2) + math.log(s_q / s_p) - eps
    inf = math.inf
    if abs(a) < 1e-12 * max(abs(b), 1e-300):  # equal variances: a half-line
        if b == 0:
            intervals = [(-inf, inf)] if c > 0 else []
        else:
            x0 = -c / b
            intervals = [(x0, inf)] if b > 0 else [(-inf, x0)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            intervals = [(-inf, inf)] if a > 0 else []
        else:
            r = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
            intervals = [(-inf, r[0]), (r[1], inf)] if a > 0 else [(r[0], r[1])]
    if not intervals:
        return 0.0
    return max(0.0, _region_prob(intervals, mu_p, s_p) - math.exp(eps) * _region_prob(intervals, mu_q, s_q))


def gaussian_delta(eps: float, mu0: float, s0: float, mu1: float, s1: float) -> float:
    """delta(eps) of the pair N(mu0, s0^2), N(mu1, s1^2), both orders (a mechanism's neighbours
    are symmetric). Equal variances: Balle & Wang's (2018) Phi(-eps/m + m/2) - e^eps Phi(-eps/m - m/2)
    with m = |mu1 - mu0| / s."""
    return max(_one_way_delta(eps, mu1, s1, mu0, s0), _one_way_delta(eps, mu0, s0, mu1, s1))


def epsilon_of(delta: float, mu0: float, s0: float, mu1: float, s1: float) -> float:
    """The smallest epsilon with gaussian_delta(epsilon) <= delta (bisection; capped at 100)."""
    if gaussian_delta(0.0, mu0, s0, mu1, s1) <= delta:
        return 0.0
    if gaussian_delta(_EPS_MAX, mu0, s0, mu1, s1) > delta:
        return _EPS_MAX
    lo, hi = 0.0, _EPS_MAX
    for _ in range(80):
        mid = (lo + hi) / 2
        if gaussian_delta(mid, mu0, s0, mu1, s1) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class AuditResult:
    """``epsilon`` (the point estimate) with its bootstrap interval [low, high] at ``confidence``,
    and the two fitted Gaussians."""

    epsilon: float
    low: float
    high: float
    confidence: float
    mu_observed: float
    sd_observed: float
    mu_null: float
    sd_null: float
    canaries: int

    def metrics(self, prefix: str = "epsilon_audit") -> dict[str, float]:
        return {prefix: self.epsilon, f"{prefix}_low": self.low, f"{prefix}_high": self.high,
                "audit_canaries": float(self.canaries),
                **{f"audit_{k}": float(v) for k, v in asdict(self).items()
                   if k in ("mu_observed", "sd_observed", "mu_null", "sd_null")}}


def separation(observed: np.ndarray, null: np.ndarray) -> float:
    """mu = (mean observed - mean null) / pooled standard deviation: the fitted Gaussians' means
    apart in units of their common spread."""
    s2 = (np.var(observed, ddof=1) + np.var(null, ddof=1)) / 2
    return float((np.mean(observed) - np.mean(null)) / max(math.sqrt(s2), 1e-300))


def estimate(observed: Sequence[float], null: Sequence[float], delta: float, *, confidence: float = 0.95,
             bootstrap: int = 1000, seed: int = 0) -> AuditResult:
    """Epsilon at ``delta`` from the cosines of the inserted (``observed``) and never-inserted
    (``null``) canaries, with a percentile bootstrap interval over the canaries.

    A Gaussian is fitted to each set and the two are given their pooled variance: under the
    Gaussian mechanism both sets carry the same noise (an inserted canary's cosine is the null
    one shifted by its own contribution), and at delta = 1e-5 the tails of two Gaussians of
    slightly different fitted variances dominate epsilon, so the free-variance fit
    (``gaussian_delta`` takes any variances) overshoots by a factor 2 with 500 canaries. The
    estimate is then the epsilon of the Gaussian mechanism with mu = ``separation``, which is
    monotone in mu, so the interval is the epsilon of mu's bootstrap percentiles."""
    obs, nul = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64)
    if len(obs) < 2 or len(nul) < 2:
        raise ValueError("the audit needs at least 2 inserted and 2 never-inserted canaries")
    mu = separation(obs, nul)
    rng = np.random.default_rng(seed)
    bo = obs[rng.integers(0, len(obs), (bootstrap, len(obs)))]
    bn = nul[rng.integers(0, len(nul), (bootstrap, len(nul)))]
    s2 = (bo.var(axis=1, ddof=1) + bn.var(axis=1, ddof=1)) / 2
    mus = (bo.mean(axis=1) - bn.mean(axis=1)) / np.sqrt(np.maximum(s2, 1e-300))
    tail = (1 - confidence) / 2 * 100
    eps = lambda m: epsilon_of(delta, 0.0, 1.0, max(float(m), 0.0), 1.0)  # noqa: E731
    return AuditResult(eps(mu), eps(np.percentile(mus, tail)), eps(np.percentile(mus, 100 - tail)), confidence,
                       float(np.mean(obs)), float(np.std(obs, ddof=1)), float(np.mean(nul)), float(np.std(nul, ddof=1)),
                       len(obs))


# -- canary directions -------------------------------------------------------------------------


def direction(seed: int, index: int, dim: int) -> Tensor:
    """Canary ``index``'s fixed random unit direction in R^dim (float64), rebuilt from ``seed``."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    return v / v.norm()


def cosines(vector: Tensor, seed: int, indices: Iterable[int]) -> list[float]:
    """cos(direction(i), vector) for each canary index."""
    v = vector.double().flatten()
    n = float(v.norm())
    if n == 0:
        return [0.0 for _ in indices]
    return [float(direction(seed, i, v.numel()) @ v) / n for i in indices]
