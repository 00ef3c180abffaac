"""Heterogeneous-rank strategies on one federation: accuracy, per-rank accuracy and bytes.

10 Dirichlet(0.5) clients in four device profiles of LoRA rank 16, 8, 4 and 2 (round-robin by
client id: gpu-large r16, gpu-small r8, cpu-mid r4 on the deepest 4 layers, cpu-edge r2 on the
deepest 3), the same rounds and local work for every strategy, against homogeneous FedAvg at
rank 16 and at rank 2 and the centralized ceiling (pooled data, same steps, rank 16).
With ``--seeds N`` every cell is the mean ± the 95% Student-t interval over run seeds 0..N-1.
Finished runs are kept in ``runs/bench/strategies.jsonl``: rerunning the same command after a
stop trains only what is missing (so the full benchmark can be run a few runs at a time).
On a machine with a CUDA device the clients train on
it (``client-gpus`` 0.25 unless ``--set`` says otherwise; common.on_accelerator).
Writes a table to docs/benchmarks.md (section "strategies") and docs/bench-strategies.png.

    .venv/bin/python bench/strategies.py --seeds 3 --eval-size 2000                     # the full benchmark
    .venv/bin/python bench/strategies.py [--eval-size 500] [--seeds 3] [--strategies a,b] [--set key=value ...]
    .venv/bin/python bench/strategies.py --set model=tiny --set rounds=1 --set train-size=400   # plumbing check
"""

from __future__ import annotations

import argparse
import tempfile

import common

from fedtune.config import parse_set
from fedtune.presets import resolve

STRATEGIES = ["fedavg", "hetlora", "flexlora", "flora", "ffa", "fedsa", "fedex"]
# each rank's own model is evaluated at the last round only (the table reads it there): at 2,000
# test examples that is 3 to 4 fewer evaluations of the slice per round
PROFILES = {"profiles": "gpu-large,gpu-small,cpu-mid,cpu-edge", "profile-defs": "cpu-mid lora-rank=4 layers=4",
            "profile-eval-every": "0"}
PNG = common.DOC.parent / "bench-strategies.png"


def plot(curves: dict[str, list[float]], ceiling: float) -> None:
    with common.figure(PNG, (7, 4), ncol=2) as ax:
        for name, accs in curves.items():
            ax.plot(range(len(accs)), accs, marker="o", label=name, linestyle="--" if name.startswith("homog") else "-")
        if ceiling == ceiling:  # not NaN: the ceiling has run
            ax.axhline(ceiling, color="black", linewidth=1, label="centralized (r16)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")


