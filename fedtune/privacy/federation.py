"""The server side of DP in the federation: strategy wrappers chosen by ``dp``.

``wrap_privacy(strategy, cfg)`` composes around whatever ``build_strategy`` built (wrapping,
never subclassing), and ``Metered`` goes around the result (it stays the outermost wrapper,
so it meters exactly what crosses the wire):

    dp=none             strategy                                             (unchanged)
    dp=sample           SampleLevelDP(strategy)
    dp=client-fixed     ClientLevelDP(DifferentialPrivacy{Server,Client}SideFixedClipping(UniformWeights(strategy)))
    dp=client-adaptive  ClientLevelDP(DifferentialPrivacy{Server,Client}SideAdaptiveClipping(UniformWeights(strategy)))
    audit-canaries=K    CanaryAudit(any of the above, dp=sample excepted)   (fedtune.privacy.canaries)

``SampleLevelDP`` leaves out of the aggregation the clients whose budget is spent (they did
not train; their reply carries the weights they received, with weight 0), and reports per
round ``epsilon`` (the largest over the clients that replied) and ``epsilon_client_<id>``.

``ClientLevelDP`` keeps the federation's accountant: each released aggregate is one step of
a subsampled Gaussian mechanism with noise multiplier z and sample rate q = m / N (m clients
sampled of N), composed with opacus' RDP (or PRV) accountant; it reports ``epsilon`` per round.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import wire
from fedtune.errors import ConfigError
from fedtune.privacy.accountant import PrivacyAccountant
from fedtune.privacy.rules import num_sampled_clients

if TYPE_CHECKING:
    from fedtune.config import RunConfig

EPSILON = "epsilon"
SPENT = "budget_exhausted"
TrainResult = tuple[ArrayRecord | None, MetricRecord | None]
# Per-client reply keys that SampleLevelDP replaces with per-round summaries.
_CLIENT_DP_KEYS = ("epsilon", "budget_exhausted", "noise_multiplier", "sample_rate", "delta")


class _Delegate(Strategy):
    """Passes the five strategy calls to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _client_id(m: Message) -> int:
    return int(m.content[wire.METRICS][wire.CLIENT_ID])


# -- sample-level ----------------------------------------------------------------------------


class SampleLevelDP(_Delegate):
    """dp=sample on the server: drop spent clients from the aggregate, report epsilon."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        replies = list(replies)
        ok = sorted((m for m in replies if not m.has_error()), key=_client_id)
        eps = {_client_id(m): float(m.content[wire.METRICS][EPSILON])
               for m in ok if EPSILON in m.content[wire.METRICS]}
        spent = [_client_id(m) for m in ok if m.content[wire.METRICS].get(SPENT, 0)]
        keep = [m for m in replies if m.has_error() or _client_id(m) not in spent]
        arrays, metrics = (None, None)
        if any(not m.has_error() for m in keep):
            arrays, metrics = self.inner.aggregate_train(server_round, keep)
        out: dict = {k: v for k, v in dict(metrics or {}).items() if k not in _CLIENT_DP_KEYS}
        if eps:
            out[EPSILON] = max(eps.values())
            out.update({f"epsilon_client_{c}": e for c, e in sorted(eps.items())})
        out[SPENT] = len(spent)  # clients that stopped this round (their update is not averaged in)
        if spent:
            out["budget_exhausted_clients"] = spent
        out["clients_trained"] = len(ok) - len(spent)
        return arrays, MetricRecord(out)


# -- client-level ----------------------------------------------------------------------------


class UniformWeights(_Delegate):
    """Every reply weighs the same (``num-examples`` := 1) in the aggregate. The client-level
    noise (std z C / m on the mean) is calibrated to a uniform mean of m clipped updates; an
    example-weighted mean lets one large client move it by more than C / m."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        replies = list(replies)
        for m in replies:
            if not m.has_error():
                m.content[wire.METRICS][wire.WEIGHT] = 1
        return self.inner.aggregate_train(server_round, replies)


