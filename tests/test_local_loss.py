"""local-loss=logit-adjusted (Menon et al., 2021; FedLC, Zhang et al., 2022) and its prior
smoothing, FedProx's proximal term (Li et al., 2020), and the plain loop's FedAvgM server step."""

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
from fedtune.training import (LOGIT_OFFSETS, BatchStream, Encoded, label_log_prior, logit_offset, run_steps,
                              train_local, warmup)

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


def test_prior_smoothing_by_hand():
    # counts [2, 1, 3, 0] of 6, smoothing 0.2: 0.8 * [1/3, 1/6, 1/2, 0] + 0.2 / 4
    got = label_log_prior(np.array([0, 0, 1, 2, 2, 2]), 4, smoothing=0.2)
    want = torch.log(torch.tensor([0.8 / 3 + 0.05, 0.8 / 6 + 0.05, 0.8 / 2 + 0.05, 0.05]))
    assert torch.allclose(got, want, atol=1e-6)
    uniform = label_log_prior(np.array([0, 0, 1, 2, 2, 2]), 4, smoothing=1.0)  # a constant offset: plain ce
    assert torch.allclose(uniform, torch.full((4,), math.log(0.25)))
    enc = Encoded(tuple(np.arange(3, dtype=np.int64).reshape(3, 1)), np.array([1, 1, 3]))
    cfg = TrainConfig(local_loss="logit-adjusted", prior_smoothing=0.5)
    assert torch.allclose(logit_offset(cfg, build_model(TINY, 4), enc), label_log_prior(enc.labels, 4, 0.5))


def test_prior_smoothing_and_proximal_mu_refuse_what_they_cannot_do():
    with pytest.raises(ConfigError, match="prior-smoothing=0.3: .* local-loss=ce"):
        resolve("default", None, {"prior-smoothing": "0.3"})
    with pytest.raises(ConfigError, match="prior-smoothing=1.5"):
        build_config({"prior-smoothing": "1.5"})
    with pytest.raises(ConfigError, match="proximal-mu=-1"):
        build_config({"proximal-mu": "-1"})
    with pytest.raises(ConfigError, match="proximal-mu=0.1 with dp=sample"):
        resolve("private", None, {"proximal-mu": "0.1"})


def _sgd_run(mu: float, steps: int, lr: float = 0.1) -> tuple[dict, dict]:
    model = build_model(TINY, 4, seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)  # dropout masks
    run_steps(model, opt, warmup(opt, 0), BatchStream(_skewed_client(), 8, 0, 0), steps, None, mu)
    return start, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_proximal_term_by_hand():
    """FedProx (Li et al., MLSys 2020): the local loss gains mu/2 ||w - w_start||^2. Under SGD at
    lr eta the first step is the plain one (w = w_start there); the second step's weights then
    differ from the plain run's by exactly -eta * mu * (w1 - w_start)."""
    eta, mu = 0.1, 3.0
    start, one = _sgd_run(0.0, 1, eta)
    _, plain = _sgd_run(0.0, 2, eta)
    _, prox = _sgd_run(mu, 2, eta)
    moved = sum(float((one[n] - start[n]).abs().sum()) for n in start)
    assert moved > 0
    for n in start:
        assert torch.allclose(prox[n] - plain[n], -eta * mu * (one[n] - start[n]), atol=1e-6), n


def test_proximal_term_keeps_a_client_near_the_global_model():
    def drift(mu: float) -> float:
        model = build_model(TINY, 4, seed=0)
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        train_local(model, _skewed_client(), TrainConfig(local_steps=8, batch_size=8, proximal_mu=mu), 0, 0)
        return sum(float((p.detach() - s).norm() ** 2) for p, s in
                   zip([p for p in model.parameters() if p.requires_grad], start)) ** 0.5

    free, held = drift(0.0), drift(100.0)
    assert held < 0.5 * free, (free, held)


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
