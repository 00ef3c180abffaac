"""The ServerApp for Flower's deployment engine (``flwr run`` against a SuperLink).

In simulation the server's config is a closure (``make_server_app``); deployed, it comes
from the Flower run config: every fedtune flat key present there (``rounds = 2``,
``lora-rank = 4``, ...; the app folder ``fedtune serve`` writes lists them all, and
``flwr run -c 'rounds=3'`` overrides them) plus ``run-dir``, the folder on the SuperLink's
machine that receives metrics.jsonl, the adapter and summary.json, and ``resume``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import FIELDS, RunConfig, build_config
from fedtune.errors import ConfigError
from fedtune.server.app import run_federation
from fedtune.artifacts import RunDir

RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"  # true: continue the run in run-dir from its last checkpoint (docs/robustness.md)

app = ServerApp()


def config_from_run(run_config: Mapping[str, Any]) -> tuple[RunConfig, Path, bool]:
    """(the run's config from its fedtune keys, its run directory, whether to resume it);
    other keys are refused."""
    unknown = sorted(k for k in run_config if k not in FIELDS and k not in (RUN_DIR_KEY, RESUME_KEY))
    if unknown:
        raise ConfigError(f"unknown run config key(s) {', '.join(unknown)}; valid keys: {RUN_DIR_KEY}, "
                          f"{RESUME_KEY}, fedtune's keys")
    out = str(run_config.get(RUN_DIR_KEY, "")).strip()
    if not out:
        raise ConfigError(f"the run config has no {RUN_DIR_KEY!r}: where the SuperLink's machine writes the run")
    resume = run_config.get(RESUME_KEY, False)
    if not isinstance(resume, bool):
        raise ConfigError(f"bad value {RESUME_KEY}={resume!r}: expected true or false")
    return build_config({k: v for k, v in run_config.items() if k in FIELDS}), Path(out), resume


def exit_with_parent(poll_s: float = 2.0) -> None:
    """End this process once its parent (Flower's SuperExec, which ends with the SuperLink)
    is gone: a SuperLink killed outright must not leave its ServerApp running."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="fedtune-parent-watch", daemon=True).start()


@app.main()
def main(grid: Grid, context: Context) -> None:
    exit_with_parent()
    cfg, out, resume = config_from_run(context.run_config)
    run = RunDir(out) if resume else RunDir(out).create(cfg)
    run_federation(grid, cfg, run, resume=resume)
