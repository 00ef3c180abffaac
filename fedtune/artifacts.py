"""The run directory: the contract between training and export.

Layout (every file below is written atomically: a reader sees the old version or the new one)::

    RUN/config.json                      the resolved config
    RUN/metrics.jsonl                    one line per round, flushed as it is written
    RUN/adapter/                         the global adapter (peft format), labels.json and, for
                                         FLoRA / FedEx-LoRA / FlexLoRA, base_delta.safetensors
    RUN/views/index.json                 which model views exist (``VIEW_INDEX``)
    RUN/views/profile-NAME.safetensors   the model a client of profile NAME runs at the end
    RUN/views/client-ID.safetensors      a personal client's own model (FedSA: global A + its B)
    RUN/summary.json                     the run's summary
    RUN/clients/client-ID.safetensors    fedsa clients' personal tensors (simulate's client-state-dir)
    RUN/checkpoint/round-N/              the last round's checkpoint (fedtune.server.checkpoint)

A folder (``adapter/``, ``views/``) is built beside its place and renamed into it
(``staged_folder``): a folder of that name is always complete. The server writes the views
at the end of a run; ``fedtune export`` reads these files only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fedtune.config import RunConfig

ADAPTER_DIR = "adapter"
BASE_DELTA_FILE = "base_delta.safetensors"  # in ADAPTER_DIR: {layer: dense delta of the frozen weight}, W = W0 + delta
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
CLIENTS_DIR = "clients"  # simulate()'s default client-state-dir: clients' personal tensors (fedsa's B)
VIEWS_DIR = "views"  # the final model of each profile and of each personal client (written by the server)
VIEW_INDEX = "index.json"  # in VIEWS_DIR: {"strategy", "round", "personal", "profiles": {...}, "clients": {...}}
VIEW_BASE = "base-delta/"  # key prefix in a view file: {layer: dense delta of the frozen weight}, W = W0 + delta


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


def _fsync_tree(folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def publish_folder(tmp: str | Path, dest: str | Path, check: Callable[[Path], None] | None = None) -> None:
    """Put the complete folder ``tmp`` (a sibling of ``dest``) in place of ``dest``: its files
    are synced, ``check(dest)`` may still refuse (raise), the old ``dest`` (if any) is renamed
    away, ``tmp`` renamed to ``dest``, then the old one removed. ``dest`` is never a
    half-written folder."""
    tmp, dest = Path(tmp), Path(dest)
    _fsync_tree(tmp)
    if check is not None:
        check(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(dest: str | Path, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A hidden empty folder beside ``dest`` to build it in; published in one rename
    (``publish_folder``, after ``check``) when the block ends, deleted if anything raises."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; these are ordinary folders
    try:
        yield tmp
        publish_folder(tmp, dest, check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def profile_view_file(run: str | Path, profile: str) -> Path:
    """The model a client of ``profile`` runs at the end of the run (``RUN/views``)."""
    return Path(run) / VIEWS_DIR / f"profile-{profile}.safetensors"


def client_view_file(run: str | Path, client: int) -> Path:
    """Personal client ``client``'s own model at the end of the run (``RUN/views``)."""
    return Path(run) / VIEWS_DIR / f"client-{client}.safetensors"


def view_record(trainable: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One view file's tensors: the model's trainable tensors (peft names) and its base deltas."""
    return {**{k: v.detach().cpu().float().contiguous() for k, v in trainable.items()},
            **{VIEW_BASE + k: v.detach().cpu().float().contiguous() for k, v in base.items()}}


def split_view(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A view file's tensors -> (trainable tensors, {layer: base delta})."""
    base = {k[len(VIEW_BASE):]: v for k, v in tensors.items() if k.startswith(VIEW_BASE)}
    return {k: v for k, v in tensors.items() if not k.startswith(VIEW_BASE)}, base


def write_views(run: str | Path, views: Mapping[str, tuple[dict[str, Tensor], dict[str, str]]],
                index: dict[str, Any]) -> Path:
    """``RUN/views``: {file name: (tensors, metadata)} and ``index.json``, as one folder
    built beside its place and renamed into it."""
    from safetensors.torch import save_file

    dest = Path(run) / VIEWS_DIR
    with staged_folder(dest) as tmp:
        for name, (tensors, meta) in views.items():
            save_file(dict(tensors), str(tmp / name), metadata=meta)
        (tmp / VIEW_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return dest


def view_index(run: str | Path) -> dict[str, Any] | None:
    """The run's ``views/index.json``, or None (a run made before views existed)."""
    path = Path(run) / VIEWS_DIR / VIEW_INDEX
    return json.loads(path.read_text()) if path.is_file() else None


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

    def save_adapter(self, model: nn.Module, label_names: tuple[str, ...],
                     base_deltas: Mapping[str, Tensor] | None = None) -> Path:
        """peft's own format: ``PeftModel.from_pretrained(base, run/adapter)`` loads it; the
        labels and the base deltas (FLoRA / FedEx-LoRA / FlexLoRA) beside it. The folder is
        built beside its place and renamed into it: never half-written."""
        out = self.path / ADAPTER_DIR
        with staged_folder(out) as tmp:
            model.save_pretrained(str(tmp))
            (tmp / "labels.json").write_text(json.dumps(list(label_names)))
            if base_deltas:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in base_deltas.items()}, str(tmp / BASE_DELTA_FILE))
        return out

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / SUMMARY, json.dumps(summary, indent=2, sort_keys=True))

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / SUMMARY).read_text())
