"""The run's model views: the final model of each profile and of each personal client.

At the end of a run the server writes ``RUN/views`` (layout: fedtune.artifacts), the files
``fedtune export --profile/--client`` reads, so that export needs no strategy code:

- ``profile-NAME.safetensors`` for every profile the run's clients hold, with a rank-aware
  strategy: every trainable tensor of that profile's model (its rank, its layers) as a client
  of it runs at the end of the run (``RankAware.model_view``: what it receives, FedSA's group
  B included) and the base deltas it applies (``shared_base``);
- ``client-ID.safetensors`` for every client of a strategy with a personal part (FedSA's B)
  whose personal file the server can read (``client-state-dir``: in simulation
  ``RUN/clients``): what the server sends it (global A, head) and its own tensors;
- ``index.json``: the strategy, the round, whether clients keep personal tensors, and each
  view with its profile, rank and layers (and, for a client, the round of its own tensors and
  the file they came from). Every run writes it, with no views for a strategy that has none.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from safetensors import safe_open
from torch import Tensor

from fedtune.artifacts import client_state_file, client_view_file, profile_view_file, view_record, write_views
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.profiles import Profile, lookup
from fedtune.strategies.rank_aware import GlobalState, RankAware
from fedtune.strategies.recipes import recipe_for


def _personal(cfg: RunConfig, client: int) -> tuple[Path, dict[str, Tensor], dict[str, str]] | None:
    """(file, tensors, metadata) of ``client``'s personal file in the run's client-state-dir, or None."""
    folder = cfg.federation.client_state_dir
    path = client_state_file(folder, client) if folder else None
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return path, {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: no view of this client (the index says why)
        return None


def _client_view(cfg: RunConfig, rank_aware: RankAware, g: GlobalState, client: int
                 ) -> tuple[dict[str, Tensor], dict[str, Any]] | str:
    """(client's whole model, its index entry), or why it has no view."""
    found = _personal(cfg, client)
    if found is None:
        return "no readable personal file in the client-state-dir"
    path, personal, meta = found
    if meta.get("strategy") != cfg.federation.strategy or meta.get("client") != str(client):
        return f"{path.name} is client {meta.get('client')}'s state of a {meta.get('strategy')!r} run"
    try:
        profile = lookup(cfg, meta.get("profile", ""))
    except FedtuneError:
        return f"profile {meta.get('profile')!r} is not one of the run's profiles"
    state = rank_aware.model_view(g, profile, group=False)  # what the server sends it, at its rank and layers
    recipe = recipe_for(cfg.federation.strategy)
    kept = {n for n in state if recipe.keeps(n)}
    if set(personal) != kept or any(personal[n].shape != state[n].shape for n in kept):
        return f"its {len(personal)} personal tensors do not fit profile {profile.name!r} ({len(kept)})"
    trained = meta.get("round", "")
    entry = {"profile": profile.name, "lora_rank": profile.lora_rank, "layers": profile.layers,
             "round": int(trained) if trained.isdigit() else None, "state_file": str(path)}
    return {**state, **personal}, entry


def build_views(cfg: RunConfig, rank_aware: RankAware | None, arrays: ArrayRecord, profiles: Iterable[Profile],
                server_round: int) -> tuple[dict[str, tuple[dict[str, Tensor], dict[str, str]]], dict[str, Any]]:
    """({file name: (tensors, metadata)}, index) of the run's views when the global state is ``arrays``."""
    strategy = cfg.federation.strategy
    personal = rank_aware is not None and bool(recipe_for(strategy).local)
    index: dict[str, Any] = {"strategy": strategy, "round": server_round, "personal": personal,
                             "profiles": {}, "clients": {}, "skipped": {}}
    views: dict[str, tuple[dict[str, Tensor], dict[str, str]]] = {}
    if rank_aware is None:  # every client runs the global model (RUN/adapter)
        return views, index
    g = GlobalState.decode(arrays)
    base = rank_aware.shared_base(g)
    for p in sorted(set(profiles), key=lambda p: (p.lora_rank, p.name)):
        name = profile_view_file("", p.name).name
        meta = {"kind": "profile", "profile": p.name, "strategy": strategy, "round": str(server_round)}
        views[name] = (view_record(rank_aware.model_view(g, p), base), meta)
        index["profiles"][p.name] = {"file": name, "lora_rank": p.lora_rank, "layers": p.layers}
    for client in range(cfg.partition.num_clients) if personal else ():
        got = _client_view(cfg, rank_aware, g, client)
        if isinstance(got, str):
            index["skipped"][str(client)] = got
            continue
        state, entry = got
        name = client_view_file("", client).name
        meta = {"kind": "client", "client": str(client), "profile": entry["profile"], "strategy": strategy,
                "round": str(server_round)}
        views[name] = (view_record(state, base), meta)
        index["clients"][str(client)] = {"file": name, **entry}
    return views, index


def save_views(run_path: str | Path, cfg: RunConfig, rank_aware: RankAware | None, arrays: ArrayRecord,
               profiles: Iterable[Profile], server_round: int) -> Path:
    """Write ``RUN/views`` (one folder, renamed into place) for the global state ``arrays``."""
    views, index = build_views(cfg, rank_aware, arrays, profiles, server_round)
    return write_views(run_path, views, index)
