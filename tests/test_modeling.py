import pytest
import torch

from fedtune import wire
from fedtune.config import ModelConfig
from fedtune.errors import ModelError
from fedtune.modeling import build_model, load_trainable_state, num_parameters, trainable_state

TINY = ModelConfig(model="tiny", lora_rank=4, target_modules=("query", "value"))


def test_adapter_state_round_trip_is_exact():
    model = build_model(TINY, 20)
    state = {k: torch.randn_like(v) for k, v in trainable_state(model).items()}
    back = wire.from_record(wire.to_record(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    other = build_model(TINY, 20)
    load_trainable_state(other, back)
    assert all(torch.equal(v, state[k]) for k, v in trainable_state(other).items())


def test_only_trainable_tensors_cross_the_wire():
    model = build_model(TINY, 20)
    state = trainable_state(model)
    # tiny BERT: 2 layers x (query, value) x (A [4, 32] + B [32, 4]) + head [20, 32] + [20]
    assert sum(v.numel() for v in state.values()) == 2 * 2 * 2 * 4 * 32 + 20 * 32 + 20
    assert all("lora_" in k or "modules_to_save" in k for k in state)
    trainable, total = num_parameters(model)
    nbytes = wire.record_bytes(wire.to_record(state))
    assert 4 * trainable <= nbytes <= 4 * trainable + 300 * len(state)  # payload + keys + npy headers
    assert nbytes < 0.05 * 4 * total


def test_frozen_base_is_identical_across_builds():
    a, b = build_model(TINY, 20, seed=1), build_model(TINY, 20, seed=2)
    frozen = lambda m: {n: p for n, p in m.named_parameters() if not p.requires_grad}  # noqa: E731
    assert all(torch.equal(p, frozen(b)[n]) for n, p in frozen(a).items())


def test_state_mismatch_is_refused():
    model = build_model(TINY, 20)
    state = trainable_state(model)
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, dict(list(state.items())[1:]))
    k = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, {**state, k: torch.zeros(1)})


def test_missing_model_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        build_model(ModelConfig(model=str(tmp_path / "nope")), 2)
    with pytest.raises(ModelError, match="no config.json"):
        build_model(ModelConfig(model=str(tmp_path)), 2)
