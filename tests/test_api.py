"""fedtune as a library: the public API, plugins (strategy, dataset, model, adapter kind, entry
points), and ``fedtune app`` (a Flower App for ``flwr run``). The examples and the multi-process
runs are in tests/test_examples.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

import fedtune
from fedtune import catalog, compat, plugin_loader
from fedtune.config import build_config
from fedtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registries():
    """Every registry a plugin writes to, restored afterwards (the tests' plugins stay local)."""
    from fedtune import plugins
    from fedtune.adapter_kinds import KINDS as ADAPTERS
    from fedtune.bases import MODELS
    from fedtune.data.sources import SOURCES
    from fedtune.strategies import RANK_AWARE, SPECS, STRATEGIES

    dicts = [catalog.STRATEGIES, catalog.ADAPTERS, SPECS, RANK_AWARE, plugins._OWNERS, STRATEGIES._items, SOURCES._items,
             MODELS._items, ADAPTERS._items]
    saved = [dict(d) for d in dicts]
    attrs = [(catalog, "ADAPTER_KINDS"), (plugin_loader, "_entry_points_loaded")] + [
        (compat, n) for n in ("CLIENT_LEVEL_STRATEGIES", "SECAGG_STRATEGIES", "ROBUST_STRATEGIES", "SPARSE_STRATEGIES")]
    values = [getattr(m, a) for m, a in attrs]
    modules, path = set(sys.modules), list(sys.path)
    yield
    for d, s in zip(dicts, saved):
        d.clear()
        d.update(s)
    for (m, a), v in zip(attrs, values):
        setattr(m, a, v)
    for name in set(sys.modules) - modules:
        if not name.startswith(("fedtune", "torch", "transformers", "peft", "flwr")):
            del sys.modules[name]
    sys.path[:] = path


def _module(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


# -- the API -------------------------------------------------------------------------------------


def test_import_fedtune_is_cheap_and_exports_the_api():
    code = ("import sys, fedtune; print(sorted(fedtune.__all__)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert out[0] == str(sorted(["ConfigError", "EdgeClassifier", "EdgeGenerator", "Run", "__version__",
                                 "centralized", "export", "load_run", "simulate"]))
    assert out[1] == "[]"  # nothing heavy until a function is used
    assert fedtune.simulate.__module__ == "fedtune.api" and fedtune.ConfigError is ConfigError
    with pytest.raises(AttributeError):
        fedtune.not_a_thing  # noqa: B018


