"""The run directory: resolved config, metrics.jsonl (one line per round, flushed as it is
written so a crash loses nothing already measured), the global adapter, and a summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from fedtune.config import RunConfig

ADAPTER_DIR = "adapter"
BASE_DELTA_FILE = "base_delta.safetensors"  # in ADAPTER_DIR: {layer: dense delta of the frozen weight}, W = W0 + delta
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
CLIENTS_DIR = "clients"  # simulate()'s default client-state-dir: clients' personal tensors (fedsa's B)


def client_state_file(folder: str | Path, client: int) -> Path:
    """A client's personal tensors (safetensors, peft parameter names), for ``export --client``."""
    return Path(folder) / f"client-{client}.safetensors"


def atomic_write(path: str | Path, data: str | bytes, mode: int | None = None) -> None:
    """The one atomic write of fedtune: a temporary file in the same folder (created if need
    be), fsync, rename over the old file, fsync of the folder. A reader sees the old file or
    the new one, never a torn one; a crash loses nothing already written. ``mode``: the new
    file's permissions (e.g. 0o600 for private keys), set before it becomes visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_atomic_write = atomic_write  # the old private name


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self, cfg: RunConfig, extra: dict[str, Any] | None = None) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / METRICS).unlink(missing_ok=True)
        for stale in (self.path / CLIENTS_DIR).glob("client-*.safetensors"):  # a previous run's clients
            stale.unlink()
        _atomic_write(self.path / CONFIG, json.dumps({**cfg.to_flat(), **(extra or {})}, indent=2, sort_keys=True))
        return self

    def config(self) -> RunConfig:
        flat = json.loads((self.path / CONFIG).read_text())
        known = set(RunConfig().to_flat())
        return RunConfig.from_json(json.dumps({k: v for k, v in flat.items() if k in known}))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with (self.path / METRICS).open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        f = self.path / METRICS
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []

    def save_adapter(self, model: nn.Module, label_names: tuple[str, ...]) -> Path:
        """peft's own format: ``PeftModel.from_pretrained(base, run/adapter)`` loads it."""
        out = self.path / ADAPTER_DIR
        model.save_pretrained(str(out))
        _atomic_write(out / "labels.json", json.dumps(list(label_names)))
        return out

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / SUMMARY, json.dumps(summary, indent=2, sort_keys=True))

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / SUMMARY).read_text())