def vs(finals: dict[str, dict[int, float]], name: str, ref: str) -> str:
    """``name``'s final accuracy minus ``ref``'s, paired by seed: 'mean ± CI (seeds)' in points."""
    diffs = common.paired(finals.get(name, {}), finals.get(ref, {}))
    return f"{common.fmt_ci(diffs, 1)} ({len(diffs)})" if diffs and name != ref else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="2000")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=1, help="run seeds per run (mean ± 95%% CI)")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    ap.add_argument("--stored", action="store_true",
                    help="train nothing: report the runs finished so far (each row over its finished seeds)")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    base = common.on_accelerator({"num-clients": "10", "partition": "dirichlet", "dirichlet-alpha": "0.5",
                                  "eval-size": args.eval_size, **parse_set(args.set)})

    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.centralized import centralized
    from fedtune.simulations.simulate import simulate

    runs = {name: {**base, **PROFILES, "strategy": name} for name in args.strategies.split(",")}
    runs["homogeneous fedavg r16"] = {**base, "lora-rank": "16"}
    runs["homogeneous fedavg r2"] = {**base, "lora-rank": "2"}
    results: dict[str, dict[int, tuple[list[dict], dict]]] = {}  # name -> seed -> (metrics, summary)
    ceilings: dict[int, float] = {}  # seed -> centralized final accuracy
    done = common.Results("strategies", base)  # finished runs survive a stop; a rerun picks up after them
    for i in range(args.seeds):
        for name, flat in runs.items():
            cfg = resolve("default", overrides=common.seed_overrides(flat, i))
            if (hit := done.get(f"{cfg.federation.seed}/{name}")) is None and args.stored:
                continue
            print(f"== {name} (seed {cfg.federation.seed})", flush=True)
            if hit is None:
                out = tempfile.mkdtemp(prefix="fedtune-strat-")
                summary = simulate(cfg, out)
                keep = ("best_accuracy", "bytes_up_total", "bytes_down_total", "seconds_per_round")
                hit = done.put(f"{cfg.federation.seed}/{name}",
                               {"metrics": RunDir(out).metrics(), "summary": {k: summary[k] for k in keep}})
            results.setdefault(name, {})[cfg.federation.seed] = (hit["metrics"], hit["summary"])
        cfg = resolve("default", overrides=common.seed_overrides({**base, "lora-rank": "16"}, i))
        if (hit := done.get(f"{cfg.federation.seed}/centralized")) is None and args.stored:
            continue
        print(f"== centralized (seed {cfg.federation.seed})", flush=True)
        if hit is None:
            out = tempfile.mkdtemp(prefix="fedtune-strat-central-")
            hit = done.put(f"{cfg.federation.seed}/centralized", {"final_accuracy": centralized(cfg, out)["final_accuracy"]})
        ceilings[cfg.federation.seed] = hit["final_accuracy"]

    ranks = [16, 8, 4, 2]
    rows = []
    ci = common.fmt_ci
    for name, by_seed in results.items():
        seeds = list(by_seed.values())
        lasts = [m[-1] for m, _ in seeds]
        per_rank = [ci([last[f"accuracy_rank_{r}"] for last in lasts]) if f"accuracy_rank_{r}" in lasts[0] else "-"
                    for r in ranks]
        dip = [min(r["accuracy"] for r in m[1:]) - m[0]["accuracy"] for m, _ in seeds]  # worst round vs round 0
        rows.append([name, ci([m[0]["accuracy"] for m, _ in seeds]), ci([last["accuracy"] for last in lasts]),
                     ci([s["best_accuracy"] for _, s in seeds]), ci(dip, 1, scale=100), *per_rank,
                     f"{sum(s['bytes_up_total'] for _, s in seeds) / len(seeds) / 1e6:.2f}",
                     f"{sum(s['bytes_down_total'] for _, s in seeds) / len(seeds) / 1e6:.2f}",
                     f"{sum(s['seconds_per_round'] for _, s in seeds) / len(seeds):.1f}", len(seeds)])
    if not results:
        raise SystemExit("no finished run stored for this command's settings (runs/bench/strategies.jsonl)")
    rows.append(["centralized r16 (ceiling)", "-", ci(list(ceilings.values())) if ceilings else "not run", "-", "-",
                 *["-"] * len(ranks), "-", "-", "-", len(ceilings)])
    ceiling = sum(ceilings.values()) / len(ceilings) if ceilings else float("nan")
    complete = len(ceilings) == args.seeds and all(len(results.get(n, {})) == args.seeds for n in runs)
    finals = {name: {s: m[-1]["accuracy"] for s, (m, _) in by_seed.items()} for name, by_seed in results.items()}
    finals["centralized"] = ceilings
    paired_rows = [[name, *[vs(finals, name, ref) for ref in ("fedavg", "centralized")]] for name in results]
    if not args.no_write:
        curves = {name: [m for m, _ in by_seed.values()] for name, by_seed in results.items()}  # name -> per seed
        plot({name: [sum(m[r]["accuracy"] for m in ms) / len(ms) for r in range(len(ms[0]))]
              for name, ms in curves.items()}, ceiling)

    fed = cfg.federation
    body = "\n".join([
        "## Heterogeneous ranks: strategies (`bench/strategies.py`)",
        "",
        f"Model `{cfg.model.model}`, 20 Newsgroups, {cfg.partition.num_clients} Dirichlet({cfg.partition.dirichlet_alpha}) "
        f"clients in four profiles (round-robin by client id): gpu-large r16, gpu-small r8, cpu-mid r4 (deepest 4 "
        f"layers), cpu-edge r2 (deepest 3 layers, batch 8); lora-alpha {cfg.model.lora_alpha}, {fed.rounds} rounds x "
        f"{cfg.train.local_steps} local steps, {common.precision(cfg.model)}; accuracy on a fixed {cfg.data.eval_size or 'whole'}-example test slice; "
        f"{args.seeds} run seed(s), mean ± 95% Student-t interval; `worst - r0` = the lowest round after 0 minus "
        "round 0, in points (negative: a dip below the starting head). "
        "`rank r` = the model a client of that rank actually runs (its slice / truncation / own B group mean), "
        "evaluated on the same slice after the last round; bytes = all rounds, head initialisation included. What each strategy sends: "
        "[docs/strategies.md](strategies.md).",
        "",
        common.table(["run", "round 0", "final acc", "best acc", "worst - r0", *[f"rank {r}" for r in ranks],
                      "MB up", "MB down", "s/round", "seeds"], rows),
        "",
        "Final accuracy minus fedavg's (zero-padded averaging of the mixed ranks) and minus the centralized "
        "ceiling's, in points, paired by seed (the same partition and test slice): mean ± 95% CI (seeds):",
        "",
        common.table(["run", "- fedavg (points)", "- centralized (points)"], paired_rows),
        "",
        f"Command: `.venv/bin/python bench/strategies.py --seeds {args.seeds} --eval-size {args.eval_size}"
        f" --strategies {args.strategies}" + "".join(f" --set {s}" for s in args.set) + "`"
        + (" (this table: the same command with `--stored`, from the runs finished so far; the command without it "
           "trains the missing ones and resumes after a stop)" if args.stored and not complete else ""),
        "",
        f"![accuracy per round (mean over seeds)]({PNG.name})",
    ])
    if not args.no_write:
        common.write_section("strategies", body)
    print(body)


if __name__ == "__main__":
    main()
