"""Server side of the FedNCM head initialisation: one query to every client, then the head."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedtune import wire
from fedtune.head_init import ncm_head, set_head
from fedtune.server.metered import RoundStats, _message_bytes
from fedtune.strategies.fedavg import ordered

QUERY = "query.head_init"


def init_head(grid: Grid, model: nn.Module, run_config: ConfigRecord, logit_scale: float, timeout: float,
              per_node: Callable[[int, ArrayRecord], ArrayRecord] | None = None) -> RoundStats:
    """Ask every connected client for class feature sums and set ``model``'s head from them.
    ``per_node(node, state)``: what that node receives of the server's state (its own rank)."""
    stats = RoundStats()
    state = wire.to_record({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    msgs = [
        Message(content=RecordDict({wire.ARRAYS: per_node(node, state) if per_node else state,
                                    wire.CONFIG: ConfigRecord(dict(run_config))}),
                message_type=QUERY, dst_node_id=node)
        for node in grid.get_node_ids()
    ]
    stats.sampled = len(msgs)
    stats.bytes_down = sum(_message_bytes(m) for m in msgs)
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    stats.failures = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
    good = ordered(replies)
    stats.replied = len(good)
    stats.bytes_up = sum(_message_bytes(m) for m in good)
    if not good:
        raise RuntimeError("no client answered the head initialisation query: " + "; ".join(stats.failures))
    parts = [wire.from_record(m.content[wire.ARRAYS]) for m in good]
    weight, bias = ncm_head([p["sums"] for p in parts], [p["counts"] for p in parts], [p["ss"] for p in parts], logit_scale)
    set_head(model, weight, bias)
    return stats
