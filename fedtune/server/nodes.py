"""Which client (partition) each connected node holds, so that sampling is reproducible.

Node ids are random per run; Flower samples from ``grid.get_node_ids()`` with ``random``.
Ordering the ids by client id and seeding ``random`` per round (see Metered) makes the same
seed pick the same clients in every run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune import wire

WHOAMI = "query.whoami"


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(ids := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ids)} of {min_nodes} nodes connected within {timeout:.0f} s")
        time.sleep(1.0)
    return ids


def discover(grid: Grid, min_nodes: int, timeout: float) -> dict[int, int]:
    """{node id: client id} for every node that answers."""
    nodes = wait_for_nodes(grid, min_nodes, timeout)
    msgs = [Message(RecordDict({wire.CONFIG: ConfigRecord()}), message_type=WHOAMI, dst_node_id=n) for n in nodes]
    found = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if not reply.has_error():
            found[reply.metadata.src_node_id] = int(reply.content[wire.METRICS][wire.CLIENT_ID])
    return found


class OrderedGrid:
    """A Grid whose ``get_node_ids`` lists nodes by client id (unknown nodes last)."""

    def __init__(self, grid: Grid, clients: dict[int, int]) -> None:
        self._grid = grid
        self._clients = clients

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        return sorted(ids, key=lambda n: (n not in self._clients, self._clients.get(n, 0), n))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
