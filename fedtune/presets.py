"""Named starting points for a run. A preset is a set of flat overrides on the defaults."""

from __future__ import annotations

from typing import Any

from fedtune.config import RunConfig, build_config, read_toml
from fedtune.registry import Registry

PRESETS: Registry[dict[str, Any]] = Registry("preset")

# The main job: all-MiniLM-L6-v2 + LoRA on 20 Newsgroups, 10 Dirichlet(0.5) clients.
PRESETS.register("default")({})

# Seconds, not minutes: a tiny config-built BERT on a slice of the same real data.
PRESETS.register("quick")(
    {
        "model": "tiny",
        "num-clients": 4,
        "rounds": 2,
        "train-size": 800,
        "eval-size": 200,
        "max-length": 32,
        "local-steps": 4,
        "batch-size": 16,
        "fraction-evaluate": 0.5,
        "lora-rank": 4,
        "client-cpus": 1,
    }
)


def resolve(preset: str = "default", toml_path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """preset -> TOML file -> --set overrides, validated once."""
    flat = dict(PRESETS.get(preset))
    if toml_path:
        flat.update(read_toml(toml_path))
    flat.update(overrides or {})
    return build_config(flat)
