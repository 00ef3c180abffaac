"""Accuracy against bytes per round: LoRA, LoRA with int8 / DARE compression, sparse adapters
at three densities, and full-model FedAvg (bytes computed, not trained), same data and rounds.

Every run is the default federation (all-MiniLM-L6-v2, 10 Dirichlet(0.5) clients, 6 local
steps) with one change. Each run's directory is kept under runs/bench-communication/seed-S/: a
rerun skips every run already finished there with the same configuration (so the full
benchmark can be run a few runs at a time, and a stop loses only the run it was in); delete a
run's directory to redo it. On a machine with a CUDA device the clients train on it
(``client-gpus`` 0.25 unless ``--set`` says otherwise). ``--runs`` picks which runs to do. With
``--seeds N`` every cell is the mean ± the 95% Student-t interval over run seeds 0..N-1. Writes the section
"communication" of docs/benchmarks.md and docs/bench-communication.png.

    .venv/bin/python bench/communication.py --seeds 3 --eval-size 2000      # the full benchmark, with CIs
    .venv/bin/python bench/communication.py                                  # one seed (4 rounds)
    .venv/bin/python bench/communication.py --set num-clients=5 --set max-length=32 --set head-init-examples=64 \
        --set rounds=2 --eval-size 300                                       # the reduced run in docs/benchmarks.md
    .venv/bin/python bench/communication.py --runs ""                        # rewrite the section from saved runs
    .venv/bin/python bench/communication.py --set model=tiny --set rounds=1 --set train-size=400  # plumbing
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import common

from fedtune.config import parse_set
from fedtune.presets import resolve

OUT = Path(__file__).resolve().parent.parent / "runs" / "bench-communication"
PNG = common.DOC.parent / "bench-communication.png"
RUNS = {
    "lora": {},
    "lora-int8": {"compression": "int8"},
    "lora-dare": {"compression": "dare", "dare-p": "0.5"},
    "sparse-0.1%": {"adapter": "sparse", "sparse-density": "0.001"},
    "sparse-0.5%": {"adapter": "sparse", "sparse-density": "0.005"},
    "sparse-2%": {"adapter": "sparse", "sparse-density": "0.02"},
}
LABELS = {"lora": "LoRA r8 (fp32)", "lora-int8": "LoRA r8 + int8", "lora-dare": "LoRA r8 + DARE p=0.5",
          "sparse-0.1%": "sparse 0.1% (magnitude)", "sparse-0.5%": "sparse 0.5% (magnitude)",
          "sparse-2%": "sparse 2% (magnitude)"}


def per_client_round(rows: list[dict], key: str) -> float:
    """Mean bytes per client per training round (rounds 1..R)."""
    return sum(r[key] / max(1, r["clients"]) for r in rows[1:]) / max(1, len(rows) - 1)


def plot(points: dict[str, tuple[float, float]], full_bytes: float, lora_acc: float) -> None:
    with common.figure(PNG, (7, 4)) as ax:
        for name, (x, acc) in points.items():
            ax.scatter([x], [acc], s=30)
            ax.annotate(LABELS.get(name, name), (x, acc), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axvline(0.0025 * full_bytes, color="grey", linestyle=":", label="0.25% of the full model")
        ax.axhline(lora_acc - 0.01, color="grey", linestyle="--", linewidth=1, label="LoRA - 1 point")
        ax.set_xscale("log")
        ax.set_xlabel("bytes up per client per round")
        ax.set_ylabel("final test accuracy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="500")
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs to do (finished ones are read back)")
    ap.add_argument("--seeds", type=int, default=1, help="run seeds per run (mean ± 95%% CI)")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    base = common.on_accelerator({"eval-size": args.eval_size, **parse_set(args.set)})
    seeds = [int(common.seed_overrides(base, i)["seed"]) for i in range(args.seeds)]

    from fedtune.data import load_dataset
    from fedtune.modeling import build_model, num_parameters
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    where = lambda name, seed: OUT / f"seed-{seed}" / name  # noqa: E731
    for seed in seeds:
        for name in filter(None, args.runs.split(",")):  # --runs "": only read the runs back and write the section
            cfg = resolve("default", overrides={**base, **RUNS[name], "seed": str(seed)})
            print(f"== {name} (seed {seed})", flush=True)
            if (where(name, seed) / "summary.json").exists() and RunDir(where(name, seed)).config() == cfg:
                print("   finished before with this configuration: read back", flush=True)
                continue
            simulate(cfg, where(name, seed))
    done = {n: [s for s in seeds if (where(n, s) / "summary.json").exists()] for n in RUNS}
    done = {n: s for n, s in done.items() if s}
    first = next(iter(done.items()), None)
    cfg = RunDir(where(first[0], first[1][0])).config() if first else resolve("default", overrides=base)
    num_labels = load_dataset(cfg.data).num_labels
    full_bytes = 4.0 * num_parameters(build_model(cfg.model, num_labels))[1]  # fp32, every weight, one way
    rows, points, finals = [], {}, {}
    for name, run_seeds in done.items():
        runs = [RunDir(where(name, s)) for s in run_seeds]
        saved = json.loads((runs[0].path / "config.json").read_text())
        metrics = [run.metrics() for run in runs]
        up = sum(per_client_round(m, "bytes_up") for m in metrics) / len(runs)
        down = sum(per_client_round(m, "bytes_down") for m in metrics) / len(runs)
        finals[name] = dict(zip(run_seeds, (m[-1]["accuracy"] for m in metrics)))
        acc = sum(finals[name].values()) / len(runs)
        points[name] = (up, acc)
        rows.append([LABELS[name], common.fmt_ci([m[-1]["accuracy"] for m in metrics]),
                     common.fmt_ci([m[-1]["loss"] for m in metrics], 4),
                     common.fmt_ci([m[0]["accuracy"] for m in metrics]),
                     f"{up / 1e3:.1f}", f"{100 * up / full_bytes:.3f}%", f"{down / 1e3:.1f}", f"{saved['rounds']}",
                     len(runs)])
    rows.insert(0, ["full-model FedAvg (computed)", "-", "-", "-", f"{full_bytes / 1e3:.0f}", "100%",
                    f"{full_bytes / 1e3:.0f}", "-", "-"])
    lora_acc = points["lora"][1] if "lora" in points else float("nan")
    if not args.no_write:
        plot(points, full_bytes, lora_acc)
    verdict = []
    for name, (up, acc) in points.items():
        if name != "lora" and up <= 0.0025 * full_bytes:
            met = "met" if acc >= lora_acc - 0.01 else "missed"
            paired = common.paired(finals[name], finals.get("lora", {}))
            verdict.append(f"{LABELS[name]}: {100 * up / full_bytes:.3f}% of the full model, "
                           f"{common.fmt_ci(paired, 1)} points vs LoRA (paired by seed; mean: {met})")
    body = "\n".join([
        "## Communication: accuracy against bytes per round (`bench/communication.py`)",
        "",
        f"Model `{cfg.model.model}`, 20 Newsgroups, {cfg.partition.num_clients} "
        f"Dirichlet({cfg.partition.dirichlet_alpha}) "
        f"clients, {cfg.federation.rounds} rounds x {cfg.train.local_steps} local steps, every client every round, "
        f"max-length {cfg.data.max_length}, {common.precision(cfg.model)}, head-init={cfg.train.head_init} from {cfg.train.head_init_examples} "
        "examples per client; "
        f"accuracy on a fixed {cfg.data.eval_size or 'whole'}-example test slice after the last round, "
        f"mean ± 95% Student-t interval over {len(seeds)} run seed(s) "
        "(round 0 = the initial head). "
        "Bytes up = what crossed the wire (encoded messages, headers included), per client and round; down is "
        "what the server sent (sparse runs: the nonzero entries of the global sparse delta, see docs/sparse.md). "
        "Full-model FedAvg is not trained: its bytes are 4 x all parameters.",
        "",
        common.table(["run", "final acc", "final loss", "round 0 acc", "KB up / client / round", "% of full model",
                      "KB down / client / round",
                      "rounds", "seeds"], rows),
        "",
        "Goal: at <= 0.25% of the full model's bytes (up, per client and round), lose <= 1 point against "
        "uncompressed LoRA:",
        "",
        *[f"- {v}" for v in verdict],
        "",
        f"One standard error of an accuracy on {cfg.data.eval_size} test examples is about "
        f"{100 * math.sqrt(lora_acc * (1 - lora_acc) / max(1, cfg.data.eval_size)):.1f} points (all runs share the "
        "slice, so differences are less noisy than that, but a 1-point goal is at the limit of what this run "
        "resolves).",
        "",
        *([] if (cfg.federation.rounds, cfg.partition.num_clients, cfg.data.max_length) == (4, 10, 64) else [
            "This is a reduced run (the machine's 2 cores were shared with other jobs). The full figures: "
            "`.venv/bin/python bench/communication.py` (10 clients, 4 rounds, max-length 64, 500 test examples).", ""]),
        f"Command: `.venv/bin/python bench/communication.py --seeds {args.seeds} --eval-size {args.eval_size}"
        + "".join(f" --set {s}" for s in args.set) + "`",
        "",
        f"![accuracy vs bytes]({PNG.name})",
    ])
    if not args.no_write:
        common.write_section("communication", body)
    print(body)


if __name__ == "__main__":
    main()
