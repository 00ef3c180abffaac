"""The Flower app folder ``fedtune serve`` hands to ``flwr run``, and the ``flwr`` CLI's
connection to the SuperLink.

The app holds only a ``pyproject.toml``: its components point at the installed package
(``fedtune.server.deployed:app``, ``fedtune.client.proxy:app``), so the FAB is a few hundred
bytes, and it declares no dependencies, so nothing is synced into a fresh environment (the
SuperLink also runs with ``--disable-runtime-dependency-installation``; SuperNodes do not
install by default). ``[tool.flwr.app.config]`` lists every fedtune key of the run plus
``run-dir`` and ``resume``: ``flwr run APP -c 'rounds=5'`` works like ``--set``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from fedtune.config import RunConfig
from fedtune.server.deployed import RESUME_KEY, RUN_DIR_KEY

APP_NAME = "fedtune-federation"
CONNECTION = "fedtune"  # the SuperLink connection's name in the flwr CLI's config.toml


def run_config_toml(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """The flat keys as TOML values: lists as comma-joined strings, unset (None) keys left out."""
    out: dict[str, Any] = {}
    for key, value in cfg.to_flat().items():
        if value is None:
            continue
        out[key] = ",".join(map(str, value)) if isinstance(value, list) else value
    out[RUN_DIR_KEY] = str(Path(run_dir).resolve())
    out[RESUME_KEY] = resume
    return out


def write_app(folder: str | Path, cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Write ``folder/pyproject.toml`` (the folder holds nothing else) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": APP_NAME, "version": "1.0.0", "description": "fedtune federation (generated)",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.server.deployed:app", "clientapp": "fedtune.client.proxy:app"},
            "config": run_config_toml(cfg, run_dir, resume),
        }}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return folder


def write_connection(flwr_home: str | Path, address: str, ca: str | Path) -> Path:
    """``<flwr_home>/config.toml`` with one default connection, TLS verified against ``ca``."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    doc = {"superlink": {"default": CONNECTION,
                         CONNECTION: {"address": address, "root-certificates": str(Path(ca).resolve())}}}
    path = home / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path
