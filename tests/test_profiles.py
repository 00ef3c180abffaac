"""Device profiles: built-ins, user-defined ones, assignment to clients, hardware detection."""

from __future__ import annotations

import pytest

from fedtune import profiles as P
from fedtune.config import build_config, read_toml
from fedtune.errors import ConfigError


def cfg(**flat):
    return build_config({"num-clients": 10, **flat})


def test_builtins_and_user_profiles_share_one_registry() -> None:
    table = P.registry(["mid lora-rank=4 layers=2 batch-size=8 local-steps=3 num-cpus=1"])
    assert table.names() == ["cpu-edge", "gpu-large", "gpu-medium", "gpu-small", "mid"]
    assert (table.get("gpu-large").lora_rank, table.get("gpu-small").lora_rank, table.get("cpu-edge").lora_rank) == (16, 8, 2)
    assert table.get("cpu-edge").layers > 0  # fewer (the deepest) layers
    assert table.get("mid") == P.Profile("mid", 4, layers=2, batch_size=8, local_steps=3, num_cpus=1)
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        table.get("nope")


@pytest.mark.parametrize("spec, why", [
    ("x layers=2", "lora-rank is required"), ("x lora-rank=0", "lora-rank=0"), ("x lora-rank=two", "not a int"),
    ("x rank=4", "'rank=4'"), ("gpu-large lora-rank=4", "taken"),
])
def test_bad_profile_definitions_are_one_line_errors(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        cfg(**{"profile-defs": spec})


def test_round_robin_proportions_and_per_client() -> None:
    rr = cfg(profiles="gpu-large,gpu-small,cpu-edge")
    assert [P.assign(rr, c).name for c in range(4)] == ["gpu-large", "gpu-small", "cpu-edge", "gpu-large"]
    share = cfg(profiles="gpu-large:0.2,cpu-edge:0.8")
    assert [P.assign(share, c).name for c in range(10)] == ["gpu-large"] * 2 + ["cpu-edge"] * 8
    names = ["cpu-edge", "gpu-small"] * 5
    explicit = cfg(profiles=",".join(names))
    assert [P.assign(explicit, c).name for c in range(10)] == names
    assert {p.name for p in P.candidates(share)} == {"gpu-large", "cpu-edge"}


@pytest.mark.parametrize("spec", ["gpu-large:0.5,cpu-edge:0.4", "gpu-large:0.5,cpu-edge", "nope", "gpu-large:x"])
def test_bad_assignments_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        cfg(profiles=spec)


def test_no_profiles_means_the_runs_own_adapter() -> None:
    c = cfg(**{"lora-rank": 4})
    p = P.assign(c, 3)
    assert (p.name, p.lora_rank, p.layers) == (P.DEFAULT, 4, 0)
    assert P.apply(c, p) == c  # same config: same cached model, bit-identical behaviour
    assert P.server_model(c) == c.model


def test_apply_sets_rank_layers_batch_steps_threads() -> None:
    c = cfg(profiles="mid", **{"profile-defs": "mid lora-rank=4 layers=2 batch-size=8 local-steps=3 num-cpus=1"})
    mine = P.apply(c, P.assign(c, 0))
    assert (mine.model.lora_rank, mine.model.lora_layers, mine.train.batch_size, mine.train.local_steps,
            mine.federation.client_cpus) == (4, 2, 8, 3, 1)
    assert mine.model.lora_alpha == c.model.lora_alpha  # alpha is the run's: scale = alpha / r per rank
    both = cfg(profiles="mid,gpu-large", **{"profile-defs": "mid lora-rank=4"})
    assert (P.server_model(both).lora_rank, P.server_model(both).lora_layers) == (16, 0)


def test_toml_profile_tables(tmp_path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[federation]\nprofiles = "gpu-large:0.5,tiny-edge:0.5"\n\n'
                 "[profiles.tiny-edge]\nlora-rank = 2\nlayers = 1\nbatch-size = 4\n")
    flat = read_toml(f)
    assert flat["profile-defs"] == ["tiny-edge lora-rank=2 layers=1 batch-size=4"]
    c = cfg(**flat)
    assert P.assign(c, 9) == P.Profile("tiny-edge", 2, layers=1, batch_size=4)
    assert P.registry(c.federation.profile_defs).get("tiny-edge").lora_rank == 2
    assert build_config(c.to_flat()) == c  # survives the JSON trip to the clients


@pytest.mark.parametrize("hw, name, device, dtype, ckpt", [
    (P.Hardware(0, 0), "cpu-edge", "cpu", None, None),
    (P.Hardware(1, 8 * 2**30), "gpu-small", None, "bfloat16", True),
    (P.Hardware(2, 24 * 2**30), "gpu-medium", None, "bfloat16", True),
    (P.Hardware(1, 80 * 2**30), "gpu-large", None, "bfloat16", False),
])
def test_detect_profile_from_a_probe(hw: P.Hardware, name: str, device, dtype, ckpt) -> None:
    p = P.detect_profile(lambda: hw)
    assert (p.name, p.device, p.base_dtype, p.gradient_checkpointing, p.base_quant) == (name, device, dtype, ckpt, None)


@pytest.mark.parametrize("gib, share, params, name, quant", [
    (24, 0.0, 8_000_000_000, "gpu-medium", "nf4"),  # 16 GB of bf16 weights on 24 GiB: 4-bit (H100: 12.4 vs 18.6 GiB)
    (80, 0.0, 8_000_000_000, "gpu-large", None),  # fits in bf16
    (24, 0.0, 1_200_000_000, "gpu-medium", None),  # 1B: 4-bit would cost more memory than bf16
    (80, 0.25, 8_000_000_000, "gpu-medium", "nf4"),  # a quarter of an 80 GiB card is a 20 GiB device
])
def test_auto_profile_quantizes_only_where_the_weights_dominate(gib, share, params, name, quant) -> None:
    p = P.detect_profile(lambda: P.Hardware(1, gib * 2**30), share, lambda: params)
    assert (p.name, p.base_quant) == (name, quant)


def test_auto_assignment_uses_the_probe_and_the_real_probe_runs(monkeypatch) -> None:
    c = cfg(profiles="auto")
    assert P.assign(c, 0, probe=lambda: P.Hardware(1, 80 * 2**30)).name == "gpu-large"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda i=0: (4 * 2**30, 8 * 2**30))
    assert P.probe_hardware() == P.Hardware(1, 4 * 2**30)
    assert P.assign(c, 0).name == "gpu-small"
    assert P.server_model(c).lora_rank == 16  # auto: any profile may join, the server holds the largest


def test_auto_on_a_gpu_respects_what_the_run_refuses(monkeypatch) -> None:
    gpu = lambda: P.Hardware(1, 8 * 2**30)  # noqa: E731 - a gpu-small device: bf16 + checkpointing
    private = cfg(profiles="auto", dp="sample", **{"noise-multiplier": 1.0, "head-init": "ncm"})
    found = P.assign(private, 0, probe=gpu)
    assert (found.name, found.gradient_checkpointing) == ("gpu-small", False)  # dp=sample refuses checkpointing
    P.apply(private, found)  # a valid config
    monkeypatch.setattr("fedtune.modeling.base_params", lambda model: 8_000_000_000)
    assert P.assign(cfg(profiles="auto"), 0, probe=gpu).base_quant == "nf4"
    assert P.assign(cfg(profiles="auto", adapter="sparse"), 0, probe=gpu).base_quant is None
