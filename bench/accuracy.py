"""Federated accuracy against the centralized ceiling, at equal passes over the data.

Runs, on the same data, model, adapter and budget, for each partition and seed:
  - fedtune's defaults (closed-form or FedNCM head init, separate head learning rate);
  - optionally (``--naive``) the same federation with naive settings (random head, one
    learning rate: what a plain Flower + peft FedAvg does);
  - the centralized ceiling (`fedtune centralized`: the clients' training rows pooled, the same
    optimizer steps, and the federation's own round-0 head: built from each client's head
    sample, so round 0 is the same model and the gap measures fine-tuning alone).

Every run goes to the largest of ``--rounds`` and is read at each of them (local training
does not depend on the total number of rounds, so round 4 of an 8-round run is the 4-round
run). Finished runs are kept in ``runs/bench/accuracy.jsonl``: rerunning the same command after a
stop trains only what is missing. With ``--seeds N`` each cell is the mean ± the 95% Student-t interval over run seeds
0..N-1 (the seed draws the partition, the adapter's init and the client sampling; the test
slice is fixed).
On a machine with a CUDA device the clients train on
it (``client-gpus`` 0.25 unless ``--set`` says otherwise; common.on_accelerator).

With ``--recipe K=V,...`` (repeatable) each recipe is one more federated row, paired against
the same centralized runs. ``--loop plain`` runs each federation as the in-process plain loop
(fedtune/simulations/sequential.py: the simulation's numbers without Ray), and ``--jobs N``
trains N (partition, seed) cells at once in their own processes: on a GPU they share it
(scripts/gpu_accuracy.sh runs this on the GPU test machine).

    .venv/bin/python bench/accuracy.py --seeds 3 --rounds 4,8 --eval-size 2000       # the full benchmark
    python3 bench/accuracy.py --seeds 5 --rounds 4,8 --loop plain --jobs 15 \\
        --recipe "local-loss=logit-adjusted" --set train-size=1500 --set max-length=128 --set local-epochs=1
                                                                                     # docs/benchmarks.md, on a GPU
    .venv/bin/python bench/accuracy.py --partitions dirichlet-0.5 --rounds 4          # one partition, one seed
    .venv/bin/python bench/accuracy.py --set model=tiny --set train-size=400 --rounds 1,2 --seeds 2 \\
        --partitions dirichlet-0.5,natural --eval-size 100 --no-write                # plumbing
"""

from __future__ import annotations

import argparse
import tempfile

import common

from fedtune.config import parse_set
from fedtune.presets import resolve

NAIVE = {"head-init": "random", "head-lr": "2e-3"}
PARTITIONS = ("dirichlet-0.5", "dirichlet-0.1", "natural")


def partition_overrides(name: str, base: dict) -> dict:
    """'dirichlet-0.1' -> Dirichlet(0.1) over labels; 'natural' -> one client per topic group
    (num-clients = the number of groups in the training pool); 'iid'."""
    if name.startswith("dirichlet-"):
        return {"partition": "dirichlet", "dirichlet-alpha": name.removeprefix("dirichlet-")}
    if name == "natural":
        from fedtune.data.partition import train_pool

        cfg = resolve("default", overrides=base)
        return {"partition": "natural", "num-clients": str(len(set(train_pool(cfg.data, cfg.federation.seed).groups)))}
    if name == "iid":
        return {"partition": "iid"}
    raise SystemExit(f"unknown partition {name!r}: use dirichlet-ALPHA, natural or iid")