def test_keyword_overrides_are_the_flat_keys(tmp_path):
    from fedtune.api import resolve
    from fedtune.presets import resolve as cli_resolve

    cfg = resolve("tiny", lora_rank=2, num_clients=3, target_modules="query,key")
    assert cfg == cli_resolve("tiny", None, {"lora-rank": "2", "num-clients": "3", "target-modules": "query,key"})
    assert (cfg.model.lora_rank, cfg.partition.num_clients, cfg.model.target_modules) == (2, 3, ("query", "key"))
    toml = tmp_path / "run.toml"
    toml.write_text('rounds = 5\nlora-rank = 6\n')
    assert resolve("tiny", toml, rounds=7).federation.rounds == 7  # preset -> file -> keywords
    assert resolve("tiny", toml).model.lora_rank == 6
    assert resolve("tiny", {"lr": 0.01}).train.lr == 0.01
    assert resolve("tiny", cfg, rounds=9) == cfg.replace(rounds=9)  # a RunConfig replaces the preset
    for kwargs, message in [({"lora_rnk": 4}, "unknown config key 'lora_rnk'"),
                            ({"lora_rank": 0}, "bad value lora-rank=0"),
                            ({"strategy": "fedfoo"}, "unknown strategy 'fedfoo'; valid: fedadam"),
                            ({"plugins": "no_such_plugin_module"}, "no module named 'no_such_plugin_module'")]:
        with pytest.raises(ConfigError, match=message) as err:
            resolve("tiny", **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        fedtune.simulate(preset="nope", out=tmp_path / "never")
    with pytest.raises(ConfigError, match="bad value rounds=0"):  # validated before anything runs
        fedtune.simulate(preset="tiny", rounds=0, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_load_run_reads_config_metrics_summary(tmp_path, quick_cfg):
    from fedtune.artifacts import RunDir

    run = RunDir(tmp_path / "run").create(quick_cfg)
    rows = [{"round": 0, "accuracy": 0.25, "loss": 2.0}, {"round": 1, "accuracy": 0.5, "loss": 1.5}]
    for row in rows:
        run.append_metrics(row)
    loaded = fedtune.load_run(tmp_path / "run")
    assert loaded.config == quick_cfg and loaded.metrics == rows and loaded.summary == {}  # unfinished
    run.write_summary({"final_accuracy": 0.5})
    loaded = fedtune.load_run(str(tmp_path / "run"))
    assert loaded.summary == {"final_accuracy": 0.5}
    frame = loaded.metrics_frame
    assert list(frame["accuracy"]) == [0.25, 0.5] and list(frame.columns) == ["round", "accuracy", "loss"]
    assert loaded.paths["metrics"] == tmp_path / "run" / "metrics.jsonl" and loaded.adapter.name == "adapter"
    assert "2 metric rows, accuracy 0.5000" in repr(loaded)
    with pytest.raises(ConfigError, match="not a run directory"):
        fedtune.load_run(tmp_path)


def test_centralized_returns_its_run(tmp_path):
    run = fedtune.centralized(preset="tiny", out=tmp_path / "c", rounds=1, num_clients=2, local_steps=2,
                              train_size=200, eval_size=50)
    assert isinstance(run, fedtune.Run) and run.path == tmp_path / "c"
    assert [r["round"] for r in run.metrics] == [0, 1] and run.metrics[1]["steps"] > 0
    assert run.summary["final_accuracy"] == run.metrics[1]["accuracy"]
    assert run.config.federation.rounds == 1 and (run.adapter / "adapter_config.json").is_file()


# -- plugins ---------------------------------------------------------------------------------------


def test_the_example_strategy_matches_hand_computed_values(registries):
    sys.path.insert(0, str(ROOT / "examples"))
    import my_strategy

    from fedtune.strategies import SPECS, STRATEGIES
    from fedtune.strategies.lora import ClientFactors

    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [2.0]])  # rank 1, weight 1, scale 2
    a2 = torch.tensor([[3.0, 6.0], [4.0, -4.0]])  # rank 2, weight 3, scale 1
    b2 = torch.tensor([[5.0, 1.0], [4.0, 0.0], [2.0, -2.0]])
    out = my_strategy.holder_avg([ClientFactors(a1, b1, 2.0, 1.0), ClientFactors(a2, b2, 1.0, 3.0)])
    # component 0: (1 * client 1 + 3 * client 2) / 4; component 1: client 2's alone (only it holds it)
    assert torch.allclose(out.A, torch.tensor([[2.5, 5.0], [4.0, -4.0]]))
    assert torch.allclose(out.B, torch.tensor([[4.0, 1.0], [3.0, 0.0], [2.0, -2.0]]))
    assert out.scale == pytest.approx((2.0 + 3.0) / 4)
    spec = SPECS["holder-avg"]
    assert spec.math is my_strategy.holder_avg and spec.rank_aware is not None and spec.info.rank_aware
    assert "holder-avg" in STRATEGIES and "holder-avg" in catalog.STRATEGIES
    assert "holder-avg" not in compat.SECAGG_STRATEGIES  # its StrategyInfo says why not
    cfg = build_config({"strategy": "holder-avg", "profiles": "gpu-small,cpu-edge", "model": "tiny"})
    with pytest.raises(ConfigError, match="secure-aggregation.*holder-avg.*divides each component"):
        cfg.replace(**{"secure-aggregation": "secagg+"})
    strategy = STRATEGIES.get("holder-avg")(cfg)
    assert type(strategy).__name__ == "Plugin_holder-avg" and strategy.rank == 8  # the largest profile rank


def test_a_name_taken_by_fedtune_or_another_plugin_is_an_error_naming_both(tmp_path, registries):
    from fedtune.plugins import StrategyInfo, register_adapter_kind, register_dataset, register_model, \
        register_strategy
    from fedtune.strategies.lora import fedavg

    me = __name__
    cases = [(lambda: register_strategy(StrategyInfo("fedavg", rank_aware=True), fedavg), "strategy 'fedavg'"),
             (lambda: register_dataset("20newsgroups", lambda cfg: None), "dataset '20newsgroups'"),
             (lambda: register_model("minilm", lambda n: None), "model 'minilm'"),
             (lambda: register_adapter_kind("lora", lambda b, c, s: b), "adapter kind 'lora'")]
    for register, what in cases:
        with pytest.raises(ConfigError) as err:
            register()
        assert str(err.value) == f"plugin {me}: {what} clashes with fedtune's built-in {what}; choose another name"
    _module(tmp_path, "plug_one", """
        from fedtune.plugins import register_dataset
        register_dataset("shared-name", lambda cfg: None)
    """)
    _module(tmp_path, "plug_two", """
        from fedtune.plugins import register_dataset
        register_dataset("shared-name", lambda cfg: None)
    """)
    build_config({"plugins": "plug_one", "model": "tiny"})
    build_config({"plugins": "plug_one", "model": "tiny"})  # imported once: no clash with itself
    with pytest.raises(ConfigError, match="^plugin plug_two: dataset 'shared-name' clashes with plugin plug_one's "
                                          "dataset 'shared-name'"):
        build_config({"plugins": ["plug_one", "plug_two"]})
    with pytest.raises(ConfigError, match="exactly one of math, rank_aware, build"):
        register_strategy("two-ways", fedavg, build=lambda cfg: None)


