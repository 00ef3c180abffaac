"""evaluate_states: each distinct model state evaluated once, every state loaded in order."""

import torch

import pytest

from fedtune.errors import ConfigError
from fedtune.presets import resolve
from fedtune.server.model_eval import evaluate_states, profiles_due, state_digest


def test_digest_tells_bit_equal_states_apart_from_near_ones():
    a = {"l.A": torch.ones(2, 3), "l.B": torch.zeros(3, 2)}
    same = {"l.B": torch.zeros(3, 2), "l.A": torch.ones(2, 3)}  # key order does not matter
    assert state_digest({}, a) == state_digest({}, same)
    near = {"l.A": torch.ones(2, 3), "l.B": torch.zeros(3, 2)}
    near["l.B"][0, 0] = torch.finfo(torch.float32).tiny  # one value one ulp away from zero
    assert state_digest({}, a) != state_digest({}, near)
    assert state_digest({}, a) != state_digest({}, {k: v.double() for k, v in a.items()})  # dtype counts
    assert state_digest({}, a) != state_digest({}, {"l.A": torch.ones(3, 2), "l.B": torch.zeros(3, 2)})  # shape
    assert state_digest({}, a) != state_digest(a, {})  # a base delta is not a trainable tensor
    assert state_digest({}, {"x": torch.ones(2, dtype=torch.bfloat16)}) != state_digest({}, {"x": torch.zeros(2, dtype=torch.bfloat16)})


def test_equal_states_are_evaluated_once_and_the_last_stays_loaded():
    g = {"A": torch.ones(2), "B": torch.full((2,), 0.5)}
    states = {"rank_8": ({}, {"A": torch.ones(2), "B": torch.full((2,), 0.5)}),  # = the global model
              "rank_2": ({}, {"A": torch.ones(2), "B": torch.zeros(2)}),
              "": ({}, g)}
    loaded, evaluated = [], []

    def load(base, state):
        loaded.append(float(state["B"].sum()))

    def evaluate():
        evaluated.append(loaded[-1])
        return {"accuracy": loaded[-1]}

    out = evaluate_states(states, load, evaluate)
    assert loaded == [1.0, 0.0, 1.0]  # all three loaded, in order: the global model last
    assert evaluated == [1.0, 0.0]  # the global model reuses rank_8's result
    assert out == {"rank_8": {"accuracy": 1.0}, "rank_2": {"accuracy": 0.0}, "": {"accuracy": 1.0}}
    out["rank_8"]["accuracy"] = 9.0
    assert out[""]["accuracy"] == 1.0  # results are separate dicts


def test_profile_models_are_evaluated_every_n_rounds_and_at_the_last():
    due = lambda every, rounds=5: [r for r in range(rounds + 1) if profiles_due(r, rounds, every)]  # noqa: E731
    assert due(1) == [0, 1, 2, 3, 4, 5]
    assert due(2) == [0, 2, 4, 5]
    assert due(0) == [5]
    assert due(9) == [0, 5]
    with pytest.raises(ConfigError, match="profile-eval-every.*-1.*must be >= 0"):
        resolve("tiny", overrides={"profile-eval-every": "-1"})
