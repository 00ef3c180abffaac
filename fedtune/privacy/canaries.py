"""The one-shot privacy audit in a federation (``audit-canaries=K``; Andrew et al., ICLR 2024).

``CanaryAudit`` wraps the run's privacy-wrapped strategy (inside ``Metered``). K canary
clients each own a fixed random unit direction c_i in the space of all the round's arrays
(``fedtune.privacy.audit.direction``), and K more directions are never inserted. Each round
the aggregate is released, every canary takes part with the run's sample rate q = m / N (its
own seeded draw) and contributes C c_i / m: exactly what one more client of the round, whose
update is its direction scaled to the clip norm C (clipping leaves it as it is), adds to the
uniform mean of m clipped updates. At the last round the final-model delta plus the canaries'
contributions is compared, by cosines, with the inserted and the never-inserted directions
(``fedtune.privacy.audit.estimate``), and ``epsilon_audit`` with its 95% interval goes into
that round's metrics beside the accountant's ``epsilon``.

The canaries never change the real model: the audit runs on a *copy* of the aggregation.
The strategy's arrays pass through untouched (they are what is evaluated, checkpointed and
exported); the canaries' summed contributions live in a separate vector that is added to the
final delta only for the audit. The noise in that copy is the real run's noise (the released
aggregates), so a canary faces the mechanism a real client faces, seen by an adversary who
holds only the final model (not every round's model, which the accountant covers); unlike
the paper's canaries, they do not feed back into later rounds' client training, which only
removes a source of variance the paper's estimate tolerates.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import wire
from fedtune.privacy.audit import AuditResult, cosines, direction, estimate

TrainResult = tuple[ArrayRecord | None, MetricRecord | None]


def flatten(arrays: ArrayRecord) -> torch.Tensor:
    """All arrays of the record, float64, in sorted key order, as one vector."""
    state = wire.from_record(arrays)
    return torch.cat([state[k].double().flatten() for k in sorted(state)])


class CanaryAudit(Strategy):
    """Delegates to ``inner``; inserts K canaries into a copy of the aggregate and audits it at
    the last round. ``canary_state`` ({'initial', 'inserted'}: float64 vectors) is checkpointed
    (fedtune.server.strategy_state), so a resumed run audits the whole run."""

    def __init__(self, inner: Strategy, *, canaries: int, seed: int, sample_rate: float, sampled: int,
                 clip_norm: float, delta: float, rounds: int) -> None:
        self.inner = inner
        self.k, self.seed, self.q, self.m = canaries, seed, sample_rate, sampled
        self.clip, self.delta, self.rounds = clip_norm, delta, rounds
        self.canary_state: dict[str, np.ndarray] | None = None
        self.latest: torch.Tensor | None = None  # the last released global arrays, flattened
        self.result: AuditResult | None = None

    def summary(self) -> None:
        self.inner.summary()

    def clip_norm(self) -> float:
        """The clip norm in force this round: the DP wrapper's (adaptive clipping moves it), else clip-norm."""
        obj: object | None = self.inner
        for _ in range(16):
            if obj is None:
                break
            if isinstance(getattr(obj, "clipping_norm", None), (int, float)):
                return float(obj.clipping_norm)  # type: ignore[attr-defined]
            obj = getattr(obj, "inner", None) or getattr(obj, "strategy", None)
        return self.clip

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.canary_state is None:
            start = flatten(arrays).numpy()
            self.canary_state = {"initial": start, "inserted": np.zeros_like(start)}
        if self.latest is None:
            self.latest = flatten(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def inserted(self, server_round: int) -> np.ndarray:
        """The canaries taking part in this round: each with probability q, from its own seeded draw."""
        rng = np.random.default_rng([self.seed, server_round, 0xCA7])
        return np.flatnonzero(rng.random(self.k) < self.q)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        clip = self.clip_norm()  # before an adaptive wrapper moves it for the next round
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        out = dict(metrics or {})
        state = self.canary_state
        if arrays is not None and state is not None:
            chosen = self.inserted(server_round)
            dim = state["inserted"].size
            for i in chosen:
                state["inserted"] += (clip / self.m) * direction(self.seed, int(i), dim).numpy()
            out["audit_canaries_inserted"] = len(chosen)
            self.latest = flatten(arrays)
        if server_round >= self.rounds and state is not None and self.latest is not None:
            self.result = self.audit()
            out.update(self.result.metrics())
        return arrays, MetricRecord(out)

    def audit(self) -> AuditResult:
        """Cosines of the final delta (plus the canaries) with the K inserted and K never-inserted directions."""
        assert self.canary_state is not None and self.latest is not None
        final = self.latest - torch.from_numpy(self.canary_state["initial"]) + torch.from_numpy(
            self.canary_state["inserted"])
        observed = cosines(final, self.seed, range(self.k))
        null = cosines(final, self.seed, range(self.k, 2 * self.k))
        return estimate(observed, null, self.delta, seed=self.seed)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
