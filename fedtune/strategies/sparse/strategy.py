"""FedAvg for sparse adapters: the mask-aware mean over the decoded replies.

``strategy=fedavg`` dispatches here when ``adapter=sparse`` (fedtune.strategies): the
``decode`` screen has turned every reply into dense state + masks (``MASKS``).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedtune import wire
from fedtune.compression.downlink import sparsify
from fedtune.strategies.fedavg import FedAvg, ordered
from fedtune.strategies.sparse import mask_aware_mean, union_fraction


def _sparse_down(msgs: Iterable[Message]) -> list[Message]:
    """Each message's arrays with the base deltas as nonzero entries (messages may share one
    content: each distinct record is encoded once, and encoding is idempotent)."""
    msgs, done = list(msgs), {}
    for m in msgs:
        record = m.content[wire.ARRAYS]
        if id(record) not in done:
            done[id(record)] = wire.to_record(sparsify(wire.from_record(record)))
            done[id(done[id(record)])] = done[id(record)]
        m.content[wire.ARRAYS] = done[id(record)]
    return msgs


def _take_masks(m: Message) -> dict:
    """Remove the decode screen's masks from a reply and return them ({} if absent)."""
    if m.has_error() or wire.MASKS not in m.content:
        return {}
    masks = wire.from_record(m.content[wire.MASKS])
    del m.content[wire.MASKS]
    return masks


class SparseFedAvg(FedAvg):
    """Example-weighted, mask-aware average of sparse deltas; plain average of the head. Sends
    the global sparse delta as its nonzero entries (fedtune.compression.downlink)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return _sparse_down(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return _sparse_down(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        taken = {id(m): _take_masks(m) for m in replies}  # Flower checks for exactly one ArrayRecord per reply
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        valid = ordered(valid)
        states = [wire.from_record(m.content[wire.ARRAYS]) for m in valid]
        masks = [taken[id(m)] for m in valid]
        weights = [float(m.content[wire.METRICS][wire.WEIGHT]) for m in valid]
        arrays = wire.to_record(mask_aware_mean(states, masks, weights))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        metrics = MetricRecord(dict(metrics or {}))
        metrics["sparse_union"] = union_fraction(masks, {k: states[0][k].numel() for k in masks[0]})
        return arrays, metrics
