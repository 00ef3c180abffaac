"""Importing user plugins: the run's ``plugins`` modules and installed ``fedtune.plugins`` entry points.

A plugin is an ordinary Python module that calls the registration functions of
``fedtune.plugins`` when imported (a strategy, a dataset source, a model builder, an adapter
kind). ``fedtune.config.build_config`` calls :func:`load` before it checks any name, so every
process that builds a run's config imports the same plugins: the CLI and the API, the
ServerApp and the ClientApps of a deployed run, and the Ray actors of a simulation (they
build the config from the run's JSON). Importing is once per process (Python's module cache).

Installed packages declare plugins in the ``fedtune.plugins`` entry-point group
(``[project.entry-points."fedtune.plugins"] mine = "my_pkg.fedtune_plugin"``); they load
with the first config built in a process. An entry point naming a function (``mod:fn``)
has the function called once, with no argument.

Torch-free: this module imports only the standard library (a plugin may import what it needs).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points

from fedtune.errors import ConfigError

GROUP = "fedtune.plugins"

_entry_points_loaded = False


def load(names: Iterable[str]) -> None:
    """Import each module of ``names`` (once) and every installed entry point (once per process);
    a module that cannot be imported is a one-line ConfigError naming it."""
    load_entry_points()
    for name in names:
        name = str(name).strip()
        if not name or name in sys.modules:
            continue
        try:
            _import(name)
        except ImportError as exc:
            if exc.name and name.startswith(exc.name) and exc.name not in sys.modules:  # the plugin itself is missing
                raise ConfigError(f"bad value plugins={name!r}: no module named {exc.name!r} on the Python path") \
                    from None
            raise ConfigError(f"bad value plugins={name!r}: importing it failed: {exc}") from None


def _import(name: str) -> None:
    """Import ``name``; a module missing from the path is looked for in the working directory too
    (``fedtune simulate --set plugins=my_module`` beside my_module.py, as ``python -m`` would find it).
    The directory then stays on ``sys.path``, which Flower hands to its simulation actors."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        importlib.import_module(name)


def load_entry_points(force: bool = False) -> list[str]:
    """Load the ``fedtune.plugins`` entry points of installed packages (once; ``force``: again).
    Returns the names of the entry points loaded now."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True
    loaded = []
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line naming the entry point, whatever it raised
            raise ConfigError(f"plugin entry point {ep.name} = {ep.value!r} ({GROUP}) failed to load: {exc}") from None
        loaded.append(ep.name)
    return loaded
