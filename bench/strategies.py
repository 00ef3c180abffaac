"""Heterogeneous-rank strategies on one federation: accuracy, per-rank accuracy and bytes.

10 Dirichlet(0.5) clients in four device profiles of LoRA rank 16, 8, 4 and 2 (round-robin by
client id: gpu-large r16, gpu-small r8, cpu-mid r4 on the deepest 4 layers, cpu-edge r2 on the
deepest 3), the same rounds and local work for every strategy, against homogeneous FedAvg at
rank 16 and at rank 2 and the centralized ceiling (pooled data, same steps, rank 16).
Writes a table to docs/benchmarks.md (section "strategies") and docs/bench-strategies.png.

    .venv/bin/python bench/strategies.py [--eval-size 500] [--strategies a,b] [--set key=value ...]
    .venv/bin/python bench/strategies.py --set model=tiny --set rounds=1 --set train-size=400   # plumbing check
"""

from __future__ import annotations

import argparse
import tempfile

import common

from fedtune.config import parse_set
from fedtune.presets import resolve

STRATEGIES = ["fedavg", "hetlora", "flexlora", "flora", "ffa", "fedsa", "fedex"]
PROFILES = {"profiles": "gpu-large,gpu-small,cpu-mid,cpu-edge", "profile-defs": "cpu-mid lora-rank=4 layers=4"}
PNG = common.DOC.parent / "bench-strategies.png"


def plot(curves: dict[str, list[float]], ceiling: float) -> None:
    with common.figure(PNG, (7, 4), ncol=2) as ax:
        for name, accs in curves.items():
            ax.plot(range(len(accs)), accs, marker="o", label=name, linestyle="--" if name.startswith("homog") else "-")
        ax.axhline(ceiling, color="black", linewidth=1, label="centralized (r16)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="500")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    base = {"num-clients": "10", "partition": "dirichlet", "dirichlet-alpha": "0.5", "eval-size": args.eval_size,
            **parse_set(args.set)}

    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.centralized import centralized
    from fedtune.simulations.simulate import simulate

    runs = {name: {**base, **PROFILES, "strategy": name} for name in args.strategies.split(",")}
    runs["homogeneous fedavg r16"] = {**base, "lora-rank": "16"}
    runs["homogeneous fedavg r2"] = {**base, "lora-rank": "2"}
    results = {}
    for name, flat in runs.items():
        cfg = resolve("default", overrides=flat)
        out = tempfile.mkdtemp(prefix="fedtune-strat-")
        print(f"== {name}", flush=True)
        summary = simulate(cfg, out)
        results[name] = (RunDir(out).metrics(), summary)
    cfg = resolve("default", overrides={**base, "lora-rank": "16"})
    print("== centralized", flush=True)
    ceiling = centralized(cfg, tempfile.mkdtemp(prefix="fedtune-strat-central-"))["final_accuracy"]

    ranks = [16, 8, 4, 2]
    rows = []
    for name, (metrics, summary) in results.items():
        last = metrics[-1]
        per_rank = [f"{last[f'accuracy_rank_{r}']:.3f}" if f"accuracy_rank_{r}" in last else "-" for r in ranks]
        rows.append([name, f"{last['accuracy']:.3f}", f"{summary['best_accuracy']:.3f}", *per_rank,
                     f"{summary['bytes_up_total'] / 1e6:.2f}", f"{summary['bytes_down_total'] / 1e6:.2f}",
                     f"{summary['seconds_per_round']:.1f}"])
    rows.append(["centralized r16 (ceiling)", f"{ceiling:.3f}", "-", *["-"] * len(ranks), "-", "-", "-"])
    plot({name: [r["accuracy"] for r in m] for name, (m, _) in results.items()}, ceiling)

    fed = cfg.federation
    body = "\n".join([
        "## Heterogeneous ranks: strategies (`bench/strategies.py`)",
        "",
        f"Model `{cfg.model.model}`, 20 Newsgroups, {cfg.partition.num_clients} Dirichlet({cfg.partition.dirichlet_alpha}) "
        f"clients in four profiles (round-robin by client id): gpu-large r16, gpu-small r8, cpu-mid r4 (deepest 4 "
        f"layers), cpu-edge r2 (deepest 3 layers, batch 8); lora-alpha {cfg.model.lora_alpha}, {fed.rounds} rounds x "
        f"{cfg.train.local_steps} local steps; accuracy on a fixed {cfg.data.eval_size}-example test slice. "
        "`rank r` = the model a client of that rank actually runs (its slice / truncation / own B group mean), "
        "evaluated on the same slice; bytes = all rounds, head initialisation included. What each strategy sends: "
        "[docs/strategies.md](strategies.md).",
        "",
        common.table(["run", "final acc", "best acc", *[f"rank {r}" for r in ranks], "MB up", "MB down", "s/round"], rows),
        "",
        f"![accuracy per round]({PNG.name})",
    ])
    common.write_section("strategies", body)
    print(body)


if __name__ == "__main__":
    main()
