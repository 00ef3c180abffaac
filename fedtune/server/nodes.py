"""Which client (partition) each connected node holds, so that sampling is reproducible.

Node ids are random per run; Flower samples from ``grid.get_node_ids()`` with ``random``.
Ordering the ids by client id and seeding ``random`` per round (see Metered) makes the same
seed pick the same clients in every run. Each node also states its device profile (its
adapter rank and layers): rank-aware strategies build every node's message from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune import wire
from fedtune.config import RunConfig
from fedtune.profiles import DEFAULT, Profile, lookup

WHOAMI = "query.whoami"
PULL_INTERVAL = 0.1  # first wait between reply polls (Flower's HTTP grid waits 3 s: most of a short deployed round)
PULL_MAX = 1.0  # the wait doubles while no reply comes, up to this: each poll costs the SuperLink CPU


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(ids := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ids)} of {min_nodes} nodes connected within {timeout:.0f} s")
        time.sleep(1.0)
    return ids


@dataclass(frozen=True)
class Member:
    """What the server knows of one node: the partition it holds and its device profile."""

    client: int
    profile: Profile


def discover(grid: Grid, min_nodes: int, timeout: float, cfg: RunConfig) -> dict[int, Member]:
    """{node id: Member} for every node that answers (the run config goes along: with
    ``profiles=auto`` a node picks its profile from its own hardware)."""
    nodes = wait_for_nodes(grid, min_nodes, timeout)
    config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json()})
    msgs = [Message(RecordDict({wire.CONFIG: config}), message_type=WHOAMI, dst_node_id=n) for n in nodes]
    found = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if not reply.has_error():
            name = reply.content[wire.ADAPTER][wire.PROFILE] if wire.ADAPTER in reply.content else DEFAULT
            client = int(reply.content[wire.METRICS][wire.CLIENT_ID])
            found[reply.metadata.src_node_id] = Member(client, lookup(cfg, str(name)))
    return found


class OrderedGrid:
    """A Grid whose ``get_node_ids`` lists nodes by client id (unknown nodes last), and whose
    ``members`` says which client and profile each node holds."""

    def __init__(self, grid: Grid, members: Mapping[int, Member]) -> None:
        self._grid = grid
        self.members: Mapping[int, Member] = MappingProxyType(dict(members))

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        known = self.members
        return sorted(ids, key=lambda n: (n not in known, known[n].client if n in known else 0, n))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's push-then-pull loop (``Grid.send_and_receive``) on the grid's own
        ``push_messages`` / ``pull_messages``: polls after ``PULL_INTERVAL`` seconds, doubling
        the wait up to ``PULL_MAX`` while no reply comes and starting over at each reply. A
        reply waits at most ``PULL_MAX`` to be seen; a 100 s round costs ~100 polls, not 1,000,
        and on a machine that also trains (a test federation) the SuperLink's CPU goes to training."""
        pending = set(self._grid.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        wait = PULL_INTERVAL
        while pending and (timeout is None or time.monotonic() < end):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            wait = PULL_INTERVAL if got else min(2 * wait, PULL_MAX)
            if pending:
                time.sleep(wait)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
