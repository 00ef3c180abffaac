"""The ceiling: the same adapter trained on the pooled data with the same budget.

Budget = the federation's optimizer steps (rounds x clients per round x local steps) at the
same batch size, so both see the same number of examples ("equal passes"). Evaluated on the
same test slice at the same points as the federation's rounds. The data is the federation's:
the union of the clients' training rows (their local validation shares left out, as the
federation never trains on them). The head starts where the federation's does: ``head-init``
(ridge / ncm) built from each client's head sample (``clients_head``), so for ``ridge`` round 0
is the federation's round 0 and the gap measures fine-tuning alone.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.config import RunConfig
from fedtune.data import load_dataset
from fedtune.data.partition import client_rows, partition_indices, train_pool
from fedtune.head_init import clients_head
from fedtune.modeling import build_model, load_tokenizer
from fedtune.artifacts import RunDir
from fedtune.tasks import task_of
from fedtune.training import BatchStream, logit_offset, make_optimizer, num_local_steps, run_steps, warmup


def federated_budget(cfg: RunConfig) -> tuple[int, list[int]]:
    """(steps per round, examples per client) of the federation ``cfg`` describes."""
    parts = partition_indices(cfg.data, cfg.partition, cfg.federation.seed)
    sizes = [len(p) - int(round(len(p) * cfg.partition.val_fraction)) for p in parts]
    per_round = max(int(cfg.partition.num_clients * cfg.federation.fraction_train), min(cfg.federation.min_train_nodes, len(parts)))
    mean_steps = float(np.mean([num_local_steps(cfg.train, n) for n in sizes]))
    return math.ceil(per_round * mean_steps), sizes


def centralized(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    from fedtune.catalog import adapter_kind

    if adapter_kind(cfg.model.adapter).training != "plain":  # sparse: its entries are chosen per client
        from fedtune.errors import ConfigError

        raise ConfigError(f"bad value adapter={cfg.model.adapter!r}: the centralized ceiling trains "
                          "adapters with a plain local run only (sparse entries are chosen per client)")
    run = RunDir(out).create(cfg, {"mode": "centralized"})
    ds = load_dataset(cfg.data)
    tok = load_tokenizer(cfg.model.model)
    pool, seed, task = train_pool(cfg.data, cfg.federation.seed), cfg.federation.seed, task_of(cfg)
    rows = [client_rows(cfg.data, cfg.partition, seed, c)[0] for c in range(cfg.partition.num_clients)]
    enc = task.encode(tok, pool.subset(np.concatenate(rows)), cfg.data.max_length)  # every client's training rows
    model = build_model(cfg.model, ds.num_labels, seed=cfg.federation.seed)
    evaluator = task.evaluator(cfg)
    steps_per_round, _ = federated_budget(cfg)
    if cfg.train.head_init != "random":  # the federation's round-0 head, from the clients' own head samples
        clients_head(model, [task.encode(tok, pool.subset(r), cfg.data.max_length) for r in rows], cfg.train,
                     tok.pad_token_id or 0)
    # one optimizer for the whole run, evaluated at each round-equivalent
    torch.manual_seed(cfg.federation.seed)
    opt = make_optimizer(model, cfg.train)
    sched = warmup(opt, cfg.train.warmup_steps)
    batches = BatchStream(enc, cfg.train.batch_size, cfg.federation.seed, tok.pad_token_id or 0)
    offset = logit_offset(cfg.train, model, enc)  # local-loss=logit-adjusted: the pooled prior
    res = evaluator(model)
    extra = lambda res: {k: v for k, v in res.items() if k == "perplexity"}  # noqa: E731 (causal-lm)
    run.append_metrics({"round": 0, "accuracy": res["accuracy"], "loss": res["loss"], "steps": 0, "seconds": 0.0,
                        **extra(res)})
    started, total = time.perf_counter(), 0
    for r in range(1, cfg.federation.rounds + 1):
        t = time.perf_counter()
        losses = run_steps(model, opt, sched, batches, steps_per_round, offset)
        total += steps_per_round
        res = evaluator(model)
        row = {"round": r, "accuracy": res["accuracy"], "loss": res["loss"], "steps": total,
               "train_loss": float(np.mean(losses)), "seconds": time.perf_counter() - t, **extra(res)}
        run.append_metrics(row)
        print(f"round-equivalent {r} ({total} steps)  accuracy {res['accuracy']:.4f}  loss {res['loss']:.4f}", flush=True)
    run.save_adapter(model, ds.label_names)
    summary = {"final_accuracy": res["accuracy"], "steps": total, "seconds": time.perf_counter() - started,
               "examples_seen": total * cfg.train.batch_size}
    run.write_summary(summary)
    return summary
