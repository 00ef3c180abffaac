"""DP in the federation: config and composition rules, the client's persistent accountant, the
server wrappers, and (slow) runs through Flower's simulation runtime."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune import wire
from fedtune.cli import main
from fedtune.config import RunConfig, build_config
from fedtune.errors import ConfigError
from fedtune.presets import resolve
from fedtune.strategies import STRATEGIES, build_strategy

DELTA = 1e-5
# iid: both clients hold 135 training examples, so q = 16 / 135 for both.
SMALL = {"num-clients": 2, "rounds": 2, "train-size": 300, "eval-size": 64, "local-steps": 2, "max-length": 24,
         "partition": "iid", "head-init": "random"}


def opacus_epsilon(history, delta=DELTA) -> float:
    ref = RDPAccountant()
    ref.history = list(history)
    return ref.get_epsilon(delta=delta)


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


# -- configuration and composition -------------------------------------------------------------


def test_defaults_are_no_dp_and_leave_the_strategy_unwrapped():
    cfg = RunConfig()
    assert cfg.privacy.dp == "none" and cfg.privacy.target_epsilon is None and cfg.privacy.noise_multiplier is None
    assert type(build_strategy(cfg)) is type(STRATEGIES.get("fedavg")(cfg))
    assert RunConfig.from_json(cfg.to_json()) == cfg
    dp = build_config({**SMALL, "dp": "sample", "target-epsilon": "3"})
    assert dp.privacy.target_epsilon == 3.0 and RunConfig.from_json(dp.to_json()) == dp
    assert dp.replace(**{"target-epsilon": "none", "noise-multiplier": "1.5"}).privacy.noise_multiplier == 1.5


CLIENT = {"dp": "client-fixed", "noise-multiplier": "1", "head-init": "random"}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"dp": "client-fixed", "noise-multiplier": "1"}, "head-init='ridge' with dp=client-fixed"),  # the default head
        ({"dp": "client-fixed", "noise-multiplier": "1", "head-init": "ncm"}, "head-init='ncm' with dp=client-fixed"),
        ({"dp": "sample", "target-epsilon": "8"}, "head-init='ridge' with dp=sample"),
        ({**CLIENT, "strategy": "fedadam"}, "strategy='fedadam'"),
        ({**CLIENT, "dp": "client-adaptive", "strategy": "fedavgm"}, "strategy='fedavgm'"),
        ({**CLIENT, "profiles": "auto"}, "profiles='auto'"),
        ({**CLIENT, "dp": "client-adaptive", "profiles": "gpu-small,cpu-edge"}, "profiles='gpu-small,cpu-edge'"),
        ({"target-epsilon": "3"}, "only used with dp="),
        ({"dp": "sample", "head-init": "random"}, "set exactly one of target-epsilon"),
        ({"dp": "sample", "head-init": "random", "target-epsilon": "3", "noise-multiplier": "1"}, "set exactly one"),
        ({"dp": "laplace"}, "dp='laplace'"),
        ({"dp": "sample", "target-epsilon": "8", "dp-head-share": "1"}, "dp-head-share=1.0"),
        ({"dp": "sample", "head-init": "random", "noise-multiplier": "1", "accountant": "gdp"}, "valid: prv, rdp"),
    ],
)
def test_refused_combinations_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        build_config(overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["dp=client-fixed", "noise-multiplier=1", "head-init=ncm"], "head-init='ncm'"),
        (["dp=client-fixed", "noise-multiplier=1", "head-init=random", "strategy=fedadam"], "strategy='fedadam'"),
        # needs the sample size: found by the preflight, before Ray starts
        (["dp=client-adaptive", "noise-multiplier=1", "head-init=random", "num-clients=2"], "clipped-count-stddev"),
        (["dp=sample", "target-epsilon=0.001", "head-init=random", "rounds=50"], "target-epsilon=0.001: unreachable"),
    ],
)
def test_refusals_through_the_cli_are_one_line_exit_2(sets, needle, capsys, tmp_path):
    argv = ["simulate", "--preset", "tiny", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedtune: error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sample_dp_allows_the_private_ncm_head():
    cfg = build_config({"dp": "sample", "target-epsilon": "8", "head-init": "ncm"})
    assert cfg.train.head_init == "ncm" and cfg.privacy.dp_head_share == 0.8


def test_private_preset_is_dp_sample_at_epsilon_8_and_passes_the_preflight():
    from fedtune.privacy.federation import preflight

    cfg = resolve("private")
    assert (cfg.privacy.dp, cfg.privacy.target_epsilon, cfg.train.head_init) == ("sample", 8.0, "ncm")
    assert cfg.train.head_logit_scale == 4.0  # the private head as measured (docs/benchmarks.md, privacy)
    assert (cfg.train.batch_size, cfg.train.local_steps) == (64, 3)
    preflight(cfg)  # every client's sigma is reachable after the head release


def test_console_script_refuses_client_dp_with_ncm_exit_2():
    argv = [sys.executable, "-m", "fedtune", "simulate", "--set", "dp=client-fixed", "--set", "noise-multiplier=1",
            "--set", "head-init=ncm"]
    r = subprocess.run(argv, capture_output=True, text=True)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fedtune: error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(errors) == 1 and "head-init='ncm'" in errors[0], r.stderr


# -- the client: accountant in context.state and in a state file ------------------------------


def _train_message(cfg: RunConfig, model, server_round: int) -> Message:
    from fedtune.modeling import trainable_state

    config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), "server-round": server_round})
    return Message(RecordDict({wire.ARRAYS: wire.to_record(trainable_state(model)), wire.CONFIG: config}),
                   dst_node_id=7, message_type="train")


def test_client_accountant_lives_in_context_state_and_state_file(task_identity, tmp_path):
    from fedtune.client.app import app
    from fedtune.data import client_data, load_dataset
    from fedtune.modeling import shared_model
    from fedtune.privacy.client import STATE_KEY

    over = {**SMALL, "dp": "sample", "noise-multiplier": "2.0", "dp-state-dir": str(tmp_path)}
    cfg = resolve("tiny", overrides=over)
    model = shared_model(cfg.model, load_dataset(cfg.data).num_labels, cfg.federation.seed).model
    q = 16 / len(client_data(cfg.data, cfg.partition, 0, 0).train)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    eps = []
    for rnd in (1, 2):
        reply = app(_train_message(cfg, model, rnd), ctx)
        assert not reply.has_error(), reply.error
        m = reply.content[wire.METRICS]
        assert "train_loss" not in m and m["budget_exhausted"] == 0 and m[wire.WEIGHT] == 135
        eps.append(m["epsilon"])
    assert abs(eps[0] - opacus_epsilon([(2.0, q, 2)])) < 1e-6 and abs(eps[1] - opacus_epsilon([(2.0, q, 4)])) < 1e-6
    state = json.loads(str(ctx.state[STATE_KEY]["accountant"]))
    saved = json.loads((tmp_path / "client-0.json").read_text())
    assert state["history"] == saved["accountant"]["history"] == [[2.0, q, 4]]

    # no file: context.state alone carries the history to the next round
    no_file = cfg.replace(**{"dp-state-dir": ""})
    reply = app(_train_message(no_file, model, 3), ctx)
    assert abs(reply.content[wire.METRICS]["epsilon"] - opacus_epsilon([(2.0, q, 6)])) < 1e-6
    # a new node (empty context.state, e.g. after a restart) reads the file: the longer history wins
    fresh = Context(run_id=2, node_id=8, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = app(_train_message(cfg, model, 1), fresh)
    assert abs(reply.content[wire.METRICS]["epsilon"] - opacus_epsilon([(2.0, q, 6)])) < 1e-6
    # the node config's state-dir wins over the run config's; a mechanism change is refused
    other = tmp_path / "node"
    node_config = {"partition-id": 0, "state-dir": str(other)}
    ctx3 = Context(run_id=3, node_id=9, node_config=node_config, state=RecordDict(), run_config={})
    assert not app(_train_message(cfg, model, 1), ctx3).has_error() and (other / "client-0.json").exists()
    prv = cfg.replace(accountant="prv")
    with pytest.raises(RuntimeError, match="accountant is 'rdp' but the run asks for accountant='prv'"):
        app(_train_message(prv, model, 2), ctx3)  # (the runtime turns it into an error reply)
    # an unreadable state file is an error, never a silent reset
    (tmp_path / "client-0.json").write_text("{not json")
    bad = Context(run_id=4, node_id=10, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="cannot read the privacy accountant state"):
        app(_train_message(cfg, model, 1), bad)


# -- the server wrappers ----------------------------------------------------------------------


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _reply(to: Message, state: dict[str, torch.Tensor], client: int, **metrics) -> Message:
    content = RecordDict({wire.ARRAYS: wire.to_record(state),
                          wire.METRICS: MetricRecord({wire.CLIENT_ID: client, **metrics})})
    return Message(content=content, reply_to=to)


def test_sample_level_wrapper_leaves_out_spent_clients_and_reports_epsilon(task_identity):
    cfg = build_config({**SMALL, "dp": "sample", "noise-multiplier": "1"})
    strategy = build_strategy(cfg)
    current = {"w": torch.zeros(3)}
    msgs = list(strategy.configure_train(1, wire.to_record(current), ConfigRecord(), FakeGrid([1, 2, 3])))
    assert len(msgs) == 3
    replies = [
        _reply(msgs[0], {"w": torch.full((3,), 1.0)}, 0, **{wire.WEIGHT: 10, "epsilon": 0.5, "budget_exhausted": 0.0}),
        _reply(msgs[1], {"w": torch.full((3,), 9.0)}, 1, **{wire.WEIGHT: 0, "epsilon": 2.0, "budget_exhausted": 1.0}),
        _reply(msgs[2], {"w": torch.full((3,), 3.0)}, 2, **{wire.WEIGHT: 30, "epsilon": 1.5, "budget_exhausted": 0.0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.allclose(wire.from_record(arrays)["w"], torch.full((3,), 2.5))  # (10 * 1 + 30 * 3) / 40
    assert metrics["epsilon"] == 2.0 and metrics["epsilon_client_1"] == 2.0 and metrics["epsilon_client_0"] == 0.5
    assert metrics["budget_exhausted"] == 1 and list(metrics["budget_exhausted_clients"]) == [1]
    assert metrics["clients_trained"] == 2
    # everyone spent: nothing is released, the global model stays
    spent = [_reply(m, {"w": torch.ones(3)}, i, **{wire.WEIGHT: 0, "epsilon": 2.0, "budget_exhausted": 1.0})
             for i, m in enumerate(msgs)]
    arrays, metrics = strategy.aggregate_train(2, spent)
    assert arrays is None and metrics["budget_exhausted"] == 3 and metrics["clients_trained"] == 0


def test_client_level_server_clipping_is_a_uniform_mean_of_clipped_updates(task_identity):
    cfg = build_config({**SMALL, "dp": "client-fixed", "noise-multiplier": "0", "clip-norm": "1.0"})
    strategy = build_strategy(cfg)
    current = {"a": torch.zeros(2), "b": torch.zeros(2)}
    msgs = list(strategy.configure_train(1, wire.to_record(current), ConfigRecord(), FakeGrid([1, 2])))
    big = {"b": torch.tensor([0.0, 8.0]), "a": torch.tensor([6.0, 0.0])}  # norm 10, keys out of order
    small = {"a": torch.tensor([0.3, 0.0]), "b": torch.tensor([0.0, 0.4])}  # norm 0.5
    replies = [_reply(msgs[0], big, 0, **{wire.WEIGHT: 1000}), _reply(msgs[1], small, 1, **{wire.WEIGHT: 1})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = wire.from_record(arrays)
    # uniform (not 1000:1), each update clipped to norm 1: ([0.6, 0.8] + [0.3, 0.4]) / 2 split over a and b
    assert torch.allclose(out["a"], torch.tensor([0.45, 0.0]), atol=1e-6)
    assert torch.allclose(out["b"], torch.tensor([0.0, 0.6]), atol=1e-6)
    assert metrics["epsilon"] == math.inf and metrics["released"] == 1 and metrics["sampled_clients"] == 2
    # a failed client: the round is not released and not accounted
    msgs = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2])))
    arrays2, metrics2 = strategy.aggregate_train(2, [_reply(msgs[0], small, 1, **{wire.WEIGHT: 1})])
    assert arrays2 is None and metrics2["released"] == 0 and strategy.accountant.steps == 1
    # a reply that does not hold exactly the tensors sent: not released either
    msgs = list(strategy.configure_train(3, arrays, ConfigRecord(), FakeGrid([1, 2])))
    odd = {**small, "extra": torch.zeros(2)}
    replies = [_reply(msgs[0], small, 0, **{wire.WEIGHT: 1}), _reply(msgs[1], odd, 1, **{wire.WEIGHT: 1})]
    arrays3, metrics3 = strategy.aggregate_train(3, replies)
    assert arrays3 is None and metrics3["released"] == 0 and strategy.accountant.steps == 1


def test_client_level_accountant_matches_opacus_and_adaptive_clip_moves(task_identity):
    over = {**SMALL, "num-clients": 4, "fraction-train": 0.5, "min-train-nodes": 1, "rounds": 3}
    cfg = build_config({**over, "dp": "client-adaptive", "noise-multiplier": "0.5", "clip-norm": "0.1",
                        "clipped-count-stddev": "0.3"})
    strategy = build_strategy(cfg)
    assert strategy.m == 2 and strategy.q == 0.5
    current = {"a": torch.zeros(4)}
    arrays = wire.to_record(current)
    for rnd in (1, 2, 3):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4])))
        replies = [_reply(m, {"a": torch.full((4,), 5.0)}, i, **{wire.WEIGHT: 7}) for i, m in enumerate(msgs)]
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert abs(metrics["epsilon"] - opacus_epsilon([(0.5, 0.5, rnd)])) < 1e-6
    assert metrics["clip_norm"] > 0.1  # every update was clipped: the adaptive bound grows
    # and shrinks when nothing is clipped (Flower 1.41's rule runs the other way; see federation.py)
    before = metrics["clip_norm"]
    for rnd in (4, 5):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4])))
        current = wire.from_record(arrays)
        replies = [_reply(m, {"a": current["a"] + 1e-4}, i, **{wire.WEIGHT: 7}) for i, m in enumerate(msgs)]
        arrays, metrics = strategy.aggregate_train(rnd, replies)
    assert metrics["clip_norm"] < before
    # target-epsilon: z is calibrated to spend it over the planned rounds at q = m / N
    cal = build_strategy(build_config({**over, "dp": "client-fixed", "target-epsilon": "4"}))
    expected = get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=0.5, steps=3,
                                    accountant="rdp", epsilon_tolerance=4e-3)
    assert cal.z == expected and opacus_epsilon([(cal.z, 0.5, 3)]) <= 4.0


# -- through Flower's simulation runtime (Ray): slow ------------------------------------------


@pytest.mark.slow
def test_sample_dp_epsilon_is_cumulative_survives_a_restart_and_a_spent_budget_stops(tmp_path):
    """Run A (sigma 2, 2 rounds) then run B (a new simulation, new worker processes) on the
    same state directory with target-epsilon 2: B's round 1 continues from A's accountant,
    its round 2 would exceed the budget, so both clients stop and the global model stays."""
    from fedtune.data import client_data
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    state = tmp_path / "state"
    common = {**SMALL, "dp": "sample", "dp-state-dir": str(state)}
    cfg_a = resolve("tiny", overrides={**common, "noise-multiplier": "2.0"})
    n = len(client_data(cfg_a.data, cfg_a.partition, 0, 0).train)
    assert n == len(client_data(cfg_a.data, cfg_a.partition, 0, 1).train) == 135
    q, steps = 16 / n, 2

    simulate(cfg_a, tmp_path / "a", progress=lambda row: None)
    rows = RunDir(tmp_path / "a").metrics()
    for r in (1, 2):
        expected = opacus_epsilon([(2.0, q, steps * r)])
        assert abs(rows[r]["epsilon"] - expected) < 1e-6
        assert abs(rows[r]["epsilon_client_0"] - expected) < 1e-6 and abs(rows[r]["epsilon_client_1"] - expected) < 1e-6
        assert rows[r]["budget_exhausted"] == 0 and rows[r]["clients_trained"] == 2 and "train_loss" not in rows[r]
    assert rows[2]["epsilon"] > rows[1]["epsilon"]
    for c in (0, 1):
        saved = json.loads((state / f"client-{c}.json").read_text())["accountant"]
        assert saved["history"] == [[2.0, q, 4]]

    cfg_b = resolve("tiny", overrides={**common, "target-epsilon": "2"})
    sigma_b = get_noise_multiplier(target_epsilon=2.0, target_delta=DELTA, sample_rate=q, steps=2 * steps,
                                   accountant="rdp", epsilon_tolerance=2e-3)
    continued = opacus_epsilon([(2.0, q, 4), (sigma_b, q, steps)])
    assert rows[2]["epsilon"] < continued <= 2.0 < opacus_epsilon([(2.0, q, 4), (sigma_b, q, 2 * steps)])

    simulate(cfg_b, tmp_path / "b", progress=lambda row: None)
    rows_b = RunDir(tmp_path / "b").metrics()
    assert abs(rows_b[1]["epsilon"] - continued) < 1e-6  # continued from run A's state files
    assert rows_b[1]["budget_exhausted"] == 0 and rows_b[1]["clients_trained"] == 2
    assert rows_b[2]["budget_exhausted"] == 2 and rows_b[2]["budget_exhausted_clients"] == [0, 1]
    assert rows_b[2]["clients_trained"] == 0 and abs(rows_b[2]["epsilon"] - continued) < 1e-6
    # nothing was averaged in: the global adapter (and so the server's evaluation) did not move
    assert rows_b[2]["loss"] == rows_b[1]["loss"] and rows_b[2]["accuracy"] == rows_b[1]["accuracy"]
    assert rows_b[2]["failures"] == [] and rows_b[2]["clients"] == 2


@pytest.mark.slow
def test_client_level_dp_through_flower_reports_epsilon(tmp_path):
    """Client-side fixed clipping (Flower's fixedclipping_mod on the ClientApp, its wrapper on
    the server), 2 of 3 clients per round: epsilon per round = opacus RDP at q = 2/3."""
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    cfg = resolve("tiny", overrides={**SMALL, "num-clients": 3, "fraction-train": 0.67, "dp": "client-fixed",
                                      "dp-clipping": "client", "noise-multiplier": "0.7", "clip-norm": "0.5"})
    simulate(cfg, tmp_path / "run", progress=lambda row: None)
    rows = RunDir(tmp_path / "run").metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in (1, 2):
        assert rows[r]["failures"] == [] and rows[r]["clients"] == 2 and rows[r]["released"] == 1
        assert abs(rows[r]["epsilon"] - opacus_epsilon([(0.7, 2 / 3, r)])) < 1e-6
        assert math.isfinite(rows[r]["accuracy"]) and math.isfinite(rows[r]["loss"])  # server-side evaluation
        assert rows[r]["bytes_up"] > 0
    assert rows[2]["epsilon"] > rows[1]["epsilon"]
    assert (tmp_path / "run" / "summary.json").exists()