def test_plugin_dataset_model_and_adapter_kind_work_by_name(tmp_path, registries):
    from fedtune.bases import _base_model, model_source
    from fedtune.data import load_dataset
    from fedtune.modeling import build_model

    _module(tmp_path, "toy_plugin", """
        import numpy as np
        from transformers import BertConfig, BertForSequenceClassification
        from fedtune.plugins import Split, TextDataset, register_adapter_kind, register_dataset, register_model

        def toy(cfg):
            texts = tuple(f"word{i % 5} text {i}" for i in range(40))
            split = Split(texts, np.arange(40) % 2, ("all",) * 40)
            return TextDataset("toy", ("even", "odd"), split, split.subset(np.arange(10)))

        def small_bert(num_labels):
            return BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                                            num_attention_heads=2, intermediate_size=32,
                                                            num_labels=num_labels))

        def frozen(base, cfg, seed):  # an adapter kind that trains the classifier head only
            for name, p in base.named_parameters():
                p.requires_grad = name.startswith("classifier")
            return base

        register_dataset("toy", toy)
        register_model("small-bert", small_bert, tokenizer="minilm")
        register_adapter_kind("head-only", frozen)
    """)
    cfg = build_config({"plugins": "toy_plugin", "dataset": "toy", "model": "small-bert", "adapter": "head-only",
                        "head-init": "random"})
    assert cfg.federation.plugins == ("toy_plugin",) and json.loads(cfg.to_json())["plugins"] == ["toy_plugin"]
    ds = load_dataset(cfg.data)
    assert (ds.name, ds.num_labels, len(ds.train), len(ds.test)) == ("toy", 2, 40, 10)
    assert model_source("small-bert") == model_source("minilm")
    assert _base_model("small-bert", 3).config.hidden_size == 16
    model = build_model(cfg.model, 2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert "head-only" in catalog.ADAPTER_KINDS


def test_installed_packages_register_through_the_entry_point_group(tmp_path, registries, monkeypatch):
    dist = tmp_path / "site" / "fedtune_toy-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedtune-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedtune.plugins]\ntoy = toy_ep:setup\n")
    _module(tmp_path / "site", "toy_ep", """
        from fedtune.plugins import register_dataset
        CALLS = []

        def setup():
            CALLS.append(1)
            register_dataset("toy-ep", lambda cfg: None)
    """)
    assert plugin_loader.load_entry_points(force=True) == ["toy"]
    from fedtune import plugins
    from fedtune.data.sources import SOURCES

    assert "toy-ep" in SOURCES and plugins.owner("dataset", "toy-ep") == "toy_ep"
    assert plugin_loader.load_entry_points() == []  # once per process
    assert sys.modules["toy_ep"].CALLS == [1]
    (dist / "entry_points.txt").write_text("[fedtune.plugins]\nbroken = toy_missing_module\n")
    with pytest.raises(ConfigError, match="plugin entry point broken = 'toy_missing_module' .* failed to load"):
        plugin_loader.load_entry_points(force=True)


# -- fedtune app -----------------------------------------------------------------------------------


def test_fedtune_app_writes_a_flower_app_with_the_run_config(tmp_path, capsys, registries):
    from flwr.cli.config_utils import load_and_validate

    from fedtune.cli import main
    from fedtune.server.deployed import config_from_run

    _module(tmp_path / "src", "app_plugin", """
        from fedtune.plugins import register_dataset
        register_dataset("app-toy", lambda cfg: None)
    """)
    app = tmp_path / "app"
    argv = ["app", str(app), "--preset", "tiny", "--set", "rounds=3", "--set", "plugins=app_plugin",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "flwr run" in capsys.readouterr().out
    config, warnings = load_and_validate(app / "pyproject.toml")  # what `flwr run` checks, modules importable
    assert config is not None and not warnings
    flwr = config["tool"]["flwr"]
    assert flwr["app"]["components"] == {"serverapp": "fedtune.server.deployed:app",
                                         "clientapp": "fedtune.client.proxy:app"}
    assert config["project"]["dependencies"] == []  # runs where fedtune is installed: nothing synced
    assert flwr["federations"]["default"] == "fedtune-local"
    assert flwr["federations"]["fedtune-local"]["options"]["num-supernodes"] == 4  # the tiny preset's clients
    cfg, run_dir, resume = config_from_run(flwr["app"]["config"])
    assert cfg.federation.rounds == 3 and cfg.federation.plugins == ("app_plugin",)
    assert run_dir == (tmp_path / "run").resolve() and resume is False
    assert (app / "app_plugin.py").read_text() == (tmp_path / "src" / "app_plugin.py").read_text()  # in the FAB
    assert main(["app", str(tmp_path / "bad"), "--set", "colour=blue"]) == 2
    assert "unknown config key 'colour'" in capsys.readouterr().err
