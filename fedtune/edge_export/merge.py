"""A run's model as the run evaluated it, and the merged plain model that gets exported.

- the **global** model (``load_run``): the server's model config (``server_model``: with
  profiles, the largest rank on every layer), the global adapter (``adapter/``, peft format)
  and, for FLoRA / FedEx-LoRA / FlexLoRA, the dense base-weight deltas beside it
  (``adapter/base_delta.safetensors``: W = W0 + delta): what the server evaluated last;
- one **client's** model (``load_client``), for strategies with a personal part (FedSA's B),
  and one **profile's** model (``load_profile``): the view the server wrote at the end of the
  run (``RUN/views``, fedtune.artifacts / fedtune.server.views), loaded into that profile's
  model (its rank and layers). Files only: no strategy code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fedtune.config import RunConfig
from fedtune.edge_export.errors import ExportError
from fedtune.edge_export.runtime import read_labels
from fedtune.modeling import LogitsOnly

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoadedRun:
    cfg: RunConfig
    labels: list[str]
    model: nn.Module  # the PeftModel, adapter not merged, base deltas applied: exactly what the run evaluated
    source: dict[str, Any] = field(default_factory=dict)  # what was loaded (for the export report)


def _run_files(run_dir: Path) -> tuple[Path, Path]:
    """(adapter weights, labels.json) of a finished run."""
    from fedtune.artifacts import ADAPTER_DIR, CONFIG

    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    adapter = run_dir / ADAPTER_DIR
    for need in (run_dir / CONFIG, adapter / ADAPTER_WEIGHTS, adapter / "labels.json"):
        if not need.is_file():
            raise ExportError(f"{run_dir} is not a finished run: {need.relative_to(run_dir)} is missing")
    return adapter / ADAPTER_WEIGHTS, adapter / "labels.json"


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _base_deltas(run_dir: Path) -> dict[str, Tensor]:
    """{layer: dense delta} saved beside the adapter (FLoRA, FedEx-LoRA, FlexLoRA), or {}."""
    from safetensors.torch import load_file

    from fedtune.artifacts import ADAPTER_DIR, BASE_DELTA_FILE

    path = run_dir / ADAPTER_DIR / BASE_DELTA_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # truncated, not safetensors
        raise ExportError(f"cannot read the base deltas {path}: {_first_line(exc)}") from None


def for_export(mcfg):
    """The ModelConfig an export merges into: the full-precision base on the CPU, whatever the
    run trained on (a bf16, 4-bit or 8-bit base on a GPU: the adapter is merged into fp32 weights)."""
    return dataclasses.replace(mcfg, device="cpu", base_quant="none", base_dtype="float32",
                               gradient_checkpointing=False, cpu_autocast="off")


def _load_global(run_dir: Path) -> tuple[LoadedRun, dict[str, Tensor]]:
    from safetensors.torch import load_file

    from fedtune.adapter_kinds import kind_of
    from fedtune.adapters import set_base
    from fedtune.modeling import build_model
    from fedtune.profiles import server_model
    from fedtune.artifacts import RunDir

    weights, labels_file = _run_files(run_dir)
    cfg = RunDir(run_dir).config()
    labels = read_labels(labels_file)
    mcfg = for_export(server_model(cfg))  # what the server built: with profiles, the largest rank on every layer
    with _no_progress_bar():
        model = build_model(mcfg, len(labels), seed=cfg.federation.seed)
    try:
        state = load_file(str(weights))
        unexpected = kind_of(mcfg.adapter).load_saved(model, state)  # sparse: the head (its delta: base deltas)
    except Exception as exc:  # a truncated file, a shape mismatch: this run's adapter is unusable
        raise ExportError(f"the adapter in {run_dir} does not fit its base model: {_first_line(exc)}") from None
    trainable = sum(p.requires_grad for p in model.parameters())
    if unexpected or len(state) != trainable:
        raise ExportError(f"the adapter in {run_dir} has {len(state)} tensors, its base model expects {trainable}")
    deltas = _base_deltas(run_dir)
    try:
        set_base(model, deltas)  # W = W0 + delta: the frozen weights as the server last evaluated them
    except (ValueError, AttributeError) as exc:  # a wrong shape, a layer the model does not have
        raise ExportError(f"the base deltas in {run_dir} do not fit its model: {_first_line(exc)}") from None
    source = {"model": "global", "strategy": cfg.federation.strategy, "lora_rank": mcfg.lora_rank,
              "base_deltas": len(deltas)}
    return LoadedRun(cfg, labels, model.eval(), source), deltas


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run's global model: base model (+ base deltas) + global adapter, in eval mode."""
    return _load_global(Path(run_dir))[0]


