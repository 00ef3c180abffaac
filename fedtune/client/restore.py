"""A restarted client's personal tensors (FedSA's B) from its ``client-state-dir`` file.

``fedtune.client.adapter.save_personal`` writes ``client-<id>.safetensors`` after each
training round, with the round in its metadata. A client process that starts without them
in ``context.state`` (a resumed run, a restarted SuperNode) takes them from that file, but only
from an earlier round of the same strategy and rank: a file of this round or later belongs to
an interrupted round or to another run, and is ignored (the client starts from the initial B).
"""

from __future__ import annotations

from flwr.app import Message
from safetensors import safe_open
from torch import Tensor

from fedtune import wire
from fedtune.config import RunConfig
from fedtune.artifacts import client_state_file


def saved_personal(cfg: RunConfig, client: int, msg: Message) -> dict[str, Tensor]:
    """{name: tensor} of this client's last saved personal tensors, or {}."""
    folder = cfg.federation.client_state_dir
    path = client_state_file(folder, client) if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        current = int(msg.content[wire.CONFIG]["server-round"])
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if (meta.get("strategy") != cfg.federation.strategy or meta.get("lora-rank") != str(cfg.model.lora_rank)
                    or int(meta.get("round", "0")) >= current):
                return {}
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: start from the initial B, as a new client
        return {}
