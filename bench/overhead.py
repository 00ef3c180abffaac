"""Flower's simulation runtime against a plain loop doing the same work, in one run.

Both run the same federation (same clients, local steps, seeds, aggregation and evaluation);
the loop has no Flower, no Ray, no messages. Reports wall time per round and the ratio, and
the bytes per round against the full model's. Goal: ratio <= 1.15, bytes <= 1% of the model.

    .venv/bin/python bench/overhead.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import common  # noqa: F401  (environment first)

from fedtune.config import parse_set
from fedtune.presets import resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    # client-side evaluation off: the plain loop has none, so both do exactly the same work
    cfg = resolve(args.preset, overrides={"rounds": "3", "fraction-evaluate": "0", **parse_set(args.set)})

    from fedtune.simulations.sequential import sequential
    from fedtune.simulations.simulate import simulate

    out = tempfile.mkdtemp(prefix="fedtune-overhead-")
    t = time.perf_counter()
    summary = simulate(cfg, out, progress=lambda row: print(f"  flower round {row['round']}: {row['seconds']:.1f} s", flush=True))
    flower_total = time.perf_counter() - t
    from fedtune.server.run_dir import RunDir

    fl_rows = RunDir(out).metrics()
    t = time.perf_counter()
    plain_rows = sequential(cfg, progress=lambda s: print("  plain " + s, flush=True))
    plain_total = time.perf_counter() - t

    fl = statistics.mean(r["seconds"] for r in fl_rows[1:])
    plain = statistics.mean(r["seconds"] for r in plain_rows[1:])
    ratio = fl / plain
    full_bytes = 4 * summary["total_parameters"]
    up_per_client = statistics.mean(r["bytes_up"] / max(1, r["clients"]) for r in fl_rows[1:])
    frac = up_per_client / full_bytes
    print(f"flower {fl:.1f} s/round, plain loop {plain:.1f} s/round, ratio {ratio:.3f} (goal <= 1.15)")
    print(f"bytes up per client per round {up_per_client / 1e6:.3f} MB = {100 * frac:.2f}% of the full model (goal <= 1%)")
    body = "\n".join([
        "## Runtime overhead (`bench/overhead.py`)",
        "",
        f"Model `{cfg.model.model}`, {cfg.partition.num_clients} clients, {cfg.train.local_steps} local steps of "
        f"{cfg.train.batch_size}, {cfg.federation.rounds} rounds; same work in both, measured in one run.",
        "",
        common.table(
            ["runtime", "s/round (rounds 1..N)", "whole run incl. start-up (s)"],
            [["fedtune on Flower simulation (Ray)", round(fl, 1), round(flower_total, 1)],
             ["plain sequential loop, no Flower", round(plain, 1), round(plain_total, 1)]],
        ),
        "",
        f"**Ratio Flower / plain: {ratio:.3f}** (goal <= 1.15). Start-up (Ray, actors, model and data per "
        "process) is outside the per-round figure and shown in the last column.",
        "",
        f"**Bytes up per client per round: {up_per_client / 1e6:.3f} MB = {100 * frac:.2f}% of the full model** "
        f"({full_bytes / 1e6:.1f} MB fp32; goal <= 1%). Down is the same adapter plus the run config string.",
    ])
    common.write_section("overhead", body)
    print(f"written to {common.DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
