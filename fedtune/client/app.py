"""The ClientApp: train the adapter it receives on its own partition, or evaluate it there.

The run's config arrives with every message (``fedtune-config``); which partition this node
holds comes from its node config (``partition-id``), as in Flower's simulation runtime and
``flower-supernode --node-config``.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.catalog import adapter_kind
from fedtune.client.adapter import prepare, reply_adapter
from fedtune.client.gpu import device_metrics, oom_mod, start_round
from fedtune.client.node import profile_of
from fedtune.client.secagg import secagg_mod
from fedtune.compression.client import encode_reply
from fedtune.config import RunConfig
from fedtune.head_init import client_head_stats
from fedtune.privacy.client import client_dp_mod, release_head_sums, train_sample_dp
from fedtune.sparse.train import train_sparse_client
from fedtune.tasks import task_of
from fedtune.training import client_seed, train_local

app = ClientApp()

# A kind's own local run, by its catalog name for it (fedtune.catalog.AdapterKindInfo.training);
# plain: fedtune.training.train_local, or DP-SGD with dp=sample.
LOCAL_RUNS = {"sparse": train_sparse_client}  # fedtune.sparse: choose entries, train only them (DP-SGD: seeded masks)


# secagg_mod (outermost): Flower's SecAgg+ when the server runs it; a CUDA OOM fails this client only;
# client_dp_mod clips (dp=client-* with dp-clipping=client) before masking
@app.train(mods=[secagg_mod, oom_mod, client_dp_mod])
def train(msg: Message, context: Context) -> Message:
    me = prepare(msg, context)  # the config as this client runs it (its profile applied), its loaded worker
    cfg, client, worker = me.cfg, me.client, me.worker
    start_round(worker.model)
    server_round = int(msg.content[wire.CONFIG]["server-round"])
    seed = client_seed(cfg.federation.seed, server_round, client)
    if (local_run := LOCAL_RUNS.get(adapter_kind(cfg.model.adapter).training)) is not None:
        stats = local_run(worker, cfg, seed, context, client)
    elif cfg.privacy.dp == "sample":  # DP-SGD, this client's accountant kept across rounds and restarts
        stats = train_sample_dp(worker, cfg, seed, context, client)
    else:
        stats = train_local(worker.model, worker.data.train, cfg.train, seed, worker.pad_id)
    weight = 0 if stats.get("budget_exhausted") else len(worker.data.train)  # spent: did not train, weight 0
    stated, adapter = reply_adapter(me, context, server_round)  # rank, alpha, scale, rsLoRA; profile
    metrics = MetricRecord({wire.WEIGHT: weight, wire.CLIENT_ID: client, **stats, **stated,
                            **device_metrics(worker.model)})
    arrays = encode_reply(cfg, worker.model, msg.content[wire.ARRAYS], context, seed)  # compressed / sparse: encoded
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics,
                          wire.ADAPTER: adapter})
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[oom_mod])
def evaluate_local(msg: Message, context: Context) -> Message:
    me = prepare(msg, context)
    cfg, client, worker = me.cfg, me.client, me.worker
    res = task_of(cfg).evaluate(worker.model, worker.data.val, cfg.train.eval_batch_size, worker.pad_id)
    metrics = MetricRecord({wire.WEIGHT: int(res["num_examples"]), wire.CLIENT_ID: client,
                            "accuracy": res["accuracy"], "loss": res["loss"]})
    return Message(content=RecordDict({wire.METRICS: metrics}), reply_to=msg)


@app.query("head_init", mods=[oom_mod])
def head_init(msg: Message, context: Context) -> Message:
    """The statistics ``head-init`` asks for (fedtune/head_init.py) on (up to N of) this client's
    examples: ncm: class sums, counts, sums of squares; ridge: class sums, counts, feature scatter."""
    me = prepare(msg, context)
    cfg, client, worker = me.cfg, me.client, me.worker
    enc = worker.data.train
    if cfg.privacy.dp == "sample":  # noisy unit-feature sums over all examples, accounted (fedtune/privacy/head.py)
        sums, info = release_head_sums(worker, cfg, context, client)
        metrics = MetricRecord({wire.WEIGHT: len(enc), wire.CLIENT_ID: client, **info})
        return Message(content=RecordDict({wire.ARRAYS: wire.to_record({"sums": sums.float()}),
                                           wire.METRICS: metrics}), reply_to=msg)
    stats, n = client_head_stats(worker.model, enc, cfg.train, worker.pad_id)
    arrays = wire.to_record(stats)
    metrics = MetricRecord({wire.WEIGHT: n, wire.CLIENT_ID: client})
    return Message(content=RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics}), reply_to=msg)


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    """The client id and device profile this node holds, so the server can order and sample
    nodes reproducibly and build each node's message for its adapter."""
    metrics = MetricRecord({wire.CLIENT_ID: int(context.node_config["partition-id"])})
    content = RecordDict({wire.METRICS: metrics})
    if wire.RUN_CONFIG in msg.content[wire.CONFIG]:
        cfg = RunConfig.from_json(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
        content[wire.ADAPTER] = ConfigRecord({wire.PROFILE: profile_of(cfg, context).name})
    return Message(content=content, reply_to=msg)


__all__ = ["app"]
