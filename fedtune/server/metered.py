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
from fedtune.server.screen import Rejected, Screen, Sent


@dataclass
class RoundStats:
    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    sampled: int = 0
    replied: int = 0
    failures: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"client", "node", "reason"} per screened-out reply
    adjusted: list[dict] = field(default_factory=list)  # {"client", "node", "reason"} per reply a screen changed
    sampled_nodes: list[int] = field(default_factory=list)
    missing: list[int | None] = field(default_factory=list)  # clients sampled whose good reply never came
    aggregated: bool = True  # False: too few good replies (or none released); the global model is kept
    note: str = ""  # why the round did not aggregate
    train: dict[str, float] = field(default_factory=dict)
    clients: list[dict] = field(default_factory=list)  # {"client", "profile", "device"[, "gpu_peak_mib"]} per reply
    client_eval: dict[str, float] = field(default_factory=dict)


def _message_bytes(m: Message) -> int:
    """Array payloads plus the ConfigRecord's strings: what this message costs on the wire."""
    n = sum(wire.record_bytes(r) for r in m.content.array_records.values())
    for rec in m.content.config_records.values():
        n += sum(len(str(k)) + len(str(v)) for k, v in rec.items())
    return n


def _stated_client(m: Message) -> int | None:
    """The client id a reply states, if it states a sensible one."""
    met = m.content.get(wire.METRICS)
    value = met.get(wire.CLIENT_ID) if isinstance(met, MetricRecord) else None
    return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else None


def _client_info(m: Message) -> dict:
    """Which client replied, with which profile, on which device (and its GPU peak there)."""
    met, adapter = m.content.get(wire.METRICS), m.content.get(wire.ADAPTER)
    index = met.get(wire.DEVICE_INDEX) if isinstance(met, MetricRecord) else None
    info: dict = {"client": _stated_client(m),
                  "profile": adapter.get(wire.PROFILE) if isinstance(adapter, ConfigRecord) else None,
                  "device": "cpu" if index is None or index < 0 else f"cuda:{int(index)}"}
    if info["device"] != "cpu":
        info["gpu_peak_mib"] = round(float(met.get(wire.GPU_PEAK, 0.0)), 1)
    return info


class Metered(Strategy):
    """Delegates to ``inner``; records a ``RoundStats`` per round in ``self.rounds``."""

    def __init__(self, inner: Strategy, seed: int, screens: Sequence[Screen] = (), min_replies: int = 1) -> None:
        self.inner = inner
        self.seed = seed
        self.screens = list(screens)  # fedtune.server.screen: decode, validate
        self.min_replies = min_replies  # good replies a round needs to change the global model (min-train-nodes)
        self.rounds: dict[int, RoundStats] = {}
        self.sent: Sent = {}  # this round's train messages' tensors, by destination node
        self.members: dict = {}  # node id -> Member (fedtune.server.nodes), when the grid knows them

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        stats = self.rounds[server_round] = RoundStats()
        random.seed(self.seed * 100_003 + server_round)  # Flower samples nodes with `random`
        msgs = list(self.inner.configure_train(server_round, arrays, config, grid))
        stats.sampled = len(msgs)
        stats.sampled_nodes = [m.metadata.dst_node_id for m in msgs]
        self.members = dict(getattr(grid, "members", None) or {})
        if self.screens:
            self.sent = {m.metadata.dst_node_id: wire.from_record(m.content[wire.ARRAYS]) for m in msgs}
            for screen in self.screens:  # screens that want the round's global arrays and roster (validate)
                if hasattr(screen, "begin_round"):
                    screen.begin_round(server_round, arrays, grid)
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
                stats.clients.append(_client_info(m))
        stats.clients.sort(key=lambda c: (c["client"] is None, c["client"] or 0))
        replies = self._screen(server_round, replies, stats)
        good = {m.metadata.src_node_id for m in replies if not m.has_error()}
        stats.missing = sorted((self._client(n) for n in stats.sampled_nodes if n not in good),
                               key=lambda c: (c is None, c or 0))
        if len(good) < self.min_replies:  # the round completes; the global model stays as it was
            stats.aggregated = False
            stats.note = f"{len(good)} good replies of {self.min_replies} required: global model kept"
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        stats.train = dict(metrics or {})
        if arrays is None:
            stats.aggregated, stats.note = False, stats.note or "the strategy released no aggregate: global model kept"
        return arrays, metrics

    def _client(self, node: int) -> int | None:
        member = self.members.get(node)
        return None if member is None else int(member.client)

    def _screen(self, server_round: int, replies: list[Message], stats: RoundStats) -> list[Message]:
        failed = [m for m in replies if m.has_error()]
        kept = [m for m in replies if not m.has_error()]
        for screen in self.screens:
            kept, rejected = screen(server_round, kept, self.sent)
            stats.rejected.extend(self._record(r) for r in rejected)
            stats.adjusted.extend(self._record(r) for r in getattr(screen, "notes", ()))  # e.g. a clipped weight
        return failed + kept

    def _record(self, r: Rejected) -> dict:
        """{"client", "node", "reason"}: the client the node holds (the reply's own statement may be the bad part)."""
        node = int(r.message.metadata.src_node_id)
        client = self._client(node)
        if client is None:
            client = _stated_client(r.message)
        return {"client": client, "node": node, "reason": r.reason}

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
