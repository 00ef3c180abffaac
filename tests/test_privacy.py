"""Sample-level DP-SGD on the adapter: accounting, clipping, noise, budget, calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from fedtune.config import DataConfig, ModelConfig, PartitionConfig, TrainConfig
from fedtune.data import client_data
from fedtune.errors import ConfigError
from fedtune.modeling import build_model, load_tokenizer, load_trainable_state, trainable_state
from fedtune.privacy import (
    ACCOUNTANTS,
    DPConfig,
    PrivacyAccountant,
    noise_multiplier,
    planned_steps,
    sample_rate,
    train_local_dp,
)
from fedtune.privacy.calibrate import calibrate
from fedtune.training import Encoded, encode, train_local

MODEL = ModelConfig(model="tiny", lora_rank=4, target_modules=("query", "value"))
DELTA = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more; the CI box has 2 shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    cd = client_data(DataConfig(train_size=400, max_length=32), PartitionConfig(num_clients=2), seed=0, client=0)
    tok = load_tokenizer("tiny")
    return encode(tok, cd.train, 32), tok.pad_token_id, len(cd.label_names)


def fresh_model(num_labels: int, dropout: bool = True) -> nn.Module:
    model = build_model(MODEL, num_labels, seed=0)
    if not dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model.config.attention_probs_dropout_prob = 0.0
        model.config.hidden_dropout_prob = 0.0
    return model


def ref_epsilon(history, delta=DELTA, cls=RDPAccountant) -> float:
    ref = cls()
    ref.history = list(history)
    return ref.get_epsilon(delta=delta)


# -- accounting --------------------------------------------------------------------------


def test_epsilon_matches_an_independent_opacus_accountant(data):
    enc, pad, k = data
    cfg = TrainConfig(local_steps=5, batch_size=16)
    acc = PrivacyAccountant("rdp")
    out = train_local_dp(fresh_model(k), enc, cfg, DPConfig(noise_multiplier=1.1), acc, 0, pad, noise_seed=0)
    q = 16 / len(enc)
    assert out["sample_rate"] == q and out["steps"] == 5 and out["budget_exhausted"] == 0
    assert acc.history == [(1.1, q, 5)]
    assert abs(out["epsilon"] - ref_epsilon([(1.1, q, 5)])) < 1e-6
    # the same through step() calls on a fresh opacus accountant
    ref = RDPAccountant()
    for _ in range(5):
        ref.step(noise_multiplier=1.1, sample_rate=q)
    assert abs(out["epsilon"] - ref.get_epsilon(delta=DELTA)) < 1e-6


def test_epsilon_is_cumulative_across_rounds_and_survives_json(data):
    enc, pad, k = data
    cfg = TrainConfig(local_steps=3, batch_size=16)
    dp = DPConfig(noise_multiplier=0.9)
    model, q = fresh_model(k), 16 / len(enc)

    acc = PrivacyAccountant("rdp")
    eps1 = train_local_dp(model, enc, cfg, dp, acc, 1, pad, noise_seed=1)["epsilon"]
    text = json.dumps(acc.state_dict())  # e.g. written next to the client's checkpoint

    restored = PrivacyAccountant.from_state_dict(json.loads(text))  # a new process
    assert restored.history == acc.history and restored.epsilon(DELTA) == eps1
    eps2 = train_local_dp(model, enc, cfg, dp, restored, 2, pad, noise_seed=2)["epsilon"]
    assert eps2 > eps1
    assert restored.steps == 6 and restored.history == [(0.9, q, 6)]
    assert abs(eps2 - ref_epsilon([(0.9, q, 6)])) < 1e-6
    # load_state_dict into an existing accountant gives the same
    other = PrivacyAccountant("rdp")
    other.load_state_dict(json.loads(json.dumps(restored.state_dict())))
    assert other.epsilon(DELTA) == eps2


def test_accountant_state_is_validated_on_load():
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    good = acc.state_dict()
    bad_states = [
        {**good, "mechanism": "prv"},
        {**good, "version": 99},
        {"mechanism": "rdp"},
        {**good, "history": [[1.0, 0.1]]},
        {**good, "history": [[1.0, 1.5, 3]]},
        {**good, "history": [[1.0, 0.1, 0]]},
        {**good, "history": [[1.0, 0.1, 2.5]]},
        {**good, "history": [[-1.0, 0.1, 3]]},
        {**good, "history": [["1.0", 0.1, 3]]},
        {**good, "history": [[float("nan"), 0.1, 3]]},
        {**good, "history": "[[1.0, 0.1, 3]]"},
        [],
    ]
    target = PrivacyAccountant("rdp")
    target.step(noise_multiplier=2.0, sample_rate=0.2)
    for state in bad_states:
        with pytest.raises(ValueError):
            target.load_state_dict(state)
        assert target.history == [(2.0, 0.2, 1)]  # untouched by a failed load
    prv = PrivacyAccountant("prv")
    with pytest.raises(ValueError, match="mechanism"):
        prv.load_state_dict(good)


def test_accountant_registry():
    assert ACCOUNTANTS.names() == ["prv", "rdp"]
    with pytest.raises(ConfigError, match="valid: prv, rdp"):
        PrivacyAccountant("gdp")
    with pytest.raises(ConfigError, match="valid: prv, rdp"):
        DPConfig(noise_multiplier=1.0, accountant="moments")
    prv = PrivacyAccountant("prv")
    assert prv.epsilon(DELTA) == 0.0
    prv.step(noise_multiplier=1.0, sample_rate=0.05, steps=20)
    assert abs(prv.epsilon(DELTA) - ref_epsilon([(1.0, 0.05, 20)], cls=PRVAccountant)) < 1e-6
    as_rdp = PrivacyAccountant.from_state_dict({**prv.state_dict(), "mechanism": "rdp"})
    assert prv.epsilon(DELTA) < as_rdp.epsilon(DELTA)  # PRV is the tighter bound


# -- clipping and noise ------------------------------------------------------------------


def test_per_example_gradients_are_exact_and_clipped(data):
    """Opacus' per-example gradients equal one-example autograd gradients, and each is
    clipped to max-grad-norm over all trainable tensors together before summing."""
    enc, pad, k = data
    model = fresh_model(k, dropout=False)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    label_of = {tuple(ids.tolist()): int(y) for ids, y in zip(enc.ids, enc.labels)}
    C, B = 0.05, 16
    batches, steps = [], []
    model.register_forward_pre_hook(lambda m, a, kw: batches.append(kw), with_kwargs=True)

    def on_step(opt):
        steps.append({
            names[id(p)]: dict(
                value=p.detach().clone(), raw=p.grad_sample.detach().clone(),
                summed=p.summed_grad.detach().clone(),
            )
            for p in opt.params
        })

    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=C)
    cfg = TrainConfig(local_steps=2, batch_size=B)
    train_local_dp(model, enc, cfg, dp, PrivacyAccountant(), 0, pad, noise_seed=3, on_step=on_step)
    assert len(steps) == 2 and len(batches) == 2

    model.eval()
    for rec, batch in zip(steps, batches):
        load_trainable_state(model, {n: r["value"] for n, r in rec.items()})  # weights at that step
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.tensor([label_of[tuple(r[m.bool()].tolist())] for r, m in zip(ids, mask)])
        params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        norms = []
        for j in range(len(ids)):
            logits = model(input_ids=ids[j : j + 1], attention_mask=mask[j : j + 1]).logits
            grads = torch.autograd.grad(nn.functional.cross_entropy(logits, labels[j : j + 1]), list(params.values()))
            for n, g in zip(params, grads):
                torch.testing.assert_close(rec[n]["raw"][j], g, rtol=1e-4, atol=1e-6)
            norms.append(torch.sqrt(sum((g**2).sum() for g in grads)))
        norms = torch.stack(norms)  # [B] per-example norms before clipping
        assert (norms > C).all(), "the bound must actually bind in this test"
        factor = (C / (norms + 1e-6)).clamp(max=1.0)
        clipped_norms = torch.sqrt(sum(
            (torch.einsum("i,i...->i...", factor, r["raw"]) ** 2).flatten(1).sum(1) for r in rec.values()
        ))
        assert (clipped_norms <= C * (1 + 1e-5)).all()
        torch.testing.assert_close(clipped_norms, torch.full_like(clipped_norms, C), rtol=1e-4, atol=0)
        for r in rec.values():
            torch.testing.assert_close(r["summed"], torch.einsum("i,i...", factor, r["raw"]), rtol=1e-5, atol=1e-7)
        summed_norm = torch.sqrt(sum((r["summed"] ** 2).sum() for r in rec.values()))
        assert summed_norm <= len(ids) * C * (1 + 1e-5)


def _noise_run(model, enc, pad, sigma, C, B, steps, seed):
    noise, pure = [], []  # noise part of p.grad; p.grad of empty (noise-only) batches

    def on_step(opt):
        for p in opt.params:
            noise.append((p.grad - p.summed_grad / B).flatten())
        if all(p.grad_sample.shape[0] == 0 for p in opt.params):
            assert all(torch.count_nonzero(p.summed_grad) == 0 for p in opt.params)
            pure.append(torch.cat([p.grad.flatten() for p in opt.params]))

    acc = PrivacyAccountant()
    cfg = TrainConfig(local_steps=steps, batch_size=B)
    out = train_local_dp(model, enc, cfg, DPConfig(noise_multiplier=sigma, max_grad_norm=C), acc, 0, pad,
                         noise_seed=seed, on_step=on_step)
    return torch.cat(noise), pure, out, acc


def test_noise_has_the_calibrated_standard_deviation(data):
    """p.grad = (clipped sum + N(0, (sigma C)^2)) / expected batch on every trainable scalar."""
    enc, pad, k = data
    sigma, C, B = 2.0, 0.5, 16
    x, _, out, _ = _noise_run(fresh_model(k), enc, pad, sigma, C, B, steps=4, seed=11)  # 4 x 1684 draws
    expected = sigma * C / B
    assert abs(x.std().item() / expected - 1) < 0.05
    assert abs(x.mean().item()) < 4 * expected / math.sqrt(len(x))
    assert out["empty_batches"] == 0


def test_empty_poisson_batches_release_pure_noise_and_are_accounted(data):
    enc, pad, k = data
    small = Encoded(enc.ids[:20], enc.labels[:20])  # batch 1 of 20: q = 0.05, P(empty) = 0.36
    sigma, C = 2.0, 0.5
    _, pure, out, acc = _noise_run(fresh_model(k), small, pad, sigma, C, B=1, steps=12, seed=11)
    assert out["empty_batches"] == len(pure) >= 2
    pure = torch.cat(pure)  # zero gradient: p.grad is the noise alone
    assert abs(pure.std().item() / (sigma * C) - 1) < 0.1
    assert acc.steps == 12 and acc.history == [(sigma, 0.05, 12)]


# -- the adapter really trains, and only the adapter ---------------------------------------


def test_adapter_weights_change_under_dp_and_the_model_is_left_clean(data):
    enc, pad, k = data
    model = fresh_model(k)
    before = trainable_state(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = train_local_dp(model, enc, TrainConfig(local_steps=3, batch_size=16), DPConfig(noise_multiplier=1.0),
                         PrivacyAccountant(), 0, pad, noise_seed=5)
    after = trainable_state(model)
    assert out["examples_seen"] > 0 and out["train_loss"] > 0
    lora = [n for n in before if "lora_A" in n or "lora_B" in n]
    assert len(lora) == 8 and any("classifier" in n for n in before)
    for n in before:  # LoRA A and B and the head all moved
        assert not torch.equal(before[n], after[n]), n
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[n], p), n
    for m in model.modules():  # no opacus hooks or attributes left behind
        assert not m._forward_hooks and not m._backward_hooks
        assert "activations" not in m.__dict__
    for p in model.parameters():
        assert p.grad is None and not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")
    train_local(model, enc, TrainConfig(local_steps=1, batch_size=8), 0, pad)  # still an ordinary model


def test_missing_per_example_gradients_fail_loudly(data, monkeypatch):
    """The silent opacus + peft failure (no per-example gradient reaches the adapter) raises."""
    from opacus.grad_sample import GradSampleModule

    enc, pad, k = data
    monkeypatch.setattr(GradSampleModule, "capture_backprops_hook", lambda self, *a, **kw: None)
    with pytest.raises(RuntimeError, match="per-example gradient"):
        train_local_dp(fresh_model(k), enc, TrainConfig(local_steps=1), DPConfig(noise_multiplier=1.0),
                       PrivacyAccountant(), 0, pad, noise_seed=0)


# -- budget ------------------------------------------------------------------------------


def test_a_spent_budget_stops_the_client(data):
    enc, pad, k = data
    cfg = TrainConfig(local_steps=3, batch_size=16)
    dp = DPConfig(target_epsilon=2.0, delta=DELTA)
    model, acc = fresh_model(k), PrivacyAccountant()
    for r in range(2):  # the planned rounds
        out = train_local_dp(model, enc, cfg, dp, acc, r, pad, rounds=2, noise_seed=r)
        assert out["budget_exhausted"] == 0
    assert 2.0 * 0.99 <= out["epsilon"] <= 2.0
    state, steps = trainable_state(model), acc.steps
    out = train_local_dp(model, enc, cfg, dp, acc, 2, pad, rounds=2, noise_seed=2)  # one round too many
    assert out["budget_exhausted"] == 1 and out["steps"] == 0 and out["examples_seen"] == 0
    assert acc.steps == steps and out["epsilon"] == acc.epsilon(DELTA) <= 2.0
    after = trainable_state(model)
    assert all(torch.equal(state[n], after[n]) for n in state)


def test_target_epsilon_needs_the_planned_rounds_and_a_matching_accountant(data):
    enc, pad, k = data
    with pytest.raises(ConfigError, match="rounds"):
        train_local_dp(fresh_model(k), enc, TrainConfig(), DPConfig(target_epsilon=1.0), PrivacyAccountant(), 0, pad)
    with pytest.raises(ConfigError, match="accountant"):
        train_local_dp(fresh_model(k), enc, TrainConfig(), DPConfig(noise_multiplier=1.0, accountant="prv"),
                       PrivacyAccountant("rdp"), 0, pad)


# -- calibration -------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism, rounds", [("rdp", 10), ("prv", 2)])  # PRV is the slower one
def test_calibrated_noise_reaches_the_target_over_the_whole_plan(mechanism, rounds):
    cfg, n, target = TrainConfig(local_steps=5, batch_size=16), 200, 3.0
    sigma = calibrate(target, DELTA, cfg, n, rounds, mechanism)
    assert planned_steps(cfg, n, rounds) == 5 * rounds and sample_rate(16, n) == 0.08
    cls = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]
    eps = ref_epsilon([(sigma, 0.08, 5 * rounds)], cls=cls)
    assert target * 0.99 <= eps <= target
    if mechanism == "rdp":  # more rounds planned -> more noise for the same budget
        assert calibrate(target, DELTA, cfg, n, 2 * rounds, mechanism) > sigma
    # what train_local_dp uses
    dp = DPConfig(target_epsilon=target, accountant=mechanism)
    assert noise_multiplier(dp, cfg, n, rounds) == sigma
    assert noise_multiplier(DPConfig(noise_multiplier=0.7), cfg, n, None) == 0.7


def test_calibration_and_config_errors():
    with pytest.raises(ConfigError, match="target-epsilon"):
        calibrate(1e-9, DELTA, TrainConfig(), 100, 1000)
    with pytest.raises(ConfigError, match="rounds"):
        planned_steps(TrainConfig(), 100, 0)
    for kwargs, key in [
        ({}, "target-epsilon"),
        ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, "noise-multiplier"),
        ({"target_epsilon": -1.0}, "target-epsilon"),
        ({"target_epsilon": float("inf")}, "target-epsilon"),
        ({"noise_multiplier": -0.1}, "noise-multiplier"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, "delta"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max-grad-norm"),
    ]:
        with pytest.raises(ConfigError, match=key):
            DPConfig(**kwargs)
    assert DPConfig(noise_multiplier=1.0) == DPConfig(noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0)
    with pytest.raises(AttributeError):
        DPConfig(noise_multiplier=1.0).delta = 1e-6  # frozen
