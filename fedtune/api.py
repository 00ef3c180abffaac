"""fedtune from Python: the functions ``fedtune`` exports (docs/api.md).

Each takes what the CLI takes: a preset, a TOML config file, and overrides, here as keyword
arguments named like the flat keys with ``_`` for ``-`` (``lora_rank=4`` is
``--set lora-rank=4``). A config is validated exactly as the CLI validates it: a bad key or
value is a one-line :class:`fedtune.ConfigError`. They run the same code as the CLI:
``fedtune.simulate(preset="quick", rounds=2)`` writes the run directory
``fedtune simulate --preset quick --set rounds=2`` writes, with the same metrics.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedtune.artifacts import ADAPTER_DIR, CONFIG, METRICS, SUMMARY
from fedtune.config import RunConfig, build_config, read_toml
from fedtune.errors import ConfigError
from fedtune.presets import PRESETS


@dataclass(frozen=True)
class Run:
    """A run directory as Python values: ``config`` (the resolved RunConfig), ``metrics`` (one
    dict per round, round 0 = before training), ``summary`` (summary.json; empty while a run
    is unfinished) and the paths of its files."""

    path: Path
    config: RunConfig
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def adapter(self) -> Path:
        """The global adapter in peft's format (``PeftModel.from_pretrained(base, run.adapter)``)."""
        return self.path / ADAPTER_DIR

    @property
    def paths(self) -> dict[str, Path]:
        return {"config": self.path / CONFIG, "metrics": self.path / METRICS, "summary": self.path / SUMMARY,
                "adapter": self.adapter}

    @property
    def metrics_frame(self):
        """The metrics as a pandas DataFrame, one row per round (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Run.metrics_frame needs pandas: pip install pandas (Run.metrics is the same as "
                              "a list of dicts)") from None
        frame = pd.DataFrame(self.metrics)
        return frame[["round", *[c for c in frame.columns if c != "round"]]] if "round" in frame else frame

    def __repr__(self) -> str:
        last = self.metrics[-1] if self.metrics else {}
        acc = f", accuracy {last['accuracy']:.4f}" if "accuracy" in last else ""
        return f"Run({str(self.path)!r}, {len(self.metrics)} metric rows{acc})"


def load_run(path: str | Path) -> Run:
    """A run directory written by ``simulate``, ``centralized`` or ``fedtune serve``."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise ConfigError(f"not a run directory: {path} (no {CONFIG})")
    flat = json.loads((path / CONFIG).read_text())
    from fedtune.config import FIELDS

    cfg = build_config({k: v for k, v in flat.items() if k in FIELDS})  # plugins first: their names are checked
    rows = [json.loads(line) for line in (path / METRICS).read_text().splitlines() if line.strip()] \
        if (path / METRICS).is_file() else []
    summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else {}
    return Run(path, cfg, rows, summary)


def resolve(preset: str = "default", config: str | Path | Mapping[str, Any] | RunConfig | None = None,
            **overrides: Any) -> RunConfig:
    """The RunConfig of ``preset``, then ``config`` (a TOML file, a dict of flat keys, or a
    RunConfig to start from instead of the preset), then ``overrides``, validated once."""
    if isinstance(config, RunConfig):
        return build_config(overrides, base=config) if overrides else config
    flat = dict(PRESETS.get(preset))
    if isinstance(config, Mapping):
        flat.update(config)
    elif config is not None:
        flat.update(read_toml(config))
    flat.update(overrides)
    return build_config(flat)


def _out(out: str | Path | None, kind: str) -> Path:
    return Path(out) if out else Path("runs") / f"{kind}-{datetime.now():%Y%m%d-%H%M%S}"


def simulate(preset: str = "default", config: str | Path | Mapping[str, Any] | RunConfig | None = None, *,
             out: str | Path | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
             verbose: bool = False, **overrides: Any) -> Run:
    """Run a federation on Flower's simulation runtime (``fedtune simulate``) and return the Run.

    ``out``: the run directory (default runs/sim-TIMESTAMP); ``progress``: called with each
    round's metrics row (default: the CLI's one line per round on stderr); ``verbose``:
    Flower's own log. ``plugins=["my_module"]`` imports your strategies, datasets, models."""
    from fedtune.server.app import print_progress
    from fedtune.simulations.simulate import simulate as run_simulation

    cfg = resolve(preset, config, **overrides)
    path = _out(out, "sim")
    run_simulation(cfg, path, progress=progress or print_progress, verbose=verbose)
    return load_run(path)


def centralized(preset: str = "default", config: str | Path | Mapping[str, Any] | RunConfig | None = None, *,
                out: str | Path | None = None, **overrides: Any) -> Run:
    """The ceiling (``fedtune centralized``): the same adapter trained on the pooled data with
    the federation's budget; returns the Run."""
    from fedtune.simulations.centralized import centralized as run_centralized

    cfg = resolve(preset, config, **overrides)
    path = _out(out, "central")
    run_centralized(cfg, path)
    return load_run(path)


def export(run: Run | str | Path, out: str | Path, *, int8: bool = False, client: int | None = None,
           profile: str | None = None, examples: int = 256, threads: int = 1, latency_runs: int = 50) -> dict[str, Any]:
    """Merge a run's adapter and export it to ONNX, verified (``fedtune export``); returns the
    export report (also in ``out/export_report.json``). ``int8``: also a quantized model;
    ``client``: that client's personalised model (fedsa); ``profile``: that profile's model.
    Serve it with ``EdgeClassifier(out)`` (an LLM run: ``EdgeGenerator(out)``)."""
    from fedtune.edge_export.commands import export_run

    path = run.path if isinstance(run, Run) else Path(run)
    load_run(path)  # a run directory whose config (and plugins) load
    print(f"fedtune: exporting {path} -> {out}", file=sys.stderr)
    return export_run(path, out, int8=int8, client=client, profile=profile, examples=examples,
                      latency_runs=latency_runs, threads=threads)
