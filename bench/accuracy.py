"""Federated accuracy against the centralized ceiling, at equal passes over the data.

Runs, on the same data, model, adapter and budget:
  - fedtune's defaults (FedNCM head init, separate head learning rate);
  - the same federation with naive settings (random head, one learning rate: what a plain
    Flower + peft FedAvg does);
  - the centralized ceiling (`fedtune centralized`: pooled data, same optimizer steps).

    .venv/bin/python bench/accuracy.py [--eval-size 2000] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile

import common

from fedtune.config import parse_set
from fedtune.presets import resolve

NAIVE = {"head-init": "random", "head-lr": "2e-3"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="2000")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    base = {"eval-size": args.eval_size, **parse_set(args.set)}

    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.centralized import centralized
    from fedtune.simulations.simulate import simulate

    results = {}
    for name, extra in (("fedtune defaults", {}), ("naive FedAvg (random head, one lr)", NAIVE)):
        cfg = resolve("default", overrides={**base, **extra})
        out = tempfile.mkdtemp(prefix="fedtune-acc-")
        print(f"== {name}", flush=True)
        summary = simulate(cfg, out)
        results[name] = ([r["accuracy"] for r in RunDir(out).metrics()], summary["seconds_per_round"])
    cfg = resolve("default", overrides=base)
    out = tempfile.mkdtemp(prefix="fedtune-central-")
    print("== centralized", flush=True)
    central = centralized(cfg, out)
    results["centralized, same steps"] = ([r["accuracy"] for r in RunDir(out).metrics()], None)

    rounds = cfg.federation.rounds
    rows = [[name, *[f"{a:.3f}" for a in accs], f"{spr:.1f}" if spr else "-"] for name, (accs, spr) in results.items()]
    ceiling = central["final_accuracy"]
    best = results["fedtune defaults"][0][-1]
    naive = results["naive FedAvg (random head, one lr)"][0][-1]
    body = "\n".join([
        "## Federated accuracy vs the centralized ceiling (`bench/accuracy.py`)",
        "",
        f"all-MiniLM-L6-v2 + LoRA r={cfg.model.lora_rank} ({', '.join(cfg.model.target_modules)}), 20 Newsgroups, "
        f"{cfg.partition.num_clients} Dirichlet({cfg.partition.dirichlet_alpha}) clients, {rounds} rounds x "
        f"{cfg.train.local_steps} local steps x batch {cfg.train.batch_size}, max-length {cfg.data.max_length}; "
        f"accuracy on a fixed {cfg.data.eval_size}-example slice of the test split. Centralized = the same adapter on "
        "the pooled data with the same number of optimizer steps (equal passes), evaluated at each round-equivalent.",
        "",
        common.table(["run", *[f"round {r}" for r in range(rounds + 1)], "s/round"], rows),
        "",
        f"Gap to the ceiling after {rounds} rounds: fedtune {100 * (ceiling - best):.1f} points, naive FedAvg "
        f"{100 * (ceiling - naive):.1f} points. (Reference given in our brief: plain Flower + peft FedAvg reached 0.26 "
        "vs 0.73 centralized in 4 rounds, ~90 s a round on 2 cores.)",
    ])
    common.write_section("accuracy", body)
    print(body)


if __name__ == "__main__":
    main()
