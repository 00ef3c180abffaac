"""Secure aggregation on Flower's SecAgg+ (fedtune.server.secagg, fedtune.client.secagg):
refused combinations, the error bound, and (slow) runs through Flower's simulation runtime."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from fedtune.cli import main
from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.server.secagg import quantization_error

SECURE = {"secure-aggregation": "secagg+", "head-init": "random"}


@pytest.mark.parametrize("overrides, needle", [
    ({"strategy": "flexlora"}, "strategy='flexlora': it takes the SVD"),
    ({"strategy": "flora"}, "strategy='flora': it stacks"),
    ({"strategy": "fedex"}, "strategy='fedex'"),
    ({"strategy": "fedsa"}, "strategy='fedsa'"),
    ({"robust": "median"}, "robust='median'"),
    ({"robust": "trimmed-mean"}, "robust='trimmed-mean'"),
    ({"robust": "norm-bound"}, "robust='norm-bound'"),
    ({"profiles": "auto"}, "profiles='auto'"),
    ({"compression": "int8"}, "compression='int8'"),
    ({"head-init": "ncm"}, "head-init='ncm'"),
    ({"head-init": "ridge"}, "head-init='ridge'"),
    ({"dp": "client-fixed", "noise-multiplier": 1}, "dp-clipping=server"),
    ({"adapter": "sparse", "strategy": "fedavgm"}, "adapter='sparse' and strategy='fedavgm'"),
])
def test_refused_combinations_are_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        build_config({**SECURE, **overrides})
    assert f"secure-aggregation='secagg+' with {needle}" in str(err.value) or needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_allowed_combinations_build():
    for extra in ({}, {"strategy": "fedavgm"}, {"strategy": "fedadam"}, {"strategy": "ffa"}, {"adapter": "sparse"},
                  {"dp": "client-fixed", "noise-multiplier": 1, "dp-clipping": "client"}):
        assert build_config({**SECURE, **extra}).federation.secure_aggregation == "secagg+"
    with pytest.raises(ConfigError, match="secagg-threshold"):
        build_config({**SECURE, "secagg-threshold": 1.5})


@pytest.mark.parametrize("sets, needle", [
    (["secure-aggregation=secagg+", "head-init=random", "strategy=flexlora"], "it takes the SVD"),
    (["secure-aggregation=secagg+", "head-init=random", "robust=median"], "robust='median'"),
    (["secure-aggregation=paillier"], "secure-aggregation='paillier'"),
])
def test_refusals_through_the_cli_are_one_line_exit_2(sets, needle, capsys, tmp_path):
    argv = ["simulate", "--preset", "tiny", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedtune: error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err


def test_quantization_error_bound_by_hand():
    """3 clients of weight 125 (max-weight 1000: r = 1/8, exact on the 2**-22 grid), R = 8, Q = 2**22:
    each client's values are rounded to a step of 16 / 2**22 = 3.815e-6; the average's error is at most
    3 steps / 0.375 = 3.052e-5. Weight 100 is not exact (0.1 * 2**22 = 419430.4): its rounding adds."""
    err = quantization_error([125, 125, 125], clipping_range=8.0, quantization_range=2**22, max_weight=1000.0,
                             max_abs=1.0)
    assert err == pytest.approx(3 * 16 / 2**22 / 0.375)
    inexact = quantization_error([100, 100, 100], clipping_range=8.0, quantization_range=2**22, max_weight=1000.0,
                                 max_abs=1.0)
    assert inexact == pytest.approx((3 * 16 / 2**22 + 2 * 3 * 0.4 / 2**22) / (3 * 419430 / 2**22))


# -- through Flower's simulation runtime: slow -------------------------------------------------

SMALL = {"num-clients": 3, "rounds": 1, "train-size": 300, "eval-size": 32, "local-steps": 1, "max-length": 24,
         "partition": "iid", "head-init": "random", "fraction-evaluate": 0}


def _run(tmp_path, name, overrides, client_app=None):
    from fedtune.presets import resolve
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    cfg = resolve("tiny", overrides={**SMALL, **overrides})
    simulate(cfg, tmp_path / name, progress=lambda row: None, client_app=client_app)
    rows = RunDir(tmp_path / name).metrics()
    arrays = load_file(str(tmp_path / name / "checkpoint" / f"round-{cfg.federation.rounds:04d}" / "global.safetensors"))
    return cfg, rows, arrays


class Recorder:
    """Instruments a strategy class's aggregate_train: every reply's arrays, per round."""

    def __init__(self, monkeypatch, cls):
        from fedtune import wire

        self.seen: dict[int, list[dict[str, torch.Tensor]]] = {}
        original = cls.aggregate_train

        def spy(strategy, server_round, replies):
            replies = list(replies)
            self.seen.setdefault(server_round, []).extend(
                wire.from_record(m.content[wire.ARRAYS]) for m in replies if not m.has_error())
            return original(strategy, server_round, replies)

        monkeypatch.setattr(cls, "aggregate_train", spy)


# The runs on fedtune's own client app share one Flower simulation (one Ray start for seven runs):
# a server main runs them one after the other on the same 3 SuperNodes, as test_hetero_federation does.
SHARED = {
    "fedavg/plain": {"strategy": "fedavg"},
    "fedavg/secure": {"strategy": "fedavg", "secure-aggregation": "secagg+"},
    "ffa/plain": {"strategy": "ffa"},
    "ffa/secure": {"strategy": "ffa", "secure-aggregation": "secagg+"},
    "dp": {"secure-aggregation": "secagg+", "dp": "client-fixed", "dp-clipping": "client", "noise-multiplier": 0.7,
           "clip-norm": 0.5},
    "sparse/plain": {"adapter": "sparse", "sparse-selection": "random"},
    "sparse/secure": {"adapter": "sparse", "sparse-selection": "random", "secure-aggregation": "secagg+"},
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """{name: (cfg, metrics rows, final global arrays, {round: the replies' arrays the strategy saw})}."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as client_app
    from fedtune.data import train_sizes
    from fedtune.presets import resolve
    from fedtune.server.app import run_federation
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import backend_config, preflight
    from fedtune.strategies import RANK_AWARE
    from fedtune.strategies.fedavg import FedAvg
    from fedtune.strategies.sparse.strategy import SparseFedAvg

    cfgs = {name: resolve("tiny", overrides={**SMALL, **over}) for name, over in SHARED.items()}
    for cfg in cfgs.values():
        preflight(cfg)
    root, seen, out = tmp_path_factory.mktemp("secagg"), {}, {}
    patch = pytest.MonkeyPatch()
    recorders = [Recorder(patch, cls) for cls in (RANK_AWARE["ffa"], SparseFedAvg, FedAvg)]  # subclasses first
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for name, cfg in cfgs.items():
            caps = train_sizes(cfg.data, cfg.partition, cfg.federation.seed)
            run_federation(grid, cfg, RunDir(root / name).create(cfg), progress=lambda row: None, weight_caps=caps)
            seen[name] = {r: v for rec in recorders for r, v in rec.seen.items()}
            for rec in recorders:
                rec.seen = {}

    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=SMALL["num-clients"],
                       backend_config=backend_config(cfgs["fedavg/plain"]), verbose_logging=False)
    finally:
        patch.undo()
    for name, cfg in cfgs.items():
        final = root / name / "checkpoint" / f"round-{cfg.federation.rounds:04d}" / "global.safetensors"
        out[name] = (cfg, RunDir(root / name).metrics(), load_file(str(final)), seen.get(name, {}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_secure_aggregate_is_the_weighted_mean_and_the_strategy_sees_no_individual_update(shared, strategy):
    from fedtune.data import train_sizes

    cfg, plain_rows, plain, plain_seen = shared[f"{strategy}/plain"]
    individual = plain_seen[1]  # the plain run's replies: each client's own adapter
    _, rows, secure, secure_seen = shared[f"{strategy}/secure"]
    assert rows[1]["aggregated"] and rows[1]["clients"] == 3 and rows[1]["bytes_up"] > 0
    # the strategy code received 3 replies, all holding the same (secure) average, none a client's own
    received = secure_seen[1]
    assert len(received) == 3 and len(individual) == 3
    for r in received:
        assert all(torch.equal(r[k], received[0][k]) for k in r)
        for own in individual:
            assert any(not torch.allclose(r[k], own[k], atol=1e-4) for k in r)
    weights = list(train_sizes(cfg.data, cfg.partition, cfg.federation.seed))
    fed = cfg.federation
    bound = quantization_error(weights, clipping_range=fed.secagg_clipping_range,
                               quantization_range=fed.secagg_quantization_range, max_weight=fed.secagg_max_weight,
                               max_abs=max(float(t.abs().max()) for own in individual for t in own.values()))
    assert plain.keys() == secure.keys()
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
    assert worst <= bound, (worst, bound)
    assert 0 < bound < 1e-3


@pytest.mark.slow
def test_a_client_killed_mid_protocol_is_tolerated_down_to_the_threshold(tmp_path, monkeypatch):
    """4 clients, 4 shares, threshold 3: one killed after sharing its keys -> the round aggregates the 3
    survivors; two killed -> 2 < 3, the protocol halts, the round keeps the global model, the run goes on."""
    import secagg_clients
    from fedtune.strategies.fedavg import FedAvg

    rec = Recorder(monkeypatch, FedAvg)
    four = {"num-clients": 4, "secure-aggregation": "secagg+", "secagg-threshold": 0.67, "rounds": 2}
    _, rows, _ = _run(tmp_path, "one", four, client_app=secagg_clients.one_killed)
    for r in (1, 2):
        assert rows[r]["aggregated"] and rows[r]["missing"] == [1] and len(rec.seen[r]) == 3, rows[r]
    rec.seen.clear()
    _, rows, arrays = _run(tmp_path, "two", four, client_app=secagg_clients.two_killed)
    for r in (1, 2):
        assert not rows[r]["aggregated"] and "secure aggregation halted" in rows[r]["note"], rows[r]
    assert rec.seen == {} or all(not v for v in rec.seen.values())  # the strategy never saw a reply
    assert math.isclose(rows[2]["accuracy"], rows[0]["accuracy"])  # the global model kept: the initial one


@pytest.mark.slow
def test_client_level_dp_noises_the_secure_sum(shared):
    """dp=client-fixed with dp-clipping=client: the clients clip before masking, Flower's wrapper noises the
    secure average, and the accountant counts the round (q = 1, z = 0.7)."""
    from opacus.accountants import RDPAccountant

    _, rows, _, _ = shared["dp"]
    ref = RDPAccountant()
    ref.history = [(0.7, 1.0, 1)]
    assert rows[1]["aggregated"] and rows[1]["released"] == 1 and rows[1]["clients"] == 3
    assert abs(rows[1]["epsilon"] - ref.get_epsilon(delta=1e-5)) < 1e-6


def test_under_client_level_dp_every_client_weighs_one():
    """The noise is calibrated to a uniform mean of clipped updates: the secure sum must not be
    example-weighted, so clients state 1 and the protocol's weight scale is 1."""
    from fedtune.server.secagg import secagg_of

    cfg = build_config({**SECURE, "dp": "client-fixed", "noise-multiplier": 1, "dp-clipping": "client"})
    assert secagg_of(object(), cfg).workflow_args["max_weight"] == 1.0
    assert secagg_of(object(), build_config(SECURE)).workflow_args["max_weight"] == 1000.0


def test_the_client_bounds_its_weight_and_sends_no_array_before_masking():
    """fedtune's reply -> the legacy fitres records secaggplus_mod reads: a stated 1e9 examples becomes
    secagg-max-weight (1000) before masking; the named arrays leave the reply (only the masked vector goes)."""
    import json

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune import wire
    from fedtune.client.secagg import KEYS, PROFILE, _to_fitres

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        to = Message(RecordDict(), dst_node_id=5, message_type="train")
        content = RecordDict({wire.ARRAYS: ArrayRecord({"b": Array(np.ones(2, np.float32)),
                                                        "a": Array(np.zeros(3, np.float32))}),
                              wire.METRICS: MetricRecord({wire.WEIGHT: 1e9, wire.CLIENT_ID: 2, "train_loss": 0.5}),
                              wire.ADAPTER: ConfigRecord({wire.PROFILE: "default"})})
        out = _to_fitres(Message(content, reply_to=to), max_weight=1000.0).content
        dp = RecordDict({wire.ARRAYS: ArrayRecord({"a": Array(np.zeros(3, np.float32))}),
                         wire.METRICS: MetricRecord({wire.WEIGHT: 90, wire.CLIENT_ID: 2})})
        assert _to_fitres(Message(dp, reply_to=to), 1.0, uniform=True).content["fitres.num_examples"][
            "num_examples"] == 1  # client-level DP: a uniform mean
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
    assert wire.ARRAYS not in out and out["fitres.num_examples"]["num_examples"] == 1000
    clear = out["fitres.metrics"]
    assert json.loads(clear[KEYS]) == ["a", "b"] and clear[PROFILE] == "default" and wire.WEIGHT not in clear
    assert len(out["fitres.parameters"]) == 2


@pytest.mark.slow
def test_sparse_adapters_get_the_mask_aware_mean_through_the_secure_sum(shared):
    """adapter=sparse: each client sends its masked delta and its 0/1 mask as dense tensors; the secure
    averages D = sum w m d / sum w and M = sum w m / sum w give the mask-aware mean sent + D / M. Against
    the plain run's mask-aware mean: the same trained entries (sparse_union), values within the
    quantization bound divided by the smallest M (one client's weight share), and no individual update
    reaches the strategy."""
    from fedtune.data import train_sizes

    cfg, plain_rows, plain, plain_seen = shared["sparse/plain"]
    individual = plain_seen[1]
    _, rows, secure, secure_seen = shared["sparse/secure"]
    assert rows[1]["aggregated"] and rows[1]["clients"] == 3
    assert rows[1]["sparse_union"] == plain_rows[1]["sparse_union"] > 0
    received = secure_seen[1]
    assert len(received) == 3 and all(all(torch.equal(r[k], received[0][k]) for k in r) for r in received)
    assert all(any(not torch.allclose(r[k], own[k], atol=1e-4) for k in r) for r in received for own in individual)
    weights = list(train_sizes(cfg.data, cfg.partition, cfg.federation.seed))
    fed = cfg.federation
    base = quantization_error(weights, clipping_range=fed.secagg_clipping_range,
                              quantization_range=fed.secagg_quantization_range, max_weight=fed.secagg_max_weight,
                              max_abs=max(float(t.abs().max()) for own in individual for t in own.values()))
    share = min(weights) / sum(weights)  # the smallest M of a trained entry
    bound = 2 * base / (share - base)  # |D^/M^ - D/M| <= (e_D + |D/M| e_M) / (M - e_M), |D/M| <= 1 here
    assert plain.keys() == secure.keys()
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
    assert worst <= bound, (worst, bound)
