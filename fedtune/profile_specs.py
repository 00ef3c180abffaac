"""Device profiles as a run declares them: the torch-free half of fedtune.profiles.

The ``Profile`` record, the built-in ones, the run's own (``profile-defs``), the parsing of
``profiles`` (names, name:share, auto) and the views of a config a profile gives (``apply``,
``server_model``). Checked by the config; ``fedtune.profiles`` adds hardware detection and
the assignment of ``auto`` (see its docstring for the whole story).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedtune.catalog import check_device
from fedtune.errors import ConfigError
from fedtune.flat_keys import coerce, fields_by_key
from fedtune.registry import Registry

AUTO = "auto"
DEFAULT = "default"  # the implicit profile of a run without profiles


@dataclass(frozen=True)
class Profile:
    """One device class. ``None`` fields inherit the run's setting."""

    name: str
    lora_rank: int
    layers: int = 0  # how many of the deepest transformer layers carry adapters; 0 = all
    batch_size: int | None = None
    local_steps: int | None = None
    num_cpus: int | None = None  # torch threads of the client (simulation actors all get client-cpus)
    num_gpus: float = 0.0  # the GPU share the device class has (informs detection; device says where it trains)
    sparse_density: float | None = None  # adapter=sparse: this device's share of trained entries
    base_dtype: str | None = None  # task=causal-lm: frozen base weights (bfloat16/float16 on GPUs); None = the run's
    gradient_checkpointing: bool | None = None  # recompute activations; None = the run's
    device: str | None = None  # auto | cpu | cuda | cuda:N (fedtune/device.py); None = the run's
    base_quant: str | None = None  # none | nf4 | int8 (bitsandbytes, CUDA only); None = the run's

    def __post_init__(self) -> None:
        for key, value, low in (("lora-rank", self.lora_rank, 1), ("layers", self.layers, 0),
                                ("batch-size", self.batch_size, 1), ("local-steps", self.local_steps, 1),
                                ("num-cpus", self.num_cpus, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ConfigError(f"bad profile {self.name!r}: {key}={value!r} must be an integer >= {low}")
        if self.sparse_density is not None and not 0.0 < self.sparse_density <= 1.0:
            raise ConfigError(f"bad profile {self.name!r}: sparse-density={self.sparse_density!r} must be in (0, 1]")
        if self.num_gpus < 0:
            raise ConfigError(f"bad profile {self.name!r}: num-gpus={self.num_gpus!r} must be >= 0")
        if self.base_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"bad profile {self.name!r}: base-dtype={self.base_dtype!r} must be float32, bfloat16 "
                              "or float16")
        if self.device is not None:
            check_device(f"profile {self.name!r} device", self.device)
        if self.base_quant not in (None, "none", "nf4", "int8"):
            raise ConfigError(f"bad profile {self.name!r}: base-quant={self.base_quant!r} must be none, nf4 or int8")


BUILTIN: Registry[Profile] = Registry("profile")
for _p in (Profile("gpu-large", 16, num_gpus=1.0), Profile("gpu-medium", 16, num_gpus=1.0),
           Profile("gpu-small", 8, num_gpus=1.0), Profile("cpu-edge", 2, layers=3, batch_size=8, device="cpu")):
    BUILTIN.register(_p.name)(_p)

def flag(raw: str) -> bool:
    """A profile's on/off field: 1/true/yes or 0/false/no."""
    return coerce(raw, "bool")


# A profile's keys: its fields but the name, hyphenated (fedtune.flat_keys); values parse as their annotated types.
_FIELDS = {k: f for k, f in fields_by_key(Profile).items() if k != "name"}
_TYPE_NAMES = {"bool": "flag"}  # what an error calls a field's type


def parse_def(spec: str) -> Profile:
    """``"NAME lora-rank=4 layers=2"`` -> Profile; a bad field is a one-line ConfigError."""
    name, *items = spec.split()
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in _FIELDS:
            raise ConfigError(f"bad profile {name!r}: {item!r}; fields: {', '.join(_FIELDS)}")
        kind = _FIELDS[key].type.removesuffix(" | None")  # "none" is no value: leave the field out to inherit
        try:
            values[_FIELDS[key].name] = coerce(raw, kind)
        except ValueError:
            raise ConfigError(f"bad profile {name!r}: {key}={raw!r} is not a {_TYPE_NAMES.get(kind, kind)}") from None
    if "lora_rank" not in values:
        raise ConfigError(f"bad profile {name!r}: lora-rank is required")
    return Profile(name, **values)


def to_def(name: str, table: dict[str, Any]) -> str:
    """A TOML ``[profiles.NAME]`` table -> the spec string ``parse_def`` reads."""
    return " ".join([name, *(f"{k.replace('_', '-')}={v}" for k, v in table.items())])


def registry(defs: Sequence[str] = ()) -> Registry[Profile]:
    """The built-in profiles plus the run's own (``profile-defs``)."""
    table: Registry[Profile] = Registry("profile")
    for p in [BUILTIN.get(n) for n in BUILTIN] + [parse_def(s) for s in defs if s.strip()]:
        if p.name in table or p.name in (AUTO, DEFAULT):
            raise ConfigError(f"bad profile {p.name!r}: the name is taken")
        table.register(p.name)(p)
    return table


def _parse_assignment(spec: str, table: Registry[Profile]) -> list[tuple[Profile, float | None]]:
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, sep, share = item.partition(":")
        try:
            out.append((table.get(name.strip()), float(share) if sep else None))
        except ValueError:
            raise ConfigError(f"bad value profiles={spec!r}: {share!r} is not a proportion") from None
    shares = [s for _, s in out]
    if any(s is None for s in shares) and any(s is not None for s in shares):
        raise ConfigError(f"bad value profiles={spec!r}: give every profile a proportion, or none")
    if shares and shares[0] is not None and (min(shares) <= 0 or abs(sum(shares) - 1.0) > 1e-6):
        raise ConfigError(f"bad value profiles={spec!r}: proportions must be > 0 and sum to 1")
    return out


def check(spec: str, defs: Sequence[str]) -> None:
    """Validate ``profiles`` and ``profile-defs`` (called once, by the config)."""
    table = registry(defs)
    if spec.strip() not in ("", AUTO):
        _parse_assignment(spec, table)


def default_profile(lora_rank: int, lora_layers: int) -> Profile:
    """The implicit profile of a run without ``profiles``: the run's own adapter."""
    return Profile(DEFAULT, lora_rank, lora_layers)


def candidates(cfg) -> list[Profile]:
    """Every profile a client of ``cfg`` may hold (for ``auto``: every known profile)."""
    spec = cfg.federation.profiles.strip()
    if not spec:
        return [default_profile(cfg.model.lora_rank, cfg.model.lora_layers)]
    table = registry(cfg.federation.profile_defs)
    if spec == AUTO:
        return [table.get(n) for n in table]
    return list({p.name: p for p, _ in _parse_assignment(spec, table)}.values())


def lookup(cfg, name: str) -> Profile:
    """A profile by name under ``cfg`` (``default`` = the run's own adapter)."""
    if name == DEFAULT:
        return default_profile(cfg.model.lora_rank, cfg.model.lora_layers)
    return registry(cfg.federation.profile_defs).get(name)


def apply(cfg, profile: Profile):
    """``cfg`` as the client holding ``profile`` runs it: its rank, layers, batch, steps, threads."""
    model = replace(cfg.model, lora_rank=profile.lora_rank, lora_layers=profile.layers,
                    sparse_density=profile.sparse_density or cfg.model.sparse_density)
    train = replace(cfg.train, batch_size=profile.batch_size or cfg.train.batch_size,
                    local_steps=profile.local_steps or cfg.train.local_steps)
    model = replace(model, base_dtype=profile.base_dtype or model.base_dtype, gradient_checkpointing=(
        model.gradient_checkpointing if profile.gradient_checkpointing is None else profile.gradient_checkpointing),
        device=profile.device or model.device, base_quant=profile.base_quant or model.base_quant)
    fed = replace(cfg.federation, client_cpus=profile.num_cpus or cfg.federation.client_cpus)
    return replace(cfg, model=model, train=train, federation=fed)


def server_model(cfg):
    """The server's ModelConfig, on ``server-device``: the largest rank any client may hold, on
    every layer (the global adapter each client's slice is cut from); without profiles, the run's own."""
    model = replace(cfg.model, device=cfg.model.server_device)
    if not cfg.federation.profiles.strip():
        return model
    return replace(model, lora_rank=max(p.lora_rank for p in candidates(cfg)), lora_layers=0)
