"""The reference for bench/overhead.py: a plain Flower Message-API FedAvg app with peft.

What a competent user writes from Flower's and peft's documentation: a ``ClientApp`` whose
``@app.train`` loads the received LoRA + head tensors into a peft model, trains them with
AdamW for ``local-steps`` batches and replies with them; a ``ServerApp`` running Flower's own
``FedAvg`` with a centralized ``evaluate_fn``. No fedtune strategy, server or client code:
only fedtune's data partitions and tokenization (so both see the same examples) and its
model constructor (same base, same LoRA placement, same initial adapter). The head starts
random (no FedNCM); one model and one encoded partition per process, cached, as a simulation
actor allows. Per round it does the same work as fedtune: the same local steps on the same
clients, FedAvg, the same server evaluation.
"""

from __future__ import annotations

import functools
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtune.config import RunConfig

CONFIG = "fedtune-config"  # the run config (JSON), in every train message's ConfigRecord


@functools.lru_cache(maxsize=2)
def _model(cfg_json: str):
    from fedtune.data import load_dataset
    from fedtune.modeling import build_model

    cfg = RunConfig.from_json(cfg_json)
    return build_model(cfg.model, load_dataset(cfg.data).num_labels, cfg.federation.seed)


@functools.lru_cache(maxsize=16)
def _partition(cfg_json: str, client: int):
    from fedtune.data import client_data
    from fedtune.modeling import load_tokenizer
    from fedtune.training import encode

    cfg = RunConfig.from_json(cfg_json)
    tok = load_tokenizer(cfg.model.model)
    return encode(tok, client_data(cfg.data, cfg.partition, cfg.federation.seed, client).train, cfg.data.max_length), \
        tok.pad_token_id or 0


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load(model, arrays: ArrayRecord) -> None:
    state = arrays.to_torch_state_dict()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state[n])


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg_json = str(msg.content["config"][CONFIG])
    cfg = RunConfig.from_json(cfg_json)
    torch.set_num_threads(cfg.federation.client_cpus)
    client = int(context.node_config["partition-id"])
    model = _model(cfg_json)
    enc, pad = _partition(cfg_json, client)
    load(model, msg.content["arrays"])
    heads = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.train.lr}, {"params": heads, "lr": cfg.train.head_lr}],
                            weight_decay=cfg.train.weight_decay)
    rng = torch.Generator().manual_seed(cfg.federation.seed * 100003 + int(msg.content["config"]["server-round"]) * 101 + client)
    model.train()
    for _ in range(cfg.train.local_steps):
        idx = torch.randperm(len(enc), generator=rng)[: cfg.train.batch_size].numpy()
        loss = model(**enc.collate(idx, pad)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    content = RecordDict({"arrays": ArrayRecord(trainable(model)),
                          "metrics": MetricRecord({"num-examples": len(enc), "train_loss": loss.item()})})
    return Message(content=content, reply_to=msg)


def server_app(cfg: RunConfig, rows: list[dict]) -> ServerApp:
    """A ServerApp running Flower's FedAvg over all clients; ``rows`` gets one dict per
    round: accuracy, loss and the seconds since the previous round ended."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from fedtune.evaluation import TestEvaluator

        model = _model(cfg.to_json())
        evaluator = TestEvaluator(cfg)
        clock = [time.perf_counter()]

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            load(model, arrays)
            res = evaluator(model)
            now = time.perf_counter()
            rows.append({"round": server_round, "accuracy": res["accuracy"], "loss": res["loss"],
                         "seconds": now - clock[0]})
            clock[0] = now
            print(f"  plain flower round {server_round}: accuracy {res['accuracy']:.4f}  {rows[-1]['seconds']:.1f} s",
                  flush=True)
            return MetricRecord({"accuracy": res["accuracy"], "loss": res["loss"]})

        n = cfg.partition.num_clients
        strategy = FedAvg(fraction_train=cfg.federation.fraction_train, fraction_evaluate=0.0,
                          min_train_nodes=min(n, cfg.federation.min_train_nodes), min_available_nodes=n,
                          weighted_by_key="num-examples")
        strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable(model)), num_rounds=cfg.federation.rounds,
                       train_config=ConfigRecord({CONFIG: cfg.to_json()}), evaluate_fn=evaluate)

    return server


def run(cfg: RunConfig) -> list[dict]:
    """The plain app on Flower's simulation runtime (Ray), as fedtune simulate runs: rows per round."""
    import logging

    from flwr.simulation import run_simulation

    from fedtune.simulations.simulate import backend_config

    rows: list[dict] = []
    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(server_app=server_app(cfg, rows), client_app=app, num_supernodes=cfg.partition.num_clients,
                   backend_config=backend_config(cfg))
    return rows