def _views(run_dir: Path, what: str) -> dict[str, Any]:
    """The run's ``views/index.json`` (fedtune.artifacts), or a one-line ExportError."""
    from fedtune.artifacts import VIEW_INDEX, VIEWS_DIR, view_index

    try:
        index = view_index(run_dir)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {run_dir / VIEWS_DIR / VIEW_INDEX}: {_first_line(exc)}") from None
    if index is None:
        raise ExportError(
            f"{what}: {run_dir / VIEWS_DIR / VIEW_INDEX} is missing (the server writes the model views at the end "
            f"of a run; runs made before views existed have none): resume the run to write them "
            f"(fedtune simulate --resume {run_dir}), or rerun it")
    return index


def _load_view(run_dir: Path, cfg: RunConfig, labels: list[str], path: Path, profile_name: str) -> nn.Module:
    """The model of ``profile_name`` (its rank, its layers) with the view file's tensors loaded."""
    from safetensors.torch import load_file

    from fedtune.adapters import set_base
    from fedtune.artifacts import split_view
    from fedtune.errors import FedtuneError
    from fedtune.modeling import build_model, load_trainable_state
    from fedtune.profiles import apply, lookup

    if not path.is_file():
        raise ExportError(f"{path} is missing: resume the run to write its views (fedtune simulate --resume {run_dir})")
    try:
        state, base = split_view(load_file(str(path)))
    except Exception as exc:  # truncated, not safetensors
        raise ExportError(f"cannot read the view {path}: {_first_line(exc)}") from None
    try:
        profile = lookup(cfg, profile_name)
    except FedtuneError:
        raise ExportError(f"{path}: profile {profile_name!r} is not one of the run's profiles") from None
    with _no_progress_bar():
        model = build_model(for_export(apply(cfg, profile).model), len(labels), seed=cfg.federation.seed)
    try:
        set_base(model, base)
        load_trainable_state(model, state)
    except (ValueError, AttributeError) as exc:
        raise ExportError(f"{path} does not fit profile {profile.name!r}: {_first_line(exc)}") from None
    return model.eval()


def load_client(run_dir: str | Path, client: int) -> LoadedRun:
    """Client ``client``'s personalised model at the end of the run, in eval mode: the view the
    server wrote (``RUN/views/client-ID.safetensors``: its profile's adapter with what the server
    sends it, global A and head for FedSA, and the tensors it keeps for itself)."""
    from fedtune.artifacts import VIEWS_DIR, RunDir

    run_dir = Path(run_dir)
    _, labels_file = _run_files(run_dir)
    cfg = RunDir(run_dir).config()
    index = _views(run_dir, f"--client {client}")
    strategy = index.get("strategy", cfg.federation.strategy)
    if not index.get("personal"):
        raise ExportError(f"--client: strategy {strategy!r} keeps no personal tensors on the clients; every client "
                          "runs the global model: export without --client")
    if not 0 <= client < cfg.partition.num_clients:
        raise ExportError(f"--client {client}: the run has clients 0 to {cfg.partition.num_clients - 1}")
    entry = index.get("clients", {}).get(str(client))
    if entry is None:
        why = index.get("skipped", {}).get(str(client), "no view")
        raise ExportError(
            f"no view of client {client} in {run_dir / VIEWS_DIR} ({why}): the server writes it at the end of the run "
            "from the client's personal file in the run's client-state-dir; put it there and resume the run")
    labels = read_labels(labels_file)
    path = run_dir / VIEWS_DIR / entry["file"]
    model = _load_view(run_dir, cfg, labels, path, entry["profile"])
    source = {"model": "client", "client": client, "strategy": strategy, "profile": entry["profile"],
              "lora_rank": entry["lora_rank"], "layers": entry["layers"], "round": entry.get("round"),
              "state_file": entry.get("state_file")}
    return LoadedRun(cfg, labels, model, source)


def load_profile(run_dir: str | Path, profile: str) -> LoadedRun:
    """The model a client of ``profile`` runs at the end of the run, in eval mode (the view the
    server wrote: ``RUN/views/profile-NAME.safetensors``)."""
    from fedtune.artifacts import VIEWS_DIR, RunDir

    run_dir = Path(run_dir)
    _, labels_file = _run_files(run_dir)
    cfg = RunDir(run_dir).config()
    index = _views(run_dir, f"--profile {profile}")
    entry = index.get("profiles", {}).get(profile)
    if entry is None:
        have = ", ".join(sorted(index.get("profiles", {}))) or "none (every client runs the global model)"
        raise ExportError(f"--profile {profile}: the run has no view of that profile; its profiles' views: {have}")
    labels = read_labels(labels_file)
    model = _load_view(run_dir, cfg, labels, run_dir / VIEWS_DIR / entry["file"], profile)
    source = {"model": "profile", "profile": profile, "strategy": index.get("strategy"),
              "lora_rank": entry["lora_rank"], "layers": entry["layers"], "round": index.get("round")}
    return LoadedRun(cfg, labels, model, source)


def merge(model: nn.Module, adapter: str = "lora") -> LogitsOnly:
    """Fold the adapter (of kind ``adapter``) into the base weights (in place) and drop the wrapper."""
    from fedtune.adapter_kinds import kind_of

    return LogitsOnly(kind_of(adapter).merge_for_export(model)).eval()
