"""The one-shot privacy audit's math (fedtune.privacy.audit; Andrew et al., ICLR 2024) on
problems whose true epsilon is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedtune.privacy.audit import cosines, direction, epsilon_of, estimate, gaussian_delta

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old

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


# -- in the federation: CanaryAudit around the DP wrappers (fedtune.privacy.canaries) ---------------

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fedtune import wire  # noqa: E402
from fedtune.config import build_config  # noqa: E402
from fedtune.errors import ConfigError  # noqa: E402
from fedtune.privacy.canaries import CanaryAudit  # noqa: E402
from fedtune.strategies import build_strategy  # noqa: E402

DIM = 30_000
FED = {"num-clients": 10, "fraction-train": 0.5, "min-train-nodes": 5, "rounds": 5, "head-init": "random",
       "clip-norm": 1.0, "audit-canaries": 300}


class FakeGrid:
    def get_node_ids(self):
        return list(range(1, 11))


def _federate(overrides: dict) -> tuple[list[ArrayRecord], dict, object]:
    """Rounds of 10 clients whose updates are random directions of norm 2 (clipped to 1 under DP):
    (each round's released arrays, the last round's metrics, the strategy)."""
    strategy = build_strategy(build_config({**FED, **overrides}))
    arrays = wire.to_record({"w": torch.zeros(DIM)})
    released, metrics = [], {}
    g = torch.Generator()
    for rnd in range(1, int(overrides.get("rounds", FED["rounds"])) + 1):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid()))
        current = wire.from_record(arrays)["w"]
        replies = []
        for m in msgs:
            u = torch.randn(DIM, generator=g.manual_seed(rnd * 100 + m.metadata.dst_node_id))
            state = {"w": current + 2 * u / u.norm()}
            content = RecordDict({wire.ARRAYS: wire.to_record(state), wire.METRICS: MetricRecord(
                {wire.CLIENT_ID: m.metadata.dst_node_id - 1, wire.WEIGHT: 10})})
            replies.append(Message(content=content, reply_to=m))
        out, met = strategy.aggregate_train(rnd, replies)
        arrays = out if out is not None else arrays
        released.append(out)
        metrics = dict(met or {})
    return released, metrics, strategy



@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_epsilon_audit_stays_below_the_accountant_under_client_level_dp(task_identity, target, monkeypatch):
    """The DP noise is drawn from OS entropy (fedtune.privacy.federation); here from a seeded stream, so the
    test is deterministic. 500 canaries: mu's standard error is about sqrt(2 / 500) = 0.06."""
    import random

    import fedtune.privacy.federation as federation

    entropy = random.Random(int(target))
    monkeypatch.setattr(federation.os, "urandom", entropy.randbytes)
    _, met, strategy = _federate({"dp": "client-fixed", "target-epsilon": target, "audit-canaries": 500})
    assert isinstance(strategy, CanaryAudit)
    assert met["epsilon"] <= target + 1e-6 and met["audit_canaries"] == 500
    assert 0 <= met["epsilon_audit_low"] <= met["epsilon_audit"] <= met["epsilon_audit_high"]
    assert met["epsilon_audit"] <= met["epsilon"], met


def test_epsilon_audit_is_large_without_dp(task_identity):
    _, met, _ = _federate({"fraction-train": 1.0, "min-train-nodes": 10, "rounds": 3})
    assert "epsilon" not in met and met["epsilon_audit"] > 20, met


def test_the_canaries_never_change_the_real_model(task_identity):
    """With and without 300 canaries, the released arrays of every round are bit-identical (dp=none:
    the aggregate is deterministic); the canaries live only in the audit's copy."""
    every = {"rounds": 3, "fraction-train": 1.0, "min-train-nodes": 10}  # no node sampling: the same replies
    with_audit, met, strategy = _federate(every)
    without, _, plain = _federate({**every, "audit-canaries": 0})
    assert not isinstance(plain, CanaryAudit) and "epsilon_audit" in met
    assert all(torch.equal(wire.from_record(a)["w"], wire.from_record(b)["w"]) for a, b in zip(with_audit, without))
    assert float(torch.from_numpy(strategy.canary_state["inserted"]).norm()) > 0


@pytest.mark.parametrize("overrides, needle", [
    ({"dp": "sample", "target-epsilon": 3}, "audit-canaries=5 with dp=sample"),
    ({"strategy": "ffa"}, "audit-canaries=5 with strategy='ffa'"),
    ({"adapter": "sparse"}, "audit-canaries=5 with adapter=sparse"),
    ({"audit-canaries": -1}, "audit-canaries=-1"),
])
def test_refused_audits_are_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        build_config({"audit-canaries": 5, "head-init": "random", **overrides})
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_audit_through_flower_reports_epsilon_audit_beside_epsilon(tmp_path):
    """Tiny model, 3 clients (2 a round), client-level DP at epsilon 8, 50 canaries: the last round's
    metrics and summary.json carry epsilon_audit (with its interval) at or below the accountant's epsilon."""
    import json

    from fedtune.presets import resolve
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    cfg = resolve("tiny", overrides={"num-clients": 3, "fraction-train": 0.67, "rounds": 2, "train-size": 300,
                                      "eval-size": 64, "local-steps": 2, "max-length": 24, "partition": "iid",
                                      "head-init": "random", "dp": "client-fixed", "target-epsilon": 8,
                                      "audit-canaries": 50})
    simulate(cfg, tmp_path / "run", progress=lambda row: None)
    rows = RunDir(tmp_path / "run").metrics()
    last = rows[-1]
    assert last["released"] == 1 and last["audit_canaries"] == 50
    assert last["epsilon_audit_low"] <= last["epsilon_audit"] <= last["epsilon_audit_high"]
    assert last["epsilon_audit"] <= last["epsilon"] <= 8.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epsilon"] == last["epsilon"] and summary["epsilon_audit"] == last["epsilon_audit"]


def test_the_audit_state_is_checkpointed_and_restored(task_identity):
    """A resumed run audits the whole run: the canaries' vector and the initial arrays survive a checkpoint."""
    from fedtune.server.strategy_state import restore_strategy, strategy_state

    _, _, strategy = _federate({"rounds": 2})
    tensors, meta = strategy_state(strategy)
    fresh = build_strategy(build_config({**FED, "rounds": 2}))
    assert fresh.canary_state is None
    restore_strategy(fresh, tensors, meta)
    for k in ("initial", "inserted"):
        assert np.array_equal(fresh.canary_state[k], strategy.canary_state[k])