class ClientLevelDP(_Delegate):
    """Around one of Flower's DP wrappers: the federation's accountant, the exact sample
    size, array key order, and fresh noise entropy."""

    def __init__(self, inner: Strategy, *, noise_multiplier: float, sample_rate: float, sampled: int,
                 delta: float, accountant: str) -> None:
        super().__init__(inner)
        self.z, self.q, self.m, self.delta = noise_multiplier, sample_rate, sampled, delta
        self.accountant = PrivacyAccountant(accountant)
        self._keys: list[str] = []

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._keys = list(arrays.keys())
        msgs = list(self.inner.configure_train(server_round, arrays, config, grid))
        if len(msgs) != self.m:  # the noise is divided by m: it must be what was sampled
            raise RuntimeError(f"client-level DP expects {self.m} sampled clients per round, got {len(msgs)}")
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        arrays, metrics = None, None
        # A round where a sampled client failed is not released: the mean of fewer than m
        # updates has a larger sensitivity than the noise (z C / m) was calibrated for. Nor is
        # one where a reply does not hold exactly the tensors that were sent.
        same = all(wire.ARRAYS in m.content and set(m.content[wire.ARRAYS].keys()) == set(self._keys) for m in ok)
        if len(ok) == self.m == len(replies) and same:
            for m in ok:  # Flower's clipping zips arrays by position: put them in the order sent
                rec = m.content[wire.ARRAYS]
                if list(rec.keys()) != self._keys:
                    m.content[wire.ARRAYS] = ArrayRecord({k: rec[k] for k in self._keys})
            # Flower draws the noise from numpy's global generator: reseed it from OS entropy so
            # that nothing in this process (a seeded run) makes the noise reproducible.
            np.random.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))
            arrays, metrics = self.inner.aggregate_train(server_round, ok)
            if arrays is not None:
                self.accountant.step(noise_multiplier=self.z, sample_rate=self.q)
        out = dict(metrics or {})
        out.update({
            EPSILON: self.epsilon(),
            "noise_multiplier": self.z,
            "clip_norm": float(getattr(self.inner, "clipping_norm", float("nan"))),
            "sampled_clients": self.m,
            "released": int(arrays is not None),
        })
        return arrays, MetricRecord(out)


# -- construction ----------------------------------------------------------------------------


def client_level_noise(cfg: RunConfig) -> tuple[float, float, int]:
    """(z, q, m): the noise multiplier (given, or calibrated to spend target-epsilon over all
    rounds), the per-round sample rate q = m / N and the sampled clients m."""
    p = cfg.privacy
    m = num_sampled_clients(cfg)
    q = m / cfg.partition.num_clients
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier), q, m
    from fedtune.privacy.calibrate import noise_multiplier_for

    assert p.target_epsilon is not None
    return noise_multiplier_for(float(p.target_epsilon), float(p.delta), q, cfg.federation.rounds, p.accountant), q, m


def wrap_privacy(strategy: Strategy, cfg: RunConfig) -> Strategy:
    """The strategy ``cfg.privacy.dp`` asks for, composed around ``strategy``; with
    ``audit-canaries`` K > 0, the one-shot canary audit around that (fedtune.privacy.canaries)."""
    wrapped = _wrap_dp(strategy, cfg)
    p = cfg.privacy
    if not p.audit_canaries:
        return wrapped
    from fedtune.privacy.canaries import CanaryAudit

    m = num_sampled_clients(cfg)
    return CanaryAudit(wrapped, canaries=p.audit_canaries, seed=cfg.federation.seed, sample_rate=m / cfg.partition.num_clients,
                       sampled=m, clip_norm=p.clip_norm, delta=p.delta, rounds=cfg.federation.rounds)


