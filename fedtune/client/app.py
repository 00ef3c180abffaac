"""The ClientApp: train the adapter it receives on its own partition, or evaluate it there.

The run's config arrives with every message (``fedtune-config``); which partition this node
holds comes from its node config (``partition-id``), as in Flower's simulation runtime and
``flower-supernode --node-config``.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.client.worker import get_worker
from fedtune.config import RunConfig
from fedtune.modeling import load_trainable_state, trainable_state
from fedtune.training import evaluate, train_local

app = ClientApp()


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_json(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
    client = int(context.node_config["partition-id"])
    worker = get_worker(cfg, client)
    load_trainable_state(worker.model, wire.from_record(msg.content[wire.ARRAYS]))
    return cfg, client, worker


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, client, worker = _setup(msg, context)
    server_round = int(msg.content[wire.CONFIG]["server-round"])
    seed = (cfg.federation.seed * 1_000_003 + server_round) * 10_007 + client
    stats = train_local(worker.model, worker.data.train, cfg.train, seed, worker.pad_id)
    metrics = MetricRecord({wire.WEIGHT: len(worker.data.train), wire.CLIENT_ID: client, **stats})
    content = RecordDict({wire.ARRAYS: wire.to_record(trainable_state(worker.model)), wire.METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    cfg, client, worker = _setup(msg, context)
    res = evaluate(worker.model, worker.data.val, cfg.train.eval_batch_size, worker.pad_id)
    metrics = MetricRecord({wire.WEIGHT: int(res["num_examples"]), wire.CLIENT_ID: client,
                            "accuracy": res["accuracy"], "loss": res["loss"]})
    return Message(content=RecordDict({wire.METRICS: metrics}), reply_to=msg)


__all__ = ["app", "ArrayRecord"]
