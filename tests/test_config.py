import pytest

from fedtune.config import RunConfig, build_config, parse_set
from fedtune.errors import ConfigError
from fedtune.presets import resolve


def test_flat_round_trip_is_exact():
    cfg = resolve("tiny", overrides={"lora-rank": "3", "target-modules": "query,value", "lr": "0.004"})
    assert cfg.model.lora_rank == 3 and cfg.model.target_modules == ("query", "value") and cfg.train.lr == 0.004
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_toml_then_set_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nlr = 0.001\n[model]\nlora-rank = 2\n')
    cfg = resolve("default", str(f), {"rounds": "3"})
    assert (cfg.federation.rounds, cfg.train.lr, cfg.model.lora_rank) == (3, 0.001, 2)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("lora-rank", "-1", "lora-rank=-1"),
        ("lora-rank", "2.5", "lora-rank='2.5'"),
        ("lora-alpha", "0", "lora-alpha=0.0"),
        ("fraction-train", "1.5", "fraction-train=1.5"),
        ("lr", "abc", "lr='abc'"),
        ("head-init", "zeros", "head-init='zeros'"),
    ],
)
def test_bad_values_name_the_value(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        build_config({key: value})


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'rnds'.*rounds"):
        build_config({"rnds": 3})


def test_unknown_preset_lists_valid():
    with pytest.raises(ConfigError, match="unknown preset 'big'; valid: default, llm, private, quick, tiny"):
        resolve("big")


def test_parse_set_rejects_missing_equals():
    assert parse_set(["a=1", "b = x"]) == {"a": "1", "b": "x"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["rounds"])


def test_simulate_help_lists_every_preset(capsys):
    from fedtune.cli import build_parser
    from fedtune.presets import PRESETS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(f"{name} (" in out for name in PRESETS.names())


def test_quick_is_minilm_cut_to_two_layers_with_its_real_weights():
    """The newcomer's preset runs a real (truncated) MiniLM; the tests' preset the tiny one."""
    import torch

    from fedtune.modeling import _base_model

    assert resolve("quick").model.model == "minilm-2" and resolve("tiny").model.model == "tiny"
    small, full = _base_model("minilm-2", 4), _base_model("minilm", 4)
    assert len(small.bert.encoder.layer) == 2 and small.config.num_hidden_layers == 2
    for name, p in small.bert.named_parameters():
        assert torch.equal(p, dict(full.bert.named_parameters())[name]), name
    ids = torch.tensor([[101, 7592, 2088, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = small(input_ids=ids, attention_mask=mask, labels=torch.tensor([1]))
    assert out.logits.shape == (1, 4) and out.loss is not None
    padded = small(input_ids=ids[:, :4], attention_mask=mask[:, :4]).logits  # mean over real tokens only
    assert torch.allclose(out.logits, padded, atol=1e-5)


def test_head_init_choices_are_the_registry_plus_random():
    from fedtune.config import HEAD_INIT_CHOICES
    from fedtune.head_init import HEAD_INITS

    assert set(HEAD_INIT_CHOICES) == {*HEAD_INITS.names(), "random"}
    cfg = build_config({"head-init": "ridge", "head-shrinkage": "0.25"})
    assert (cfg.train.head_init, cfg.train.head_shrinkage) == ("ridge", 0.25)
    with pytest.raises(ConfigError, match=r"head-shrinkage=1\.5"):
        build_config({"head-shrinkage": "1.5"})


@pytest.mark.parametrize("dp", [{"dp": "sample", "target-epsilon": "8"},
                                {"dp": "client-fixed", "noise-multiplier": "1"}])
def test_ridge_head_refused_under_dp(dp):
    with pytest.raises(ConfigError, match="head-init='ridge' with dp=.*second moment"):
        build_config({"head-init": "ridge", **dp})
    with pytest.raises(ConfigError, match="head-init='ridge': a causal LM"):
        resolve("llm", None, {"head-init": "ridge"})
