"""Runs through Flower's simulation runtime (Ray actors): a real 2-client federation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.presets import resolve
from fedtune.simulations.simulate import simulate

SMALL = {"num-clients": "2", "rounds": "2", "train-size": "300", "eval-size": "64", "local-steps": "2", "max-length": "24"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    cfg = resolve("tiny", overrides=SMALL)
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    return cfg, a, simulate(cfg, a, progress=lambda row: None), b, simulate(cfg, b, progress=lambda row: None)


def test_two_clients_two_rounds_through_flower(two_runs):
    cfg, a, summary, _, _ = two_runs
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"round", "accuracy", "loss", "bytes_up", "bytes_down", "seconds"} <= r.keys()
    for r in rows[1:]:
        assert r["clients"] == 2 and r["failures"] == []
        assert "train_loss" in r and "client_accuracy" in r
    assert summary["final_accuracy"] == rows[-1]["accuracy"]


def test_bytes_are_the_adapter_not_the_model(two_runs):
    cfg, a, summary, _, _ = two_runs
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    adapter_bytes = 4 * summary["trainable_parameters"]
    for r in rows[1:]:
        # up: 2 clients' adapters (+ npy headers and small eval replies); down: adapters + config strings
        assert 2 * adapter_bytes <= r["bytes_up"] <= 2 * adapter_bytes + 20_000
        assert 2 * adapter_bytes <= r["bytes_down"] <= 4 * adapter_bytes + 20_000
        assert r["bytes_up"] < 0.05 * 4 * summary["total_parameters"]


def test_saved_adapter_loads_with_peft(two_runs):
    from peft import PeftModel

    from fedtune.modeling import _base_model, trainable_state

    cfg, a, *_ = two_runs
    saved = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(_base_model("tiny", 20), str(a / "adapter"), is_trainable=True)
    state = trainable_state(model)
    assert len(saved) == len(state) > 0
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "LoRA B is still zero: training never reached the adapter"


def test_same_seed_same_metrics(two_runs):
    _, a, _, b, _ = two_runs
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(a) == strip(b)
    sa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    sb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
