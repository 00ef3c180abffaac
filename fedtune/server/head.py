"""Server side of the head initialisation (FedNCM or the closed-form ridge head): one query to
every client, then the head."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor, nn

from fedtune import wire
from fedtune.config import RunConfig
from fedtune.head_init import HEAD_INITS, set_head
from fedtune.server.metered import RoundStats, _message_bytes
from fedtune.strategies.fedavg import ordered

QUERY = "query.head_init"


Build = Callable[[list[Message]], tuple[Tensor, Tensor]]  # good replies -> (weight [C, d], bias [C])


def head_builder(cfg: RunConfig) -> Build:
    """How the head is built from the replies: by ``head-init``'s entry in HEAD_INITS from the
    exact statistics, or under ``dp=sample`` (ncm only) from the clients' noisy unit-feature sums."""
    scale = cfg.train.head_logit_scale
    if cfg.privacy.dp == "sample":
        from fedtune.privacy.head import dp_ncm_head

        def private(good: list[Message]) -> tuple[Tensor, Tensor]:
            sums = [wire.from_record(m.content[wire.ARRAYS])["sums"] for m in good]
            n = sum(float(m.content[wire.METRICS][wire.WEIGHT]) for m in good)  # public example counts
            return dp_ncm_head(sums, n, scale)

        return private

    head_init = HEAD_INITS.get(cfg.train.head_init)

    def exact(good: list[Message]) -> tuple[Tensor, Tensor]:
        return head_init.build([wire.from_record(m.content[wire.ARRAYS]) for m in good], cfg.train)

    return exact


def init_head(grid: Grid, model: nn.Module, run_config: ConfigRecord, build: Build, timeout: float,
              per_node: Callable[[int, ArrayRecord], ArrayRecord] | None = None) -> RoundStats:
    """Ask every connected client for class feature sums and set ``model``'s head from them
    with ``build`` (:func:`head_builder`).
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
    set_head(model, *build(good))
    eps = {int(m.content[wire.METRICS][wire.CLIENT_ID]): float(m.content[wire.METRICS]["epsilon"])
           for m in good if "epsilon" in m.content[wire.METRICS]}
    if eps:  # dp=sample: what the head release spent, as on the training rounds' rows
        stats.train = {"epsilon": max(eps.values()), **{f"epsilon_client_{c}": e for c, e in sorted(eps.items())}}
    return stats