def train_cells(names: list[str], jobs: int) -> None:
    """Train each cell (PARTITION/SEED-INDEX) in its own process of this same command, ``jobs`` at
    a time; each stores its runs in runs/bench/accuracy.jsonl, which the caller then reads back."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    def one(cell: str) -> int:
        log = common.DOC.parent.parent / "runs" / "bench" / f"accuracy-{cell.replace('/', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, __file__, *sys.argv[1:], "--jobs", "1", "--cell", cell, "--no-write"]
        with log.open("w") as out:
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
        print(f"cell {cell}: exit {rc} (log {log})", flush=True)
        return rc

    with ThreadPoolExecutor(jobs) as pool:
        failed = [cell for cell, rc in zip(names, pool.map(one, names)) if rc]
    if failed:
        print(f"cells that failed (their logs say why; the table reports what finished): {', '.join(failed)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="2000")
    ap.add_argument("--seeds", type=int, default=1, help="run seeds per cell (mean ± 95%% CI)")
    ap.add_argument("--rounds", default="4", help="comma-separated round counts to report (runs go to the largest)")
    ap.add_argument("--partitions", default=",".join(PARTITIONS))
    ap.add_argument("--naive", action="store_true", help="also run naive FedAvg (random head, one lr)")
    ap.add_argument("--recipe", action="append", default=[],
                    help="also run the federation with these comma-separated KEY=VALUE overrides (a row each)")
    ap.add_argument("--loop", choices=("simulation", "plain"), default="simulation",
                    help="simulation: the Flower simulation (Ray); plain: the same federation as the in-process "
                         "plain loop of fedtune/simulations/sequential.py (fedavg / fedavgm, no Ray)")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    ap.add_argument("--stored", action="store_true",
                    help="train nothing: report the runs finished so far (each cell over its finished seeds)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train the (partition, seed) cells in this many processes at once (a GPU is shared by them; "
                         "on CPU each process runs client-cpus threads, so keep jobs x client-cpus <= cores)")
    ap.add_argument("--cell", default="", help=argparse.SUPPRESS)  # PARTITION/I: what one --jobs process trains
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    if args.jobs > 1 and not args.stored:
        train_cells([f"{p}/{i}" for i in range(args.seeds) for p in args.partitions.split(",")], args.jobs)
    report = sorted({int(r) for r in args.rounds.split(",")})
    base = common.on_accelerator({"eval-size": args.eval_size, **parse_set(args.set), "rounds": str(report[-1])})

    from fedtune.device import resolve as resolve_device
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.centralized import centralized
    from fedtune.simulations.sequential import sequential
    from fedtune.simulations.simulate import simulate

    naive = ["naive FedAvg (random head, one lr)"] if args.naive else []
    recipes = {f"fedtune, {r}": dict(kv.split("=", 1) for kv in r.split(",") if kv) for r in args.recipe}
    kinds = ["fedtune defaults", *recipes, *naive, "centralized, same steps"]
    federated = [k for k in kinds if not k.startswith("centralized")]
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}  # (partition, kind) -> {seed: accuracy per round}
    spr: dict[tuple[str, str], list[float]] = {}
    cfg = None
    done = common.Results("accuracy", {**base, "loop": args.loop})  # finished runs survive a stop; a rerun resumes
    for part in args.partitions.split(","):
        for i in range(args.seeds):
            if args.cell and args.cell != f"{part}/{i}":
                continue
            flat = common.seed_overrides({**base, **partition_overrides(part, base)}, i)
            for kind in sorted(kinds, key=lambda k: k not in ("fedtune defaults", "centralized, same steps")):
                cfg = resolve("default", overrides={**flat, **(NAIVE if kind.startswith("naive") else {}),
                                                    **recipes.get(kind, {})})
                key = f"{part}/{cfg.federation.seed}/{kind}"
                if (hit := done.get(key)) is None and args.stored:
                    continue
                print(f"== {part} seed {cfg.federation.seed}: {kind}", flush=True)
                if hit is None:
                    central = kind.startswith("centralized")
                    out = tempfile.mkdtemp(prefix="fedtune-central-" if central else "fedtune-acc-")
                    if central:
                        centralized(cfg, out)
                        spr_run = None
                    elif args.loop == "plain":
                        plain = sequential(cfg, lambda s: print(s, flush=True))
                        spr_run = sum(r["seconds"] for r in plain) / max(len(plain) - 1, 1)
                    else:
                        spr_run = simulate(cfg, out)["seconds_per_round"]
                    rows_run = plain if args.loop == "plain" and not central else RunDir(out).metrics()
                    curve = [r["accuracy"] for r in rows_run]
                    hit = done.put(key, {"accuracy": curve, "spr": spr_run})
                curves.setdefault((part, kind), {})[cfg.federation.seed] = hit["accuracy"]
                if hit["spr"] is not None:
                    spr.setdefault((part, kind), []).append(hit["spr"])
    assert cfg is not None

    header = ["partition", "run", "seeds", "round 0", *[f"round {r}" for r in report], "s/round"]
    rows, gaps = [], []
    parts = args.partitions.split(",")
    for (part, kind), runs in sorted(curves.items(), key=lambda kv: (parts.index(kv[0][0]), kinds.index(kv[0][1]))):
        cells = [common.fmt_ci([acc[r] for acc in runs.values()]) for r in (0, *report)]
        spr_cell = f"{sum(spr[(part, kind)]) / len(spr[(part, kind)]):.1f}" if (part, kind) in spr else "-"
        rows.append([part, kind, len(runs), *cells, spr_cell])
    for part in args.partitions.split(","):
        cen = curves.get((part, "centralized, same steps"), {})
        for kind in federated:
            fed = curves.get((part, kind), {})
            paired = sorted(set(fed) & set(cen))  # same seed: same partition, same data order
            for r in report:
                if paired:
                    gaps.append([part, kind, r, len(paired),
                                 common.fmt_ci([fed[s][r] - cen[s][r] for s in paired], 1, scale=100)])
    cfg = resolve("default", overrides=base)  # the defaults' row: what the header describes
    tr = cfg.train
    body = "\n".join([
        "## Federated accuracy vs the centralized ceiling (`bench/accuracy.py`)",
        "",
        f"Model `{cfg.model.model}` + LoRA r={cfg.model.lora_rank} ({', '.join(cfg.model.target_modules)}), 20 Newsgroups, "
        + (f"{tr.local_epochs:g} local epoch(s)" if tr.local_epochs > 0 else f"{tr.local_steps} local steps")
        + f" x batch {tr.batch_size} per round, max-length {cfg.data.max_length}, "
        f"head-init={tr.head_init}, local-loss={tr.local_loss}; {common.precision(cfg.model)}, on "
        f"{'the GPU' if resolve_device(cfg.model.device).type == 'cuda' else 'CPU'}; "
        + ("federations as the in-process plain loop (fedtune/simulations/sequential.py); " if args.loop == "plain"
           else "federations as Flower simulations; ")
        + "partitions: Dirichlet(alpha) over labels with "
        f"{cfg.partition.num_clients} clients, natural = one client per topic group. "
        f"Accuracy on a fixed {cfg.data.eval_size or 'whole'}-example slice of the test split; "
        f"up to {args.seeds} run seed(s) per cell (column seeds), mean ± 95% Student-t interval. Centralized = the same adapter on the "
        "clients' training rows pooled, with the same number of optimizer steps (equal passes), from the "
        "federation's own round-0 head (built from each client's head sample: round 0 is the same model), "
        "evaluated at each round-equivalent.",
        "",
        common.table(header, rows),
        "",
        "s/round: the federated run's wall time per round as it ran (it depends on what else shared the cores; "
        "time per round on quiet cores is measured in the overhead section).",
        "",
        "Federated minus centralized, in points (paired by seed):",
        "",
        common.table(["partition", "run", "rounds", "seeds", "fed - central (points)"], gaps),
        "",
        f"Command: `.venv/bin/python bench/accuracy.py --seeds {args.seeds} --rounds {args.rounds} "
        f"--partitions {args.partitions} --eval-size {args.eval_size}"
        + "".join(f" --set {s}" for s in args.set) + "".join(f' --recipe "{r}"' for r in args.recipe)
        + (f" --loop {args.loop}" if args.loop != "simulation" else "") + (" --naive" if args.naive else "") + "`"
        + (" (this table: the same command with `--stored`, from the runs finished so far; the command without it "
           "trains the missing ones and resumes after a stop)" if args.stored else ""),
    ])
    if not args.no_write:
        common.write_section("accuracy", body)
    print(body)


if __name__ == "__main__":
    main()
