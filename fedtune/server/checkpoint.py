"""Checkpoints: after every round, the global arrays and the strategy's state, atomically.

Layout (next to ``metrics.jsonl``)::

    RUN/checkpoint/round-0003/global.safetensors    the global arrays Flower hands on (ArrayRecord keys)
    RUN/checkpoint/round-0003/strategy.safetensors  tensor state of the strategy chain (server moments, ...)
    RUN/checkpoint/round-0003/state.json            round number and the rest of the state (accountants, ...)
    RUN/checkpoint/round-0003/clients/              copies of the clients' personal files (fedsa), when the
                                                    server can see the client-state-dir (simulation)

A round's folder is written beside its place (``.round-0003.partial-*``) and renamed into
it: a folder named ``round-N`` is always complete. Older rounds are removed once the new one is in place.

The strategy state is read along the wrapper chain (fedtune.server.strategy_state).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedtune import wire
from fedtune.artifacts import staged_folder
from fedtune.server.strategy_state import restore_strategy, strategy_state

__all__ = ["Checkpoint", "latest", "restore_clients", "restore_strategy", "save"]

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    round: int
    arrays: ArrayRecord
    tensors: dict[str, Tensor]
    meta: dict[str, Any]


def _round_dir(root: Path, server_round: int) -> Path:
    return root / f"round-{server_round:04d}"


def save(run_path: str | Path, server_round: int, arrays: ArrayRecord, strategy: object,
         client_dir: str | Path = "") -> Path:
    """Write round ``server_round``'s checkpoint (a folder built beside its place, synced and
    renamed into it: fedtune.artifacts.staged_folder), drop older ones."""
    root = Path(run_path) / CHECKPOINT_DIR
    final = _round_dir(root, server_round)
    tensors, meta = strategy_state(strategy)
    with staged_folder(final) as tmp:
        save_file({k: v.contiguous() for k, v in wire.from_record(arrays).items()}, str(tmp / "global.safetensors"),
                  metadata={"order": json.dumps(list(arrays.keys()))})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "strategy.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"round": server_round, "strategy": meta}, sort_keys=True))
        if client_dir and Path(client_dir).is_dir():
            (tmp / "clients").mkdir()
            for f in Path(client_dir).glob("client-*.safetensors"):
                shutil.copyfile(f, tmp / "clients" / f.name)
    for old in root.glob("round-*"):  # rounds only grow within a run: any other is stale
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_path: str | Path) -> Checkpoint | None:
    """The last complete checkpoint of a run, or None."""
    rounds = sorted((Path(run_path) / CHECKPOINT_DIR).glob("round-*"))
    if not rounds:
        return None
    folder = rounds[-1]
    state = json.loads((folder / "state.json").read_text())
    from safetensors import safe_open

    with safe_open(str(folder / "global.safetensors"), framework="pt") as fh:
        order = json.loads((fh.metadata() or {}).get("order", "[]"))
    glob = load_file(str(folder / "global.safetensors"))
    order = order or sorted(glob)
    arrays = wire.to_record({k: glob[k] for k in order})
    tensors = load_file(str(folder / "strategy.safetensors"))
    return Checkpoint(folder, int(state["round"]), arrays, tensors, state["strategy"])


def restore_clients(ckpt: Checkpoint, client_dir: str | Path) -> int:
    """Put the checkpoint's copies of the clients' personal files back (each atomically)."""
    saved = ckpt.folder / "clients"
    if not client_dir or not saved.is_dir():
        return 0
    Path(client_dir).mkdir(parents=True, exist_ok=True)
    n = 0
    for f in saved.glob("client-*.safetensors"):
        tmp = Path(client_dir) / f".{f.name}.{os.getpid()}.tmp"
        shutil.copyfile(f, tmp)
        os.replace(tmp, Path(client_dir) / f.name)
        n += 1
    return n
