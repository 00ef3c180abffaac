"""A run's model as the run evaluated it, and the merged plain model that gets exported.

- the **global** model (``load_run``): the server's model config (``server_model``: with
  profiles, the largest rank on every layer), the global adapter (``adapter/``, peft format)
  and, for FLoRA / FedEx-LoRA / FlexLoRA, the dense base-weight deltas beside it
  (``adapter/base_delta.safetensors``: W = W0 + delta): what the server evaluated last;
- one **client's** model (``load_client``), for strategies with a personal part (FedSA's B):
  the client's own config (its profile's rank and layers), what the server sends it at the
  end of the run (global A, head) and its own tensors, written by the client after each
  round it trained (``client-<id>.safetensors`` in the run's ``client-state-dir``).
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


def _client_file(run_dir: Path, cfg: RunConfig, client: int) -> Path:
    """The client's personal tensors: in the run's client-state-dir, else ``RUN/clients``
    (a run directory that was moved or copied)."""
    from fedtune.artifacts import CLIENTS_DIR, client_state_file

    folders = [f for f in (cfg.federation.client_state_dir, str(run_dir / CLIENTS_DIR)) if f]
    for folder in folders:
        if client_state_file(folder, client).is_file():
            return client_state_file(folder, client)
    where = " or ".join(str(client_state_file(f, client)) for f in dict.fromkeys(folders))
    raise ExportError(
        f"no personal state of client {client}: no {where} "
        "(a client writes it after each round it trains, when the run has a client-state-dir)"
    )


def _read_client_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as exc:
        raise ExportError(f"cannot read the client state {path}: {_first_line(exc)}") from None


def load_client(run_dir: str | Path, client: int) -> LoadedRun:
    """Client ``client``'s personalised model at the end of the run, in eval mode: its own
    profile's adapter, with what the server would send it (global A and head for FedSA, the
    shared base deltas where a strategy has them) and the tensors it keeps for itself."""
    from fedtune.adapters import set_base
    from fedtune.errors import FedtuneError
    from fedtune.modeling import build_model, load_trainable_state, trainable_state
    from fedtune.profiles import apply, lookup
    from fedtune.strategies import STRATEGIES
    from fedtune.strategies.rank_aware import GlobalState, rank_aware_of
    from fedtune.strategies.recipes import recipe_for

    run_dir = Path(run_dir)
    run, deltas = _load_global(run_dir)
    cfg, strategy = run.cfg, run.cfg.federation.strategy
    recipe = recipe_for(strategy)
    rank_aware = rank_aware_of(STRATEGIES.get(strategy)(cfg))
    if not recipe.local or rank_aware is None:
        raise ExportError(f"--client: strategy {strategy!r} keeps no personal tensors on the clients; every client "
                          "runs the global model: export without --client")
    if not 0 <= client < cfg.partition.num_clients:
        raise ExportError(f"--client {client}: the run has clients 0 to {cfg.partition.num_clients - 1}")
    path = _client_file(run_dir, cfg, client)
    personal, meta = _read_client_file(path)
    try:
        profile = lookup(cfg, meta.get("profile", ""))
    except FedtuneError:
        raise ExportError(f"{path}: profile {meta.get('profile')!r} is not one of the run's profiles") from None
    if meta.get("strategy") != strategy or meta.get("client") != str(client):
        raise ExportError(f"{path} is client {meta.get('client')}'s state of a {meta.get('strategy')!r} run, "
                          f"not client {client}'s of this {strategy!r} run")
    ccfg = apply(cfg, profile)
    with _no_progress_bar():
        model = build_model(for_export(ccfg.model), len(run.labels), seed=cfg.federation.seed)
    initial = trainable_state(model)
    recipe.prepare(model, initial, cfg.federation.seed)  # as the client does (fedtune.client.adapter.prepare)
    g = GlobalState(trainable_state(run.model), deltas)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    kept = [n for n in names if recipe.keeps(n)]
    if set(personal) != set(kept):
        raise ExportError(f"{path} holds {len(personal)} tensors; profile {profile.name!r} keeps {len(kept)} "
                          f"({sorted(set(personal) ^ set(kept))[0]})")
    state = {**{n: initial[n] for n in names}, **personal, **rank_aware.view(g, profile)}
    try:
        set_base(model, rank_aware.shared_base(g))
        load_trainable_state(model, state)
    except ValueError as exc:
        raise ExportError(f"{path} does not fit profile {profile.name!r}: {_first_line(exc)}") from None
    trained = meta.get("round", "")
    source = {"model": "client", "client": client, "strategy": strategy, "profile": profile.name,
              "lora_rank": profile.lora_rank, "layers": profile.layers,
              "round": int(trained) if trained.isdigit() else None, "state_file": str(path)}
    return LoadedRun(cfg, run.labels, model.eval(), source)


def merge(model: nn.Module, adapter: str = "lora") -> LogitsOnly:
    """Fold the adapter (of kind ``adapter``) into the base weights (in place) and drop the wrapper."""
    from fedtune.adapter_kinds import kind_of

    return LogitsOnly(kind_of(adapter).merge_for_export(model)).eval()
