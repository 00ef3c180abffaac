"""fedtune's version, and the installed version of any distribution (for reports)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project].version (tests/test_edge_export.py checks)


def installed(package: str) -> str:
    """The installed distribution's version; fedtune's own when run from a source tree
    (``python -m fedtune`` with the checkout on PYTHONPATH), else "not installed"."""
    try:
        return version(package)
    except PackageNotFoundError:
        return __version__ if package == "fedtune" else "not installed"
