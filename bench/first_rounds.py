"""The first rounds after the initial head: does training dip below round 0?

Each recipe (a set of ``--set`` overrides) runs the federation as the in-process plain loop
of fedtune/simulations/sequential.py (same clients, local training, FedAvg and evaluation as
the Flower simulation, no Ray), with the server learning rate applied to the mean update.
The head (and its round-0 evaluation) is computed once per head setting and reused. Writes
the section "first-rounds" of docs/benchmarks.md: accuracy and loss per round, and the
worst round after 0 minus round 0.

    .venv/bin/python bench/first_rounds.py --base num-clients=4,rounds=2,train-size=800,eval-size=300 \\
        "head-logit-scale=4" "head-logit-scale=16" "head-init=ridge"       # the reduced run
"""

from __future__ import annotations

import argparse
import json
import time

import common  # noqa: F401  (environment)


def run(recipes: list[str], base: dict[str, str], progress=print) -> list[dict]:
    import numpy as np
    import torch

    from fedtune.client.worker import get_worker
    from fedtune.data import load_dataset
    from fedtune.evaluation import TestEvaluator
    from fedtune.head_init import clients_head
    from fedtune.modeling import load_trainable_state, shared_model, trainable_state
    from fedtune.presets import resolve
    from fedtune.simulations.sequential import fedavg_round

    heads, evals, results = {}, {}, []
    for spec in recipes:
        over = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        cfg = resolve("default", None, {**base, **over})
        torch.set_num_threads(cfg.federation.client_cpus)
        started = time.perf_counter()
        n = cfg.partition.num_clients
        model = shared_model(cfg.model, load_dataset(cfg.data).num_labels, cfg.federation.seed).reset()
        if cfg.data not in evals:
            evals[cfg.data] = TestEvaluator(cfg)
        ev = evals[cfg.data]
        key = (cfg.data, cfg.partition, cfg.model, cfg.federation.seed, cfg.train.head_init,
               cfg.train.head_init_examples, cfg.train.head_logit_scale, cfg.train.head_shrinkage,
               cfg.train.head_ridge_scale)
        if key not in heads:
            if cfg.train.head_init != "random":
                workers = [get_worker(cfg, c) for c in range(n)]
                model = shared_model(cfg.model, load_dataset(cfg.data).num_labels, cfg.federation.seed).reset()
                clients_head(model, [w.data.train for w in workers], cfg.train, workers[0].pad_id)
            heads[key] = (trainable_state(model), ev(model))
        state, first = heads[key]
        load_trainable_state(model, state)
        rows = [first]
        rng = np.random.default_rng(cfg.federation.seed)
        per_round = max(int(n * cfg.federation.fraction_train), min(cfg.federation.min_train_nodes, n))
        for r in range(1, cfg.federation.rounds + 1):
            clients = sorted(rng.choice(n, per_round, replace=False)) if per_round < n else range(n)
            mean = fedavg_round(cfg, state, clients, r)  # the plain loop's round
            state = {k: state[k] + cfg.federation.server_lr * (mean[k] - state[k]) for k in state}
            load_trainable_state(model, state)
            rows.append(ev(model))
            progress(f"{spec or 'defaults'}: round {r} accuracy {rows[-1]['accuracy']:.4f}")
        rec = {"recipe": spec or "defaults", "accuracy": [x["accuracy"] for x in rows],
               "loss": [x["loss"] for x in rows], "seconds": time.perf_counter() - started}
        progress(json.dumps(rec))
        results.append(rec)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="+", help="comma-separated KEY=VALUE overrides per recipe ('' = defaults)")
    ap.add_argument("--base", default="num-clients=4,rounds=2,train-size=800,eval-size=300,client-cpus=1")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", default="first-rounds", help="the docs/benchmarks.md section it writes")
    args = ap.parse_args()
    base = dict(kv.split("=", 1) for kv in args.base.split(",") if kv)
    results = run(args.recipes, base, lambda s: print(s, flush=True))
    rounds = len(results[0]["accuracy"])
    rows = [[r["recipe"], *[f"{a:.3f} ({lo:.2f})" for a, lo in zip(r["accuracy"], r["loss"])],
             f"{100 * (min(r['accuracy'][1:]) - r['accuracy'][0]):+.1f}"] for r in results]
    body = "\n".join([
        "## The first rounds after the initial head (`bench/first_rounds.py`"
        + ("" if args.section == "first-rounds" else f", {args.section}") + ")",
        "",
        f"Default preset with `{args.base}`; the in-process plain loop (same clients, local training, FedAvg and "
        "evaluation as the simulation). Cells: test accuracy (loss).",
        "",
        common.table(["recipe", *[f"round {i}" for i in range(rounds)], "worst - r0 (points)"], rows),
        "",
        "Rows name what differs from the defaults (`head-init=ridge`, `head-ridge-scale` 0.3, `head-logit-scale` 16, "
        "`local-loss=ce`; "
        "`defaults` or an empty recipe: none).",
        "",
        "Command: `.venv/bin/python bench/first_rounds.py --base " + args.base + " "
        + " ".join(f'"{r}"' for r in args.recipes)
        + ("" if args.section == "first-rounds" else f" --section {args.section}") + "`",
    ])
    if not args.no_write:
        common.write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
