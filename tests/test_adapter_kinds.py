"""The ``AdapterKind`` interface (issue 15): one contract for every kind (lora, sparse, ia3), the
catalog flags compat reads, registration from outside fedtune, and IA3 end to end (Flower
simulation, export with ONNX parity)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedtune import catalog, wire
from fedtune.adapter_kinds import KINDS, AdapterKind, kind_of, register_adapter_kind
from fedtune.catalog import AdapterKindInfo
from fedtune.config import ModelConfig, build_config
from fedtune.errors import ConfigError
from fedtune.modeling import build_model, trainable_state

BUILT_IN = ("ia3", "lora", "sparse")
LABELS = 3


def tiny(adapter: str, **kw) -> tuple[ModelConfig, torch.nn.Module]:
    cfg = ModelConfig(model="tiny", adapter=adapter, device="cpu", lora_rank=4, **kw)
    return cfg, build_model(cfg, LABELS, seed=0)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 90, (3, 7), generator=g), "attention_mask": torch.ones(3, 7, dtype=torch.long)}


def is_adapter(adapter: str, name: str) -> bool:
    return any(p in name for p in catalog.ADAPTERS[adapter].params)


def test_the_registry_is_the_catalog_and_ia3_is_built_in():
    assert KINDS.names() == sorted(catalog.ADAPTER_KINDS) and set(BUILT_IN) <= set(KINDS.names())
    for name in BUILT_IN:
        assert kind_of(name).name == name and kind_of(name).info is catalog.ADAPTERS[name]
    with pytest.raises(ConfigError, match="unknown adapter 'vera'"):
        kind_of("vera")


@pytest.mark.parametrize("adapter", BUILT_IN)
def test_build_gives_adapter_and_head_as_the_trainable_state(adapter):
    cfg, model = tiny(adapter)
    state = trainable_state(model)
    adapter_keys = [k for k in state if is_adapter(adapter, k)]
    head = [k for k in state if not is_adapter(adapter, k)]
    assert head and all("classifier" in k for k in head)  # the head only (head-lr)
    if adapter == "sparse":  # between local runs: the head only; the entries train in fedtune.sparse.train
        assert adapter_keys == []
    else:
        assert len(adapter_keys) >= 4 and all(p.dtype == torch.float32 for p in state.values())
    if adapter == "ia3":  # peft's BERT defaults: key, value and output.dense (two per layer), starting at one
        assert sorted({k.split(".ia3_l")[0].split("layer.0.")[-1] for k in adapter_keys if "layer.0." in k}) == [
            "attention.output.dense", "attention.self.key", "attention.self.value", "output.dense"]
        assert all(torch.equal(state[k], torch.ones_like(state[k])) for k in adapter_keys)
        ffn = next(k for k in adapter_keys if "layer.0.output.dense" in k)
        assert state[ffn].shape == (1, 64)  # a feed-forward module scales its input (intermediate size 64)


@pytest.mark.parametrize("adapter", BUILT_IN)
def test_a_reply_round_trips_at_the_shapes_the_server_expects(adapter):
    from fedtune.sparse.layer import zero_deltas

    cfg, model = tiny(adapter)
    kind = kind_of(adapter)
    state = trainable_state(model)
    back = wire.from_record(wire.to_record(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    sent = {**state, **zero_deltas(model)}  # sparse: the global sparse delta travels as base deltas
    reference = {k: tuple(t.shape) for k, t in state.items()}
    expected = kind.reply_shapes(reference, sent, 0, cfg.lora_rank, ())
    base = {k: tuple(t.shape) for k, t in sent.items() if k.startswith(wire.BASE)}
    assert expected == {**reference, **(base if adapter == "sparse" else {})}
    assert (adapter == "sparse") == bool(base)
    scale = {"lora": cfg.lora_alpha / cfg.lora_rank, "sparse": 1.0, "ia3": 1.0}[adapter]
    assert kind.stated_scale(model) == pytest.approx(scale)
    # only LoRA's statements are checked against the run
    assert kind.statement_mismatch(cfg, cfg.lora_rank, cfg.lora_alpha, False, scale) is None
    wrong = kind.statement_mismatch(cfg, cfg.lora_rank, cfg.lora_alpha, False, 3 * scale)
    assert (wrong is not None) == (adapter == "lora")
    if adapter == "sparse":  # its reply is the entries a local run trained: none yet
        with pytest.raises(RuntimeError, match="trained entries"):
            kind.take_entries(model)
    else:
        assert kind.take_entries(model) == {}


def _train_somewhat(adapter: str, model: torch.nn.Module) -> None:
    """Adapter weights away from their identity start (LoRA B = 0, IA3 = 1, no sparse entries)."""
    g = torch.Generator().manual_seed(2)
    if adapter == "sparse":
        from fedtune.sparse.layer import sparse_layers

        for layer in sparse_layers(model).values():
            n = layer.base_layer.weight.numel()
            values = layer.start(torch.randperm(n, generator=g)[: n // 10])
            with torch.no_grad():
                values.copy_(torch.randn(values.shape, generator=g))
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and is_adapter(adapter, name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("adapter", BUILT_IN)
def test_merge_for_export_equals_the_unmerged_forward(adapter):
    _, model = tiny(adapter)
    _train_somewhat(adapter, model)
    model.eval()
    x = batch()
    with torch.no_grad():
        before = model(**x).logits
        plain = kind_of(adapter).merge_for_export(model)
        after = plain(**x).logits
    assert not any(is_adapter(adapter, n) or "modules_to_save" in n for n, _ in plain.named_parameters())
    error = float((before - after).abs().max())
    assert error <= 1e-6, error
    fresh = tiny(adapter)[1].eval()
    with torch.no_grad():
        effect = float((before - fresh(**x).logits).abs().max())  # the tiny head's logits are ~0.01
    assert effect > 1e-4 and effect > 100 * error, (effect, error)  # the adapter did something


def test_ia3_on_the_deepest_layers_only():
    _, model = tiny("ia3", lora_layers=1)
    vectors = [k for k in trainable_state(model) if "ia3_l" in k]
    assert len(vectors) == 4 and all(".layer.1." in k for k in vectors)


def test_load_saved_restores_a_saved_ia3_adapter(tmp_path):
    from safetensors.torch import load_file

    _, model = tiny("ia3")
    _train_somewhat("ia3", model)
    model.save_pretrained(str(tmp_path))
    _, other = tiny("ia3")
    assert kind_of("ia3").load_saved(other, load_file(str(tmp_path / "adapter_model.safetensors"))) == []
    a, b = trainable_state(model), trainable_state(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the catalog flags compat reads ----------------------------------------------------------
@pytest.mark.parametrize(("overrides", "bad"), [
    ({"strategy": "hetlora"}, "bad value strategy='hetlora' with adapter=ia3"),
    ({"strategy": "flora"}, "use strategy=fedavg or fedavgm or fedadam"),
    ({"profiles": "gpu-large,cpu-edge"}, "bad value profiles='gpu-large,cpu-edge' with adapter=ia3"),
    ({"base-quant": "nf4"}, "bad value base-quant='nf4'"),
    ({"dp": "sample", "noise-multiplier": 1.0, "head-init": "random"}, "bad value adapter='ia3' with dp=sample"),
    ({"secure-aggregation": "secagg+", "strategy": "fedex"}, "bad value secure-aggregation='secagg+'"),
])
def test_compat_refuses_ia3_where_it_does_not_compose(overrides, bad):
    with pytest.raises(ConfigError) as err:
        build_config({"adapter": "ia3", **overrides})
    assert bad in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    {}, {"strategy": "fedadam"}, {"strategy": "fedavgm", "compression": "int8"},
    {"dp": "client-fixed", "noise-multiplier": 1.0, "head-init": "random"}, {"robust": "median"},
    {"secure-aggregation": "secagg+", "head-init": "random"}, {"lora-layers": 1},
])
def test_compat_accepts_ia3_where_it_composes(overrides):
    assert build_config({"adapter": "ia3", **overrides}).model.adapter == "ia3"


def test_the_strategies_each_kind_composes_with():
    from fedtune.compat import adapter_strategies

    assert adapter_strategies("lora") == tuple(catalog.STRATEGIES)
    assert adapter_strategies("sparse") == ("fedavg",)
    assert adapter_strategies("ia3") == ("fedavg", "fedavgm", "fedadam")


# -- registration from outside fedtune -------------------------------------------------------
class _Toy(AdapterKind):
    name = "toy"

    def build(self, base, cfg, seed):  # noqa: ANN001
        return kind_of("ia3").build(base, cfg, seed)


@pytest.fixture
def restore_kinds():
    infos, names, items = dict(catalog.ADAPTERS), catalog.ADAPTER_KINDS, dict(KINDS._items)
    yield
    catalog.ADAPTERS.clear()
    catalog.ADAPTERS.update(infos)
    catalog.ADAPTER_KINDS = names
    KINDS._items.clear()
    KINDS._items.update(items)


def test_a_kind_registers_from_outside_with_one_call(restore_kinds):
    with pytest.raises(ConfigError, match="bad value adapter='toy': must be one of ia3, lora, sparse"):
        build_config({"adapter": "toy"})
    toy = _Toy()
    assert register_adapter_kind(AdapterKindInfo("toy", params=("ia3_",), strategies="dense", profiles=False), toy) is toy
    assert kind_of("toy") is toy and "toy" in catalog.ADAPTER_KINDS
    assert build_config({"adapter": "toy"}).model.adapter == "toy"
    with pytest.raises(ConfigError, match="with adapter=toy"):
        build_config({"adapter": "toy", "strategy": "flexlora"})
    with pytest.raises(ConfigError, match="adapter kind 'toy' exists already$"):
        register_adapter_kind(AdapterKindInfo("toy"), _Toy())


def test_registering_a_built_in_name_is_refused(restore_kinds):
    class Clash(_Toy):
        name = "lora"

    with pytest.raises(ConfigError, match=r"adapter kind 'lora' exists already \(built in\)"):
        register_adapter_kind(AdapterKindInfo("lora"), Clash())
    with pytest.raises(ConfigError, match="implementation is named 'toy'"):
        register_adapter_kind(AdapterKindInfo("toy2"), _Toy())
    assert catalog.ADAPTERS["lora"].factors and "toy2" not in catalog.ADAPTERS


# -- IA3 end to end --------------------------------------------------------------------------
SMALL = {"num-clients": "2", "rounds": "2", "train-size": "300", "eval-size": "64", "local-steps": "3",
         "max-length": "24", "head-init": "random"}


@pytest.mark.slow
def test_ia3_trains_through_flower_and_exports_with_onnx_parity(tmp_path):
    """adapter=ia3 on Flower's simulation runtime: every reply passes the screens, the IA3 vectors
    move away from one, accuracy and loss are reported each round, and ``fedtune export`` of the
    run merges the vectors with the ONNX model matching the unmerged torch model."""
    from safetensors.torch import load_file

    from fedtune.edge_export.export import ExportOptions, export_fp32
    from fedtune.presets import resolve
    from fedtune.simulations.simulate import simulate

    cfg = resolve("tiny", overrides={**SMALL, "adapter": "ia3"})
    simulate(cfg, tmp_path / "run", progress=lambda row: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["rejected"] == [] and r["failures"] == [] for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) for r in rows)
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    vectors = {k: v for k, v in saved.items() if "ia3_l" in k}
    assert len(vectors) == 8  # key, value, attention output, feed-forward output: 2 layers
    moved = [float((v - 1).abs().max()) for v in vectors.values()]
    assert all(m > 1e-4 for m in moved), moved
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "IA3"

    report = export_fp32(tmp_path / "run", tmp_path / "edge", ExportOptions(examples=16, latency_runs=1, warmup=0))
    checks = report["verification"]
    assert checks["torch"]["max_abs_diff"] <= 1e-5  # merging the vectors changes nothing
    assert checks["fp32"]["max_abs_diff"] <= 1e-4 * max(1.0, checks["fp32"]["logit_scale"])
    assert checks["fp32"]["argmax_agreement"] == 1.0
    assert (tmp_path / "edge" / "model.onnx").is_file()
