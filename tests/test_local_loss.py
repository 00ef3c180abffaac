"""local-loss=logit-adjusted (Menon et al., 2021; FedLC, Zhang et al., 2022) and the plain
loop's FedAvgM server step."""

import math

import numpy as np
import pytest
import torch

from fedtune.config import LOCAL_LOSS_CHOICES, ModelConfig, TrainConfig, build_config
from fedtune.errors import ConfigError
from fedtune.head_init import head_module
from fedtune.modeling import build_model
from fedtune.presets import resolve
from fedtune.simulations.sequential import server_step
from fedtune.training import LOGIT_OFFSETS, Encoded, label_log_prior, logit_offset, train_local

TINY = ModelConfig(model="tiny", lora_rank=4, target_modules=("query", "value"))


def test_choices_are_ce_plus_the_registry():
    assert set(LOCAL_LOSS_CHOICES) == {"ce", *LOGIT_OFFSETS}
    assert TrainConfig().local_loss == "ce"  # the adjusted loss is an option (docs/benchmarks.md, "accuracy-reading")
    with pytest.raises(ConfigError, match="local-loss='focal'"):
        build_config({"local-loss": "focal"})


def test_label_log_prior_by_hand():
    # counts [2, 1, 3, 0] of 6: log(1/3), log(1/6), log(1/2), and log(1e-6) for the absent class
    got = label_log_prior(np.array([0, 0, 1, 2, 2, 2]), 4)
    want = torch.tensor([math.log(1 / 3), math.log(1 / 6), math.log(1 / 2), math.log(1e-6)])
    assert torch.allclose(got, want, atol=1e-6)


def test_offset_is_none_for_ce_and_the_local_prior_otherwise():
    model = build_model(TINY, 4)
    enc = Encoded(tuple(np.arange(3, dtype=np.int64).reshape(3, 1)), np.array([1, 1, 3]))
    assert logit_offset(TrainConfig(), model, enc) is None
    assert torch.allclose(logit_offset(TrainConfig(local_loss="logit-adjusted"), model, enc),
                          label_log_prior(enc.labels, 4))


def _skewed_client(n: int = 32) -> Encoded:
    rng = np.random.default_rng(0)
    ids = tuple(rng.integers(5, 90, size=12).astype(np.int64) for _ in range(n))
    return Encoded(ids, np.array([0] * (n - 4) + [1] * 4))  # 7:1 between classes 0 and 1; 2 and 3 absent


@pytest.mark.parametrize("loss", ["ce", "logit-adjusted"])
def test_label_skew_biases_the_shared_head_under_ce_only(loss):
    """The label-skew drift the adjusted loss removes: on a client with 7 times more class 0
    than class 1, cross-entropy raises the head's class-0 bias over class 1's (the global
    model then over-predicts class 0); with logits + log(local prior) the two stay level.
    (Absent classes are pushed down under both: AdamW turns their tiny gradients into full
    steps.)"""
    model = build_model(TINY, 4, seed=0)
    before = head_module(model).bias.detach().clone()
    cfg = TrainConfig(local_steps=8, batch_size=8, lr=1e-3, head_lr=5e-2, local_loss=loss)
    train_local(model, _skewed_client(), cfg, seed=0, pad_id=0)
    moved = head_module(model).bias.detach() - before
    spread = float(moved[0] - moved[1])  # how much more likely class 0 became than class 1
    assert spread > 0.4 if loss == "ce" else abs(spread) < 0.1


def test_causal_lm_and_dp_sample_refuse_the_adjusted_loss():
    with pytest.raises(ConfigError, match="local-loss='logit-adjusted': a causal LM"):
        resolve("llm", None, {"local-loss": "logit-adjusted"})
    with pytest.raises(ConfigError, match="local-loss='logit-adjusted' with dp=sample"):
        resolve("private", None, {"local-loss": "logit-adjusted"})
    cfg = resolve("default", None, {"dp": "client-fixed", "noise-multiplier": "1", "head-init": "random",
                                    "local-loss": "logit-adjusted"})
    assert cfg.train.local_loss == "logit-adjusted"  # client-level DP clips the whole update: allowed


def test_server_step_fedavg_is_the_mean_and_fedavgm_by_hand():
    x, m1, m2 = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}, {"w": torch.tensor([0.3])}
    avg = resolve("tiny")
    assert server_step(avg, x, m1, {}) is m1
    cfg = resolve("tiny", None, {"strategy": "fedavgm", "server-momentum": "0.5", "server-lr": "1.0"})
    v: dict = {}
    x1 = server_step(cfg, x, m1, v)  # g = 0.5, v = 0.5, x = 1 - 0.5
    assert torch.allclose(x1["w"], torch.tensor([0.5]))
    x2 = server_step(cfg, x1, m2, v)  # g = 0.2, v = 0.5 * 0.5 + 0.2 = 0.45, x = 0.5 - 0.45
    assert torch.allclose(x2["w"], torch.tensor([0.05])) and torch.allclose(v["w"], torch.tensor([0.45]))


def test_fedavgm_momentum_zero_is_kept_and_the_default_is_0_9():
    """server-momentum=0 is FedAvg with a server-lr step (it was silently replaced by 0.9)."""
    from fedtune.strategies import STRATEGIES

    zero = resolve("tiny", None, {"strategy": "fedavgm", "server-momentum": "0", "server-lr": "2.0"})
    x, m = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}
    v: dict = {}
    x1 = server_step(zero, x, m, v)  # g = 0.5, v = 0.5, x = 1 - 2 * 0.5
    x2 = server_step(zero, x1, {"w": torch.tensor([-0.5])}, v)  # g = 0.5, v = 0 * 0.5 + 0.5, x = 0 - 2 * 0.5
    assert torch.allclose(x2["w"], torch.tensor([-1.0]))
    assert STRATEGIES.get("fedavgm")(zero).server_momentum == 0.0
    assert STRATEGIES.get("fedavgm")(resolve("tiny", None, {"strategy": "fedavgm"})).server_momentum == 0.9