def _wrap_dp(strategy: Strategy, cfg: RunConfig) -> Strategy:
    p = cfg.privacy
    if p.dp == "none":
        return strategy
    if p.dp == "sample":
        return SampleLevelDP(strategy)
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    from fedtune.strategies.fedavg import FedAvg

    if type(strategy) is not FedAvg:  # rules.check_composition refuses the configs that lead here
        raise ConfigError(
            f"bad value dp={p.dp}: client-level DP needs the plain fedavg strategy, got {type(strategy).__name__}"
        )
    z, q, m = client_level_noise(cfg)
    inner = UniformWeights(strategy)
    try:
        if p.dp == "client-fixed":
            cls = (DifferentialPrivacyClientSideFixedClipping if p.dp_clipping == "client"
                   else DifferentialPrivacyServerSideFixedClipping)
            dp = cls(inner, noise_multiplier=z, clipping_norm=p.clip_norm, num_sampled_clients=m)
        else:
            cls = (DifferentialPrivacyClientSideAdaptiveClipping if p.dp_clipping == "client"
                   else DifferentialPrivacyServerSideAdaptiveClipping)
            stddev = p.clipped_count_stddev or m / 20
            if z > 0 and z >= 2 * stddev:
                raise ConfigError(
                    f"bad value clipped-count-stddev={p.clipped_count_stddev!r}: dp=client-adaptive with noise "
                    f"multiplier {z:.4g} needs clipped-count-stddev > {z / 2:.4g} "
                    f"(default: sampled clients / 20 = {m / 20:.4g})"
                )
            dp = cls(inner, noise_multiplier=z, num_sampled_clients=m, initial_clipping_norm=p.clip_norm,
                     target_clipped_quantile=p.target_clipped_quantile, clip_norm_lr=p.clip_norm_lr,
                     clipped_count_stddev=stddev)
            _fix_adaptive_direction(dp)
    except ValueError as exc:  # Flower's own argument checks
        raise ConfigError(f"bad value dp={p.dp}: {exc}") from None
    return ClientLevelDP(dp, noise_multiplier=z, sample_rate=q, sampled=m, delta=p.delta, accountant=p.accountant)


def _fix_adaptive_direction(dp: Strategy) -> None:
    """Make the adaptive clipping bound move towards the target quantile.

    Flower 1.41 counts the *clipped* updates (norm bit = norm > C) and then applies Andrew et
    al.'s rule, written for the *unclipped* fraction: C *= exp(-lr (clipped - target)). When
    more updates than the target are clipped, C shrinks, so still more are clipped: the bound
    runs away to 0 (or up, the other way). Probe the rule once (everyone clipped must raise C)
    and flip the sign of the step if it goes the wrong way, so that a fixed Flower is left as
    it is. Privacy is unaffected: the bound only ever sees the noised count."""
    import copy

    probe = copy.copy(dp)
    probe._geometric_update(1.0)  # type: ignore[attr-defined]  # every update clipped
    if probe.clipping_norm < dp.clipping_norm:  # type: ignore[attr-defined]
        dp.clip_norm_lr = -dp.clip_norm_lr  # type: ignore[attr-defined]


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any process starts, on privacy settings that only fail at run time:
    an unreachable target-epsilon for some client (dp=sample) or for the federation
    (client-*), and Flower's constraints on the client-level wrappers."""
    p = cfg.privacy
    if p.dp == "none":
        return
    if p.client_level:  # what build_strategy does for the one strategy client-level DP takes (fedavg)
        from fedtune.compat import check_robust_dp
        from fedtune.strategies.fedavg import FedAvg, sampling

        check_robust_dp(cfg)
        wrap_privacy(FedAvg(**sampling(cfg)), cfg)
        return
    if p.target_epsilon is not None:
        from fedtune.data import partition_indices
        from fedtune.privacy.calibrate import calibrate
        from fedtune.privacy.head import head_plan

        prior = head_plan(cfg)  # the DP head release, when head-init=ncm
        vf = cfg.partition.val_fraction
        parts = partition_indices(cfg.data, cfg.partition, cfg.federation.seed)
        sizes = {len(rows) - int(round(len(rows) * vf)) for rows in parts}
        for n in sorted(sizes):
            if n > 0:
                calibrate(p.target_epsilon, p.delta, cfg.train, n, cfg.federation.rounds, p.accountant, prior)
