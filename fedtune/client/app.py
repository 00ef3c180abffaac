"""The ClientApp: train the adapter it receives on its own partition, or evaluate it there.

The run's config arrives with every message (``fedtune-config``); which partition this node
holds comes from its node config (``partition-id``), as in Flower's simulation runtime and
``flower-supernode --node-config``.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.client.worker import get_worker
from fedtune.config import RunConfig
from fedtune.modeling import load_trainable_state, trainable_state
from fedtune.head_init import class_feature_sums, head_module
from fedtune.training import Encoded, client_seed, evaluate, train_local

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
    seed = client_seed(cfg.federation.seed, server_round, client)
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


@app.query("head_init")
def head_init(msg: Message, context: Context) -> Message:
    """Per-class sums and counts of head features on (up to N of) this client's examples."""
    cfg, client, worker = _setup(msg, context)
    enc = worker.data.train
    n = min(len(enc), cfg.train.head_init_examples)
    sub = Encoded(enc.ids[:n], enc.labels[:n])  # the local order is already a seeded shuffle
    num_labels = head_module(worker.model).out_features
    sums, counts, ss = class_feature_sums(worker.model, sub, num_labels, cfg.train.eval_batch_size, worker.pad_id)
    arrays = wire.to_record({"sums": sums.float(), "counts": counts.float(), "ss": ss.float()})
    metrics = MetricRecord({wire.WEIGHT: n, wire.CLIENT_ID: client})
    return Message(content=RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics}), reply_to=msg)


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    """The client id this node holds, so the server can order and sample nodes reproducibly."""
    metrics = MetricRecord({wire.CLIENT_ID: int(context.node_config["partition-id"])})
    return Message(content=RecordDict({wire.METRICS: metrics}), reply_to=msg)


__all__ = ["app"]
