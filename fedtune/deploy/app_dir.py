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

import importlib.util
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.config import RunConfig
from fedtune.server.deployed import RESUME_KEY, RUN_DIR_KEY

APP_NAME = "fedtune-federation"
USER_APP_NAME = "fedtune-app"  # the app ``fedtune app DIR`` writes for a user's own ``flwr run``
LOCAL_FEDERATION = "fedtune-local"  # its local-simulation federation (a SuperLink connection once Flower migrates it)
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


def _project(name: str, cfg: RunConfig, run_dir: str | Path, resume: bool) -> dict[str, Any]:
    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": name, "version": "1.0.0", "description": "fedtune federation (generated)",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.server.deployed:app", "clientapp": "fedtune.client.proxy:app"},
            "config": run_config_toml(cfg, run_dir, resume),
        }}},
    }


def write_app(folder: str | Path, cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Write ``folder/pyproject.toml`` (and the run's local plugin modules, if any) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(_project(APP_NAME, cfg, run_dir, resume)))
    copy_plugins(cfg.federation.plugins, folder)  # local plugin modules travel in the FAB (the ServerApp imports them)
    return folder


def write_user_app(folder: str | Path, cfg: RunConfig, run_dir: str | Path, num_supernodes: int | None = None) -> Path:
    """``fedtune app DIR``: a standard Flower App a user runs with ``flwr run DIR`` (local
    simulation) or ``flwr run DIR my-federation`` (an existing SuperLink).

    The pyproject holds fedtune's ServerApp and ClientApp as its components, the run's config
    as ``[tool.flwr.app.config]`` and a local-simulation federation ``fedtune-local`` with one
    virtual SuperNode per client (Flower 1.41 moves it into its own config on the first
    ``flwr run``). It declares no dependencies: the app runs in the environment fedtune is
    installed in (nothing for Flower to sync, no CUDA torch pulled into a fresh one). The
    run's plugin modules, when they are local files, are copied beside it: they travel in
    the FAB and the ServerApp and ClientApps import them from there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = _project(USER_APP_NAME, cfg, run_dir, resume=False)
    fed = cfg.federation
    resources = {"num-cpus": fed.client_cpus, "num-gpus": fed.client_gpus}
    doc["tool"]["flwr"]["federations"] = {
        "default": LOCAL_FEDERATION,
        LOCAL_FEDERATION: {"options": {"num-supernodes": num_supernodes or cfg.partition.num_clients,
                                       "backend": {"client-resources": resources}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    copy_plugins(cfg.federation.plugins, folder)
    return folder


def copy_plugins(names: tuple[str, ...], folder: Path) -> list[Path]:
    """Copy the plugin modules that are local files (not installed packages) into ``folder``."""
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    copied = []
    for name in names:
        top = name.split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue
        src = Path(spec.origin).resolve()
        src = src.parent if src.name == "__init__.py" else src
        if any(root in src.parents for root in installed) or top == "fedtune":
            continue
        dst = folder / src.name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
        copied.append(dst)
    return copied


def write_connection(flwr_home: str | Path, address: str, ca: str | Path) -> Path:
    """``<flwr_home>/config.toml`` with one default connection, TLS verified against ``ca``."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    doc = {"superlink": {"default": CONNECTION,
                         CONNECTION: {"address": address, "root-certificates": str(Path(ca).resolve())}}}
    path = home / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path
