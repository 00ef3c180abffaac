"""Sparse adapters and update compression: codecs, wire format, masks, mask-aware mean, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune import wire
from fedtune.adapter_kinds import KINDS as ADAPTERS
from fedtune.catalog import SELECTIONS as SELECTION_NAMES
from fedtune.compression import CODECS as CODEC_NAMES
from fedtune.compression.codecs import CODECS, Params
from fedtune.compression.sparse_wire import decode_update, encode_update
from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.sparse.select import SELECTIONS, ks_statistic, num_entries, random_mask
from fedtune.strategies.sparse import mask_aware_mean, masked_mean

P = Params(topk_fraction=0.1, dare_p=0.5, seed=3)


def test_registries_match_the_cheap_name_lists():
    assert sorted(CODEC_NAMES) == CODECS.names()
    assert sorted(SELECTION_NAMES) == SELECTIONS.names()
    assert {"lora", "sparse"} <= set(ADAPTERS.names())  # and the others of fedtune.adapter_kinds


def roundtrip(codec: str, x: torch.Tensor, p: Params = P) -> torch.Tensor:
    c = CODECS.get(codec)
    return c.decode(c.encode(x, p), tuple(x.shape), p)


def test_lossless_and_fp16_roundtrips():
    x = torch.randn(7, 5)
    assert torch.equal(roundtrip("none", x), x)
    assert torch.allclose(roundtrip("fp16", x), x, rtol=2**-11, atol=1e-7)


@pytest.mark.parametrize("codec", ["int8", "int8-row"])
def test_int8_error_is_within_half_a_step(codec):
    x = torch.randn(6, 9) * torch.arange(1, 7)[:, None]  # rows of very different ranges
    parts = CODECS.get(codec).encode(x, P)
    assert parts["q"].dtype == torch.int8 and parts["q"].shape == x.shape
    step = parts["scale"][:, None] if codec == "int8-row" else parts["scale"]
    assert parts["scale"].numel() == (6 if codec == "int8-row" else 1)
    assert bool(((roundtrip(codec, x) - x).abs() <= step / 2 + 1e-7).all())
    assert torch.equal(roundtrip(codec, torch.zeros(3, 4)), torch.zeros(3, 4))


def test_int8_row_is_tighter_than_per_tensor_on_uneven_rows():
    x = torch.randn(6, 9) * torch.tensor([1e-3, 1, 1, 1, 1, 100.0])[:, None]
    row, tensor = (roundtrip("int8-row", x) - x).abs()[0].max(), (roundtrip("int8", x) - x).abs()[0].max()
    assert row < tensor / 100


def test_topk_keeps_the_largest_entries_exactly():
    x = torch.tensor([[0.1, -5.0, 0.2, 3.0, 0.0], [0.05, 0.3, -0.4, 0.01, 2.0]])
    out = roundtrip("topk", x, Params(topk_fraction=0.3))
    assert torch.equal(out, torch.tensor([[0.0, -5.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]]))


def test_dare_preserves_the_expectation():
    """E[decode(encode(x))] = x: the mean over many seeds is within 5 standard errors of x."""
    p, n = 0.7, 3000
    x = torch.linspace(-2, 2, 40)
    runs = torch.stack([roundtrip("dare", x, Params(dare_p=p, seed=s)) for s in range(n)])
    se = x.abs() * math.sqrt(p / (1 - p) / n)  # per-entry std of the mean of x * Bernoulli(1-p) / (1-p)
    assert bool(((runs.mean(0) - x).abs() <= 5 * se + 1e-6).all())
    kept = (runs != 0).float().mean()
    assert abs(float(kept) - (1 - p)) < 0.01
    parts = CODECS.get("dare").encode(x, Params(dare_p=p, seed=1))
    assert set(parts) == {"val", "seed"}  # values and a seed, no indices


def sparse_case():
    sent = {"base-delta/L1": torch.randn(4, 5), "base-delta/L2": torch.randn(3, 3), "head.weight": torch.randn(2, 5)}
    sparse = {"base-delta/L1": (torch.tensor([0, 7, 19]), torch.tensor([0.5, -1.0, 2.0])),
              "base-delta/L2": (torch.tensor([], dtype=torch.long), torch.tensor([]))}
    dense = {"head.weight": torch.randn(2, 5)}
    return sent, sparse, dense


def test_sparse_wire_roundtrip_is_exact():
    sent, sparse, dense = sparse_case()
    enc = encode_update(dense, sparse, "none", P, seeded=False)
    assert enc["base-delta/L1|idx"].dtype == torch.int32
    state, masks = decode_update(enc, sent, {"base-delta/L1", "base-delta/L2"}, "none", P, None)
    expect = sent["base-delta/L1"].flatten().clone()
    expect[[0, 7, 19]] += torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(state["base-delta/L1"], expect.reshape(4, 5))
    assert torch.equal(state["base-delta/L2"], sent["base-delta/L2"])
    assert torch.equal(state["head.weight"], sent["head.weight"] + dense["head.weight"])
    assert masks["base-delta/L1"].tolist() == [0, 7, 19] and masks["base-delta/L2"].numel() == 0


def _tamper(enc, key, value):
    out = dict(enc)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize("key,value,reason", [
    ("base-delta/L1|idx", torch.tensor([0, 7, 20], dtype=torch.int32), "out of bounds"),
    ("base-delta/L1|idx", torch.tensor([-1, 7, 19], dtype=torch.int32), "out of bounds"),
    ("base-delta/L1|idx", torch.tensor([7, 0, 19], dtype=torch.int32), "strictly increasing"),
    ("base-delta/L1|idx", torch.tensor([7, 7, 19], dtype=torch.int32), "strictly increasing"),
    ("base-delta/L1|idx", torch.tensor([0, 7, 19], dtype=torch.int64), "int32"),
    ("base-delta/L1|val|f32", torch.tensor([0.5, 1.0]), "values"),
    ("base-delta/L1|val|f32", torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), "dtype"),
    ("base-delta/L1|idx", None, "missing part 'idx'"),
    ("base-delta/L2|idx", None, "missing from the reply"),
    ("head.weight|f32", torch.zeros(5, 2), "shape"),
    ("junk", torch.zeros(1), "not an encoded tensor"),
])
def test_decoding_rejects_bad_payloads(key, value, reason):
    sent, sparse, dense = sparse_case()
    enc = encode_update(dense, sparse, "none", P, seeded=False)
    if key == "base-delta/L2|idx":  # drop the whole layer
        enc = {k: v for k, v in enc.items() if not k.startswith("base-delta/L2")}
    else:
        enc = _tamper(enc, key, value)
    with pytest.raises(ValueError, match=reason):
        decode_update(enc, sent, {"base-delta/L1", "base-delta/L2"}, "none", P, None)


def test_seeded_masks_send_no_indices_and_check_sizes():
    sent, _, dense = sparse_case()
    mask_of = lambda key, numel: random_mask(0, key, numel, num_entries(0.2, numel))  # noqa: E731
    sparse = {k: (mask_of(k, sent[k].numel()), torch.ones(num_entries(0.2, sent[k].numel())))
              for k in ("base-delta/L1", "base-delta/L2")}
    enc = encode_update(dense, sparse, "int8", P, seeded=True)
    assert not any(k.endswith("|idx") for k in enc)
    state, masks = decode_update(enc, sent, set(sparse), "int8", P, mask_of)
    assert torch.equal(masks["base-delta/L1"], sparse["base-delta/L1"][0])
    assert torch.allclose(state["base-delta/L1"].flatten()[masks["base-delta/L1"]],
                          sent["base-delta/L1"].flatten()[masks["base-delta/L1"]] + 1, atol=1e-2)
    with pytest.raises(ValueError, match="values"):  # a client claiming another density
        decode_update(enc, sent, set(sparse), "int8", P, lambda k, n: random_mask(0, k, n, num_entries(0.5, n)))
    with pytest.raises(ValueError, match="indices sent for a seeded mask"):
        decode_update(encode_update(dense, sparse, "int8", P, seeded=False), sent, set(sparse), "int8", P, mask_of)


def test_random_masks_regenerate_identically_and_nest():
    a = random_mask(7, "layer.0.query", 1000, 30)
    assert torch.equal(a, random_mask(7, "layer.0.query", 1000, 30))
    assert a.unique().numel() == 30 and bool((a[1:] > a[:-1]).all())
    assert not torch.equal(a, random_mask(8, "layer.0.query", 1000, 30))
    assert not torch.equal(a, random_mask(7, "layer.1.query", 1000, 30))
    assert set(random_mask(7, "layer.0.query", 1000, 10).tolist()) <= set(a.tolist())  # lower density: a subset


def test_ks_statistic_hand_values():
    before = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    after = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0], [0.0, 1.0, 2.0, 13.0]])
    assert ks_statistic(before, after).tolist() == [0.0, 1.0, 0.25]


def test_masked_mean_hand_computed():
    """Two clients (weights 1 and 3) on a 6-entry tensor whose global value is g: client 0
    updated entries {0, 1, 2}, client 1 entries {2, 3}; 4 and 5 nobody."""
    g = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0, 6.0])
    x0 = torch.tensor([2.0, 3.0, 4.0, 1.0, 5.0, 6.0])
    x1 = torch.tensor([1.0, 1.0, 8.0, 9.0, 5.0, 6.0])
    out = masked_mean([x0, x1], [torch.tensor([0, 1, 2]), torch.tensor([2, 3])], [1.0, 3.0])
    # disjoint: entries 0, 1 only client 0 (its value), 3 only client 1; overlap: (1*4 + 3*8) / 4 = 7
    assert out.tolist() == [2.0, 3.0, 7.0, 9.0, 5.0, 6.0]
    assert not torch.equal(out, 0.25 * x0 + 0.75 * x1)  # not the plain FedAvg (which dilutes by 'no change')
    states = [{"base-delta/L": x0.reshape(2, 3), "head": torch.tensor([0.0])},
              {"base-delta/L": x1.reshape(2, 3), "head": torch.tensor([4.0])}]
    masks = [{"base-delta/L": torch.tensor([0, 1, 2])}, {"base-delta/L": torch.tensor([2, 3])}]
    agg = mask_aware_mean(states, masks, [1.0, 3.0])
    assert agg["base-delta/L"].flatten().tolist() == out.tolist() and agg["head"].tolist() == [3.0]


@pytest.mark.parametrize("flat,match", [
    ({"adapter": "prefix"}, "adapter"),
    ({"compression": "zip"}, "compression"),
    ({"sparse-selection": "best"}, "sparse-selection"),
    ({"sparse-density": "0"}, "sparse-density"),
    ({"adapter": "sparse", "strategy": "hetlora"}, "mask-aware"),
    ({"adapter": "sparse", "compression": "topk"}, "already sparse"),
    ({"compression": "dare", "strategy": "flora"}, "did not send"),
    ({"adapter": "sparse", "dp": "sample", "noise-multiplier": "1", "head-init": "random"}, "not privatised"),
    ({"adapter": "sparse", "dp": "client-fixed", "noise-multiplier": "1", "head-init": "random"}, "mask-aware"),
    ({"compression": "int8", "dp": "client-fixed", "noise-multiplier": "1", "head-init": "random",
      "dp-clipping": "client"}, "dp-clipping"),
])
def test_config_refuses_what_does_not_compose(flat, match):
    with pytest.raises(ConfigError, match=match):
        build_config(flat)


def test_config_accepts_seeded_masks_under_dp_and_profile_densities():
    cfg = build_config({"adapter": "sparse", "sparse-selection": "random", "dp": "sample", "noise-multiplier": "1",
                        "head-init": "random"})
    assert cfg.model.sparse_selection == "random"
    from fedtune.profiles import apply, assign

    cfg = build_config({"adapter": "sparse", "num-clients": 2, "profiles": "big,small",
                        "profile-defs": "big lora-rank=8 sparse-density=0.05,small lora-rank=8 sparse-density=0.001"})
    assert [apply(cfg, assign(cfg, c)).model.sparse_density for c in (0, 1)] == [0.05, 0.001]


# -- the model and its local run -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sparse():
    from fedtune.data import load_dataset
    from fedtune.modeling import build_model
    from fedtune.presets import resolve

    cfg = resolve("tiny", overrides={"adapter": "sparse", "sparse-density": "0.05", "local-steps": "3"})
    return cfg, build_model(cfg.model, load_dataset(cfg.data).num_labels)


def _examples(cfg, n=32):
    from fedtune.data import client_data
    from fedtune.modeling import load_tokenizer
    from fedtune.training import encode

    return encode(load_tokenizer(cfg.model.model), client_data(cfg.data, cfg.partition, 0, 0).train, 24)


@pytest.mark.parametrize("selection", ["magnitude", "random", "ks"])
def test_only_masked_entries_change(tiny_sparse, selection):
    from fedtune.modeling import trainable_state
    from fedtune.sparse.layer import sparse_layers
    from fedtune.sparse.train import train_sparse

    cfg, model = tiny_sparse
    cfg = cfg.replace(**{"sparse-selection": selection})
    layers = sparse_layers(model)
    before = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    head_before = trainable_state(model)
    stats = train_sparse(model, _examples(cfg), cfg, seed=1, pad_id=0)
    update = model.last_update
    for n, m in layers.items():
        assert torch.equal(m.base_layer.weight, before[n])  # the frozen base never changes
        assert m.sparse_values.numel() == 0 and not m.sparse_values.requires_grad  # back to frozen after the run
        idx, values = update[wire.BASE + n]
        numel = before[n].numel()
        k = num_entries(0.05, numel)
        if selection == "ks":  # whole rows
            assert len(idx) % before[n].shape[1] == 0 and len(idx) > 0
        else:
            assert len(idx) == k
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx.max()) < numel
        assert bool((values != 0).any())
        if selection == "random":
            assert torch.equal(idx, random_mask(cfg.federation.seed, n, numel, k))
    assert stats["sparse_entries"] == sum(len(i) for i, _ in update.values())
    assert any(not torch.equal(v, head_before[k]) for k, v in trainable_state(model).items())  # the head trained


def test_trained_values_are_the_only_trainable_weights(tiny_sparse, monkeypatch):
    """Real masking: during the run the optimizer sees the k values per layer and the head."""
    from fedtune.sparse.layer import sparse_layers

    cfg, model = tiny_sparse
    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        seen.extend(p for g in groups for p in g["params"])
        return real(groups, **kw)

    from fedtune.sparse.train import train_sparse

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    train_sparse(model, _examples(cfg), cfg, seed=2, pad_id=0)
    layers = sparse_layers(model)
    k = sum(num_entries(0.05, m.base_layer.weight.numel()) for m in layers.values())
    head = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in seen) == k + head


def test_error_feedback_carries_what_compression_dropped(tiny_sparse):
    from types import SimpleNamespace

    from fedtune.compression.client import RESIDUAL, _with_feedback, params

    cfg = build_config({"compression": "topk", "topk-fraction": "0.25", "error-feedback": "true"})
    context = SimpleNamespace(state=RecordDict())
    deltas = [{"w": torch.randn(4, 4)} for _ in range(3)]
    sent_total = torch.zeros(4, 4)
    p = params(cfg, 0)
    for d in deltas:
        target = _with_feedback(d, cfg, p, context)
        sent_total += roundtrip("topk", target["w"], p)
    residual = wire.from_record(context.state[RESIDUAL])["w"]
    assert torch.allclose(sent_total + residual, sum(d["w"] for d in deltas), atol=1e-6)


def test_sparse_downlink_roundtrip_and_checks():
    from fedtune.compression.downlink import densify, sparsify

    d = torch.zeros(4, 5)
    d.view(-1)[[2, 11, 19]] = torch.tensor([1.0, -2.0, 3.0])
    state = {"base-delta/L": d, "head.weight": torch.randn(2, 5)}
    enc = sparsify(state)
    assert set(enc) == {"base-delta/L|idx", "base-delta/L|val", "base-delta/L|shape", "head.weight"}
    assert enc["base-delta/L|val"].numel() == 3
    back = densify(enc)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert densify(state).keys() == state.keys()  # a dense state passes through
    with pytest.raises(ValueError, match="out of bounds"):
        densify({**enc, "base-delta/L|shape": torch.tensor([2, 5])})


def test_dp_sgd_trains_the_seeded_entries_only():
    """dp=sample with random selection: per-example gradients of the sparse values (opacus),
    the update lies on the seeded mask, the frozen base is untouched."""
    from types import SimpleNamespace

    from fedtune.client.worker import get_worker
    from fedtune.presets import resolve
    from fedtune.sparse.layer import sparse_layers
    from fedtune.sparse.train import train_sparse_client

    cfg = resolve("tiny", overrides={"adapter": "sparse", "sparse-selection": "random", "sparse-density": "0.05",
                                      "dp": "sample", "noise-multiplier": "1.0", "head-init": "random",
                                      "local-steps": "2"})
    w = get_worker(cfg, 0)
    layers = sparse_layers(w.model)
    before = {n: m.base_layer.weight.clone() for n, m in layers.items()}
    context = SimpleNamespace(state=RecordDict(), node_config={"partition-id": 0})
    stats = train_sparse_client(w, cfg, 5, context, 0)
    assert stats["steps"] == 2 and stats["epsilon"] > 0
    for n, m in layers.items():
        assert torch.equal(m.base_layer.weight, before[n])
        idx, values = w.model.last_update[wire.BASE + n]
        numel = before[n].numel()
        assert torch.equal(idx, random_mask(cfg.federation.seed, n, numel, num_entries(0.05, numel)))
        assert bool((values != 0).all())  # noise reaches every trained entry
