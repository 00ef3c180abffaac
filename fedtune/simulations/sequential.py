"""The same federation as a plain loop in one process, with no Flower: the reference that
bench/overhead.py times the Flower runtime against (same clients, same local training,
same aggregation, same evaluation)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import Tensor

from fedtune.catalog import adapter_kind
from fedtune.client.worker import get_worker
from fedtune.config import RunConfig
from fedtune.data import load_dataset
from fedtune.evaluation import TestEvaluator
from fedtune.modeling import load_trainable_state, shared_model, trainable_state
from fedtune.strategies.aggregation import momentum_step, weighted_mean
from fedtune.head_init import clients_head
from fedtune.training import client_seed, train_local


def fedavg_round(cfg: RunConfig, state: dict[str, Tensor], clients, server_round: int) -> dict[str, Tensor]:
    """One round: each client trains from ``state`` on its own data; the example-weighted mean."""
    states, weights = [], []
    for c in clients:
        w = get_worker(cfg, int(c))
        load_trainable_state(w.model, state)
        train_local(w.model, w.data.train, cfg.train, client_seed(cfg.federation.seed, server_round, int(c)), w.pad_id)
        states.append(trainable_state(w.model))
        weights.append(float(len(w.data.train)))
    return weighted_mean(states, weights)


def server_step(cfg: RunConfig, state: dict[str, Tensor], mean: dict[str, Tensor],
                momentum: dict[str, Tensor]) -> dict[str, Tensor]:
    """The global state after a round. fedavg: the mean. fedavgm: the server momentum step
    (fedtune.strategies.aggregation.momentum_step); ``momentum`` holds its velocity between rounds."""
    if cfg.federation.strategy == "fedavg":
        return mean
    return momentum_step(state, mean, momentum, cfg.federation.server_momentum, cfg.federation.server_lr)


def sequential(cfg: RunConfig, progress=print) -> list[dict[str, Any]]:
    kind = adapter_kind(cfg.model.adapter)
    if cfg.federation.strategy not in ("fedavg", "fedavgm") or kind.training != "plain" or kind.aggregation != "mean":
        raise ValueError("the sequential reference implements fedavg and fedavgm of adapters with a plain local run "
                         "and mean only")
    if cfg.privacy.dp != "none":
        raise ValueError(f"the sequential reference has no differential privacy; dp={cfg.privacy.dp!r} needs simulate")
    n = cfg.partition.num_clients
    per_round = max(int(n * cfg.federation.fraction_train), min(cfg.federation.min_train_nodes, n))
    model = shared_model(cfg.model, load_dataset(cfg.data).num_labels, cfg.federation.seed).reset()
    evaluator = TestEvaluator(cfg)
    if cfg.train.head_init != "random":  # ncm | ridge, as the clients' head_init query answers
        workers = [get_worker(cfg, c) for c in range(n)]
        clients_head(model, [w.data.train for w in workers], cfg.train, workers[0].pad_id)
    state = trainable_state(model)
    rows = [{"round": 0, **evaluator(model), "seconds": 0.0}]
    rng = np.random.default_rng(cfg.federation.seed)
    momentum: dict[str, Tensor] = {}
    for r in range(1, cfg.federation.rounds + 1):
        t = time.perf_counter()
        clients = sorted(rng.choice(n, per_round, replace=False)) if per_round < n else range(n)
        state = server_step(cfg, state, fedavg_round(cfg, state, clients, r), momentum)
        load_trainable_state(model, state)
        rows.append({"round": r, **evaluator(model), "seconds": time.perf_counter() - t})
        progress(f"round {r}: accuracy {rows[-1]['accuracy']:.4f}  {rows[-1]['seconds']:.1f} s")
    return rows
