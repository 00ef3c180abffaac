"""Flat hyphenated keys (``lora-rank=4``): the one parser of a value into a field's type.

Shared by the run config (``fedtune.config``: ``--set``, TOML, JSON) and the device profiles
(``fedtune.profile_specs``: ``"NAME lora-rank=4 layers=2"``), whose keys are the hyphenated
names of their dataclasses' fields and whose types are those fields' annotations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def key_of(name: str) -> str:
    """A dataclass field's flat key: ``lora_rank`` -> ``lora-rank``."""
    return name.replace("_", "-")


def fields_by_key(cls: type) -> dict[str, dataclasses.Field]:
    """{flat key: field} of a dataclass, in declaration order."""
    return {key_of(f.name): f for f in dataclasses.fields(cls)}


def coerce(raw: Any, kind: str) -> Any:
    """``raw`` (a TOML/JSON value or a string) as the annotated type ``kind`` (``int``,
    ``float``, ``bool``, ``str``, ``tuple[...]``; ``X | None``: none/null/empty unsets it).
    Raises ValueError or TypeError on a value that is not of that type."""
    if kind.endswith(" | None"):
        if raw is None or str(raw).strip().lower() in ("", "none", "null"):
            return None
        kind = kind.removesuffix(" | None")
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in TRUE:
            return True
        if str(raw).lower() in FALSE:
            return False
        raise ValueError(raw)
    if kind == "int":
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw)
    if kind == "float":
        if isinstance(raw, bool):
            raise ValueError(raw)
        return float(raw)
    if kind.startswith("tuple"):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(str(x).strip() for x in items if str(x).strip())
    return str(raw)
