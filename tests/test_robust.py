"""Robust aggregation: hand-computed values of the pure functions, and through the strategies."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedtune import wire
from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.strategies import build_strategy
from fedtune.strategies.robust import clip_to_norm, coordinate_median, trimmed_mean, update_norm, weighted_average

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside a Flower runtime

U = [{"x": torch.tensor([1.0, -4.0]), "y": torch.tensor([0.0])},
     {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([2.0])},
     {"x": torch.tensor([100.0, 2.0]), "y": torch.tensor([-1.0])},
     {"x": torch.tensor([2.0, 1.0]), "y": torch.tensor([5.0])}]


def test_norm_bound_clips_each_update_then_averages():
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == 5.0
    clipped = clip_to_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
    assert clipped["a"].item() == pytest.approx(0.6) and clipped["b"].item() == pytest.approx(0.8)
    small = clip_to_norm({"a": torch.tensor([0.3])}, 1.0)  # inside the bound: unchanged
    assert small["a"].item() == pytest.approx(0.3)
    mean = weighted_average([{"a": torch.tensor([1.0])}, {"a": torch.tensor([4.0])}], [1, 3])
    assert mean["a"].item() == pytest.approx(3.25)  # (1 + 12) / 4


def test_coordinate_median_by_hand():
    med = coordinate_median(U)  # even n: mean of the two middle values
    assert med["x"].tolist() == [2.5, 0.5]  # x0: 1 2 3 100 -> 2.5; x1: -4 0 1 2 -> 0.5
    assert med["y"].tolist() == [1.0]  # -1 0 2 5 -> 1
    assert coordinate_median(U[:3])["x"].tolist() == [3.0, 0.0]  # odd n: the middle value


def test_trimmed_mean_by_hand():
    t = trimmed_mean(U, 0.25)  # k = 1 of 4 dropped at each end
    assert t["x"].tolist() == [2.5, 0.5] and t["y"].tolist() == [1.0]
    assert trimmed_mean(U, 0.0)["x"].tolist() == [26.5, -0.25]  # nothing trimmed: the mean
    five = U + [{"x": torch.tensor([-50.0, 9.0]), "y": torch.tensor([0.0])}]
    assert trimmed_mean(five, 0.2)["x"].tolist() == pytest.approx([2.0, 1.0])  # x0: drop -50, 100 -> (1+2+3)/3
    with pytest.raises(ValueError, match="keeps nothing"):
        trimmed_mean(U[:2], 0.5)


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


def _round(cfg, values: list[float], weights: list[int]):
    strategy = build_strategy(cfg)
    glob = {"w": torch.tensor([1.0, 1.0])}
    msgs = list(strategy.configure_train(1, wire.to_record(glob), ConfigRecord(), FakeGrid()))
    replies = [Message(RecordDict({wire.ARRAYS: wire.to_record({"w": torch.tensor([1.0 + v, 1.0 - v])}),
                                   wire.METRICS: MetricRecord({wire.WEIGHT: w, wire.CLIENT_ID: i})}), reply_to=m)
               for i, (m, v, w) in enumerate(zip(msgs, values, weights))]
    arrays, _ = strategy.aggregate_train(1, replies)
    return wire.from_record(arrays)["w"]


SMALL = {"num-clients": 4, "min-train-nodes": 4}


def test_median_through_fedavg_ignores_a_poisoned_minority():
    values, weights = [0.1, 0.2, 0.3, 1000.0], [1, 1, 1, 100]
    plain = _round(build_config(SMALL), values, weights)
    assert plain[0].item() > 900  # the example-weighted mean follows the attacker
    med = _round(build_config({**SMALL, "robust": "median"}), values, weights)
    assert med.tolist() == pytest.approx([1.25, 0.75])  # updates +-{.1,.2,.3,1000}: median .25
    tm = _round(build_config({**SMALL, "robust": "trimmed-mean", "trim-fraction": "0.25"}), values, weights)
    assert tm.tolist() == pytest.approx([1.25, 0.75])


def test_norm_bound_through_fedavg():
    values, weights = [0.1, 0.1, 0.1, 1000.0], [1, 1, 1, 1]
    out = _round(build_config({**SMALL, "robust": "norm-bound", "robust-norm-bound": "1"}), values, weights)
    bounded = 1 / math.sqrt(2)  # the attacker's update (1000, -1000) clipped to norm 1
    assert out.tolist() == pytest.approx([1 + (0.3 + bounded) / 4, 1 - (0.3 + bounded) / 4])


def test_robust_fedadam_applies_its_step_to_the_robust_aggregate():
    cfg = build_config({**SMALL, "robust": "median", "strategy": "fedadam"})
    out = _round(cfg, [0.1, 0.2, 0.3, 1000.0], [1, 1, 1, 100])
    assert abs(out[0].item() - 1.0) < 0.1  # one bounded Adam step on a small median update


@pytest.mark.parametrize("bad, match", [
    ({"robust": "krum"}, "must be one of"),
    ({"robust": "median", "strategy": "flexlora"}, "robust aggregation needs"),
    ({"robust": "median", "profiles": "gpu-large,cpu-edge"}, "robust aggregation needs"),
    ({"robust": "trimmed-mean", "trim-fraction": "0.5"}, "trim-fraction"),
    ({"robust": "norm-bound", "robust-norm-bound": "0"}, "robust-norm-bound"),
])
def test_unsupported_combinations_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config(bad)


def test_client_level_dp_with_robust_aggregation_is_refused():
    cfg = build_config({"robust": "median", "dp": "client-fixed", "noise-multiplier": "1", "num-clients": 4,
                        "head-init": "random"})
    with pytest.raises(ConfigError, match="does not compose with robust"):
        build_strategy(cfg)


def test_robust_is_refused_where_the_strategy_aggregates_its_own_way():
    with pytest.raises(ConfigError, match="not supported with this strategy and adapter"):
        build_strategy(build_config({"robust": "median", "adapter": "sparse"}))
