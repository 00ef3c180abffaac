"""The DP FedNCM head (fedtune/privacy/head.py) and calibration after a prior release."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune import wire
from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.privacy.calibrate import noise_multiplier_after, noise_multiplier_for
from fedtune.privacy.head import dp_ncm_head, head_plan, noisy_class_sums, unit_class_sums

DELTA = 1e-5


def opacus_epsilon(history, delta=DELTA, accountant=RDPAccountant) -> float:
    ref = accountant()
    ref.history = list(history)
    return ref.get_epsilon(delta=delta)


def test_dp_ncm_head_against_hand_computed_values():
    # pooled S = [[3, 1], [1, 3]], n = 8 -> mu = (0.5, 0.5), |mu|^2 = 0.5; S @ mu = (2, 2);
    # S - outer(S @ mu, mu) / 0.5 = [[1, -1], [-1, 1]] -> u = [[1, -1], [-1, 1]] / sqrt(2);
    # weight = 4 u / sqrt(1 - 0.5) = [[4, -4], [-4, 4]]; bias = -weight @ mu = 0.
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 2.0]])  # two clients' released sums add up to S
    weight, bias = dp_ncm_head([a, b], n_total=8, logit_scale=4.0)
    assert torch.allclose(weight, torch.tensor([[4.0, -4.0], [-4.0, 4.0]]), atol=1e-6)
    assert torch.allclose(bias, torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError, match="no examples"):
        dp_ncm_head([a], n_total=0)


def test_dp_ncm_rows_are_orthogonal_to_the_mean_and_separate_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)
    common = 4 * torch.randn(16, generator=g)  # a large shared direction, as in real sentence features
    y = torch.arange(600) % 3
    x = common + centres[y] + 0.3 * torch.randn(600, 16, generator=g)
    sums = unit_class_sums(x, y, 3)
    weight, bias = dp_ncm_head([sums], n_total=600)
    mu = sums.sum(0) / 600
    assert float((weight.double() @ mu).abs().max()) < 1e-5 and float(bias.abs().max()) < 1e-5
    assert float(((x @ weight.T + bias).argmax(1) == y).float().mean()) > 0.95


def test_each_example_moves_the_released_sums_by_a_unit_vector():
    x = torch.tensor([[30.0, 40.0], [0.0, 0.2], [1.0, 0.0]])  # norms 50, 0.2, 1: all count as 1
    y = torch.tensor([0, 1, 1])
    sums = unit_class_sums(x, y, 2)
    assert torch.allclose(sums, torch.tensor([[0.6, 0.8], [1.0, 1.0]], dtype=torch.float64))
    without = unit_class_sums(x[:2], y[:2], 2)
    assert math.isclose(float((sums - without).norm()), 1.0, rel_tol=1e-12)  # L2 sensitivity 1


def test_released_noise_has_the_stated_standard_deviation():
    x = torch.randn(50, 64)
    y = torch.arange(50) % 10
    g = torch.Generator().manual_seed(1)
    noise = noisy_class_sums(x, y, 10, 2.5, g) - unit_class_sums(x, y, 10)  # 640 draws of N(0, 2.5^2)
    assert abs(float(noise.mean())) < 4 * 2.5 / math.sqrt(640)
    assert abs(float(noise.std()) / 2.5 - 1) < 0.1  # std of a 640-sample std estimate ~ 2.8%


def test_head_plan_spends_the_share_alone_and_only_when_planned():
    assert head_plan(build_config({})) == ()
    assert head_plan(build_config({"dp": "sample", "target-epsilon": "8", "head-init": "random"})) == ()
    ((sigma, q, steps),) = head_plan(build_config({"dp": "sample", "target-epsilon": "8", "head-init": "ncm"}))
    assert (q, steps) == (1.0, 1)
    assert 6.4 * 0.99 < opacus_epsilon([(sigma, 1.0, 1)]) <= 6.4  # the default share, 0.8
    ((fixed, _, _),) = head_plan(build_config({"dp": "sample", "noise-multiplier": "1.7", "head-init": "ncm"}))
    assert fixed == 1.7
    ((small, _, _),) = head_plan(build_config({"dp": "sample", "target-epsilon": "8", "dp-head-share": "0.2",
                                               "head-init": "ncm"}))
    assert small > sigma and 1.6 * 0.99 < opacus_epsilon([(small, 1.0, 1)]) <= 1.6


@pytest.mark.parametrize("accountant, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_calibration_after_a_prior_spends_exactly_the_target(accountant, cls):
    prior = ((1.2, 1.0, 1),)
    q, steps = 0.05, 40
    sigma = noise_multiplier_after(prior, 8.0, DELTA, q, steps, accountant)
    total = opacus_epsilon([*prior, (sigma, q, steps)], accountant=cls)
    assert 8.0 * (1 - 1e-3) <= total <= 8.0
    assert sigma > noise_multiplier_for(8.0, DELTA, q, steps, accountant)  # the head costs budget
    assert noise_multiplier_after((), 8.0, DELTA, q, steps, accountant) == noise_multiplier_for(
        8.0, DELTA, q, steps, accountant)


def test_a_prior_that_spends_the_whole_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="target-epsilon=1.0: the releases before training already spend"):
        noise_multiplier_after(((0.5, 1.0, 1),), 1.0, DELTA, 0.05, 10, "rdp")


def test_client_releases_noisy_sums_and_accounts_them_first(task_identity, tmp_path):
    from fedtune.client.app import app
    from fedtune.data import client_data, load_dataset
    from fedtune.modeling import shared_model
    from fedtune.presets import resolve
    from fedtune.privacy.client import STATE_KEY

    cfg = resolve("tiny", overrides={"num-clients": 2, "train-size": 300, "partition": "iid", "max-length": 24,
                                      "dp": "sample", "target-epsilon": "6", "dp-state-dir": str(tmp_path),
                                      "head-init": "ncm"})
    model = shared_model(cfg.model, load_dataset(cfg.data).num_labels, cfg.federation.seed).model
    ((sigma, _, _),) = head_plan(cfg)
    msg = Message(RecordDict({wire.ARRAYS: wire.to_record({}),
                              wire.CONFIG: ConfigRecord({wire.RUN_CONFIG: cfg.to_json()})}),
                  dst_node_id=7, message_type="query.head_init")
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    arrays = wire.from_record(reply.content[wire.ARRAYS])
    assert set(arrays) == {"sums"} and arrays["sums"].shape == (20, 32)  # no counts, no sums of squares
    m = reply.content[wire.METRICS]
    assert m[wire.WEIGHT] == len(client_data(cfg.data, cfg.partition, 0, 0).train)  # all local examples
    assert abs(m["epsilon"] - opacus_epsilon([(sigma, 1.0, 1)])) < 1e-9 and m["noise_multiplier"] == sigma
    saved = json.loads((tmp_path / "client-0.json").read_text())["accountant"]["history"]
    assert saved == [[sigma, 1.0, 1]] == json.loads(str(ctx.state[STATE_KEY]["accountant"]))["history"]
    # a second release would pass the budget: refused, nothing leaves, nothing is accounted
    with pytest.raises(RuntimeError, match="would spend epsilon .* > target-epsilon 6; nothing was released"):
        app(msg, ctx)
    assert json.loads((tmp_path / "client-0.json").read_text())["accountant"]["history"] == [[sigma, 1.0, 1]]
    # the noise is fresh every time (OS entropy): with budget for two, two releases differ
    small = cfg.replace(**{"dp-head-share": "0.3", "dp-state-dir": str(tmp_path / "b")})
    msg2 = Message(RecordDict({wire.ARRAYS: wire.to_record({}),
                               wire.CONFIG: ConfigRecord({wire.RUN_CONFIG: small.to_json()})}),
                   dst_node_id=7, message_type="query.head_init")
    ctx2 = Context(run_id=2, node_id=8, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    first, second = (wire.from_record(app(msg2, ctx2).content[wire.ARRAYS])["sums"] for _ in range(2))
    assert not torch.equal(first, second)
    ((s2, _, _),) = head_plan(small)
    assert json.loads((tmp_path / "b" / "client-0.json").read_text())["accountant"]["history"] == [[s2, 1.0, 2]]


@pytest.mark.slow
def test_private_head_and_dp_sgd_share_one_budget_through_flower(tmp_path):
    """Round 0 reports what the head release spent; the last round reports head + all DP-SGD
    steps composed, equal to an independent opacus computation and within the target."""
    from fedtune.data import client_data
    from fedtune.presets import resolve
    from fedtune.privacy.calibrate import calibrate
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    cfg = resolve("tiny", overrides={"num-clients": 2, "rounds": 2, "train-size": 300, "eval-size": 64,
                                      "local-steps": 2, "max-length": 24, "partition": "iid",
                                      "dp": "sample", "target-epsilon": "4", "head-init": "ncm"})
    n = len(client_data(cfg.data, cfg.partition, 0, 0).train)
    prior = head_plan(cfg)
    sigma = calibrate(4.0, DELTA, cfg.train, n, 2, "rdp", prior)
    simulate(cfg, tmp_path / "run", progress=lambda row: None)
    rows = RunDir(tmp_path / "run").metrics()
    assert abs(rows[0]["epsilon"] - opacus_epsilon(list(prior))) < 1e-9
    assert rows[0]["epsilon_client_0"] == rows[0]["epsilon_client_1"] == rows[0]["epsilon"]
    final = opacus_epsilon([*prior, (sigma, 16 / n, 4)])
    assert abs(rows[2]["epsilon"] - final) < 1e-6 and 4.0 * (1 - 1e-3) <= final <= 4.0
    assert rows[2]["budget_exhausted"] == 0 and rows[2]["clients_trained"] == 2
