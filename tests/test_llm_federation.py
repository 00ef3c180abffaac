"""The causal-LM task through Flower's simulation runtime on the tiny config-built Llama:
perplexity per round and generations, a rank-aware strategy with device profiles, DP-SGD."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from fedtune.presets import resolve
from fedtune.server.run_dir import RunDir

SMALL = {"model": "tiny-llama", "num-clients": 2, "rounds": 2, "local-steps": 3, "batch-size": 8,
         "eval-size": 32, "max-length": 64, "lr": 5e-3, "min-partition-size": 10}


@pytest.mark.slow
def test_llm_federation_lowers_perplexity_and_writes_generations(tmp_path):
    from fedtune.llm.evaluate import PROMPTS, read_generations
    from fedtune.simulations.simulate import simulate

    summary = simulate(resolve("llm", None, SMALL), tmp_path, progress=lambda row: None)
    rows = RunDir(tmp_path).metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
    assert rows[2]["perplexity"] < rows[1]["perplexity"] < rows[0]["perplexity"]
    assert rows[1]["clients"] == 2 and not rows[1]["failures"] and rows[1]["bytes_up"] > 0
    gens = read_generations(tmp_path)
    assert [(g["round"], g["prompt"]) for g in gens] == [(r, p) for r in (0, 1, 2) for p in PROMPTS]
    assert all(0 < len(g["tokens"]) <= 32 for g in gens)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 4  # 2 layers x q,k,v,o x (A, B): no head for a causal LM
    assert summary["eval_examples"] == 32


@pytest.mark.slow
def test_llm_rank_aware_strategy_with_profiles_and_sample_dp(tmp_path):
    """FlexLoRA over clients of ranks 8 and 2 (gpu-small, cpu-edge), each running DP-SGD."""
    from fedtune.simulations.simulate import simulate

    cfg = resolve("llm", None, {**SMALL, "strategy": "flexlora", "profiles": "gpu-small,cpu-edge",
                                "dp": "sample", "noise-multiplier": "0.5", "max-grad-norm": "1.0"})
    simulate(cfg, tmp_path, progress=lambda row: None)
    rows = RunDir(tmp_path).metrics()
    assert len(rows) == 3 and all(math.isfinite(r["perplexity"]) for r in rows)
    assert rows[2]["epsilon"] > rows[1]["epsilon"] > 0
    assert not rows[1]["failures"] and not rows[2]["failures"] and rows[2]["clients"] == 2
    assert "perplexity_rank_2" not in rows[1] and "loss_rank_2" in rows[1]  # each profile's model evaluated too
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    ranks = {t.shape[0] for k, t in adapter.items() if "lora_A" in k}
    assert ranks == {8}  # the global adapter at the largest profile rank
    deltas = tmp_path / "adapter" / "base_delta.safetensors"
    assert deltas.is_file() and len(load_file(str(deltas))) == 2 * 4  # FlexLoRA: dense deltas per adapted layer
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["task"] == "causal-lm"
