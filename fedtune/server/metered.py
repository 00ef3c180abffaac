"""A strategy wrapper that meters each round: bytes on the wire, who replied, client metrics.

Like Flower's DP wrappers it holds the real strategy and delegates the five calls, so any
strategy (ours or Flower's) is metered the same way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import wire
from fedtune.server.screen import Screen, Sent


@dataclass
class RoundStats:
    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    sampled: int = 0
    replied: int = 0
    failures: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"client", "node", "reason"} per screened-out reply
    train: dict[str, float] = field(default_factory=dict)
    client_eval: dict[str, float] = field(default_factory=dict)


def _message_bytes(m: Message) -> int:
    """Array payloads plus the ConfigRecord's strings: what this message costs on the wire."""
    n = sum(wire.record_bytes(r) for r in m.content.array_records.values())
    for rec in m.content.config_records.values():
        n += sum(len(str(k)) + len(str(v)) for k, v in rec.items())
    return n


class Metered(Strategy):
    """Delegates to ``inner``; records a ``RoundStats`` per round in ``self.rounds``."""

    def __init__(self, inner: Strategy, seed: int, screens: Sequence[Screen] = ()) -> None:
        self.inner = inner
        self.seed = seed
        self.screens = list(screens)  # fedtune.server.screen: decode, validate
        self.rounds: dict[int, RoundStats] = {}
        self.sent: Sent = {}  # this round's train messages' tensors, by destination node

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        stats = self.rounds[server_round] = RoundStats()
        random.seed(self.seed * 100_003 + server_round)  # Flower samples nodes with `random`
        msgs = list(self.inner.configure_train(server_round, arrays, config, grid))
        stats.sampled = len(msgs)
        if self.screens:
            self.sent = {m.metadata.dst_node_id: wire.from_record(m.content[wire.ARRAYS]) for m in msgs}
        stats.bytes_down += sum(_message_bytes(m) for m in msgs)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stats = self.rounds[server_round]
        for m in replies:
            if m.has_error():
                stats.failures.append(f"node {m.metadata.src_node_id}: {m.error.reason}")
            else:
                stats.replied += 1
                stats.bytes_up += _message_bytes(m)
        replies = self._screen(server_round, replies, stats)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        stats.train = dict(metrics or {})
        return arrays, metrics

    def _screen(self, server_round: int, replies: list[Message], stats: RoundStats) -> list[Message]:
        failed = [m for m in replies if m.has_error()]
        kept = [m for m in replies if not m.has_error()]
        for screen in self.screens:
            kept, rejected = screen(server_round, kept, self.sent)
            for r in rejected:
                client = r.message.content[wire.METRICS].get(wire.CLIENT_ID) if wire.METRICS in r.message.content else None
                stats.rejected.append({"client": None if client is None else int(client),
                                       "node": int(r.message.metadata.src_node_id), "reason": r.reason})
        return failed + kept

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        random.seed(self.seed * 100_003 + server_round + 50_000)
        msgs = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self.rounds[server_round].bytes_down += sum(_message_bytes(m) for m in msgs)
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        stats = self.rounds[server_round]
        stats.bytes_up += sum(_message_bytes(m) for m in replies if not m.has_error())
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        stats.client_eval = dict(metrics or {})
        return metrics
