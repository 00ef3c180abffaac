"""fedtune's round against a plain Flower + peft app and a plain loop doing the same work, in one run.

Three runtimes on the same federation (same clients, local steps, batches, FedAvg, server
evaluation), one after the other in this process:

- fedtune on Flower's simulation runtime (``fedtune simulate``), once per ``cpu-autocast``
  value when the config has that key (bf16 autocast of the frozen base on CPU), else once;
- the plain Flower Message-API FedAvg app with peft of ``bench/plain_flower.py`` (Flower's
  own FedAvg, a plain training loop; the reference of issue 14: goal fedtune <= 0.8x its
  time per round on a CPU with AMX/AVX512-BF16);
- the plain sequential loop without Flower (``fedtune.simulations.sequential``): what the
  runtime itself costs (goal: fedtune / loop <= 1.15).

Prints seconds per round side by side and the ratios; writes the "overhead" section of
docs/benchmarks.md (``--no-write``: print only).

    .venv/bin/python bench/overhead.py [--preset default] [--set key=value ...] [--no-write] [--no-loop]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (environment first)

BENCH = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (BENCH, os.environ.get("PYTHONPATH", "")) if p)  # Ray workers import plain_flower

from fedtune.config import FIELDS, parse_set  # noqa: E402
from fedtune.errors import ConfigError  # noqa: E402
from fedtune.presets import resolve  # noqa: E402

AUTOCAST = "cpu-autocast"


def cpu() -> str:
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), name)
        flags = ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in text.split())
    except OSError:
        pass
    return f"{name} ({flags or 'no bf16 instructions'})"


def mean_round(rows: list[dict]) -> float:
    """Mean seconds of rounds 2..N: round 1 of the plain app also builds each actor's model
    (fedtune builds it in round 0, for the FedNCM head), so it is left out for all."""
    last = max(r["round"] for r in rows)
    return statistics.mean(r["seconds"] for r in rows if r["round"] >= min(2, last))


def fedtune_rows(cfg) -> tuple[list[dict], dict, float]:
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    out = tempfile.mkdtemp(prefix="fedtune-overhead-")
    t = time.perf_counter()
    summary = simulate(cfg, out, progress=lambda row: print(f"  fedtune round {row['round']}: {row['seconds']:.1f} s",
                                                             flush=True))
    return RunDir(out).metrics(), summary, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--no-loop", action="store_true", help="skip the plain sequential loop")
    args = ap.parse_args()
    # client-side evaluation off: the plain app and loop have none, so all do exactly the same work
    base = {"rounds": "3", "fraction-evaluate": "0", **parse_set(args.set)}
    variants: dict[str, dict[str, str]] = {"": {}}
    if AUTOCAST in base:
        variants = {f"{AUTOCAST}={base[AUTOCAST]}": {}}
    elif AUTOCAST in FIELDS:
        variants = {f"{AUTOCAST}={v}": {AUTOCAST: v} for v in ("off", "on")}
    else:
        print(f"note: this fedtune has no {AUTOCAST!r} key; fedtune runs once, without it", flush=True)
    cfgs = {}
    for name, extra in variants.items():
        try:
            cfgs[name] = resolve(args.preset, overrides={**base, **extra})
        except ConfigError as exc:  # e.g. a key that takes auto|off, not on
            if extra.get(AUTOCAST) != "on":
                raise
            print(f"note: {exc}; using {AUTOCAST}=auto", flush=True)
            cfgs[f"{AUTOCAST}=auto"] = resolve(args.preset, overrides={**base, AUTOCAST: "auto"})
    plain_cfg = resolve(args.preset, overrides={**base, **({AUTOCAST: "off"} if AUTOCAST in FIELDS else {})})

    runs: dict[str, list[dict]] = {}
    totals: dict[str, float] = {}
    summary: dict = {}
    for name, cfg in cfgs.items():
        print(f"fedtune {name}".rstrip(), flush=True)
        runs[f"fedtune {name}".rstrip()], summary, totals[f"fedtune {name}".rstrip()] = fedtune_rows(cfg)
    import plain_flower

    print("plain Flower + peft app", flush=True)
    t = time.perf_counter()
    runs["plain Flower + peft"] = plain_flower.run(plain_cfg)
    totals["plain Flower + peft"] = time.perf_counter() - t
    if not args.no_loop:
        from fedtune.simulations.sequential import sequential

        t = time.perf_counter()
        runs["plain loop, no Flower"] = sequential(plain_cfg, progress=lambda s: print("  loop " + s, flush=True))
        totals["plain loop, no Flower"] = time.perf_counter() - t

    names = list(runs)
    rounds = sorted({r["round"] for rows in runs.values() for r in rows if r["round"] >= 1})
    by_round = {n: {r["round"]: r for r in rows} for n, rows in runs.items()}
    header = ["round", *[f"{n} s" for n in names]]
    table = [[k, *[round(by_round[n][k]["seconds"], 2) if k in by_round[n] else "-" for n in names]] for k in rounds]
    means = {n: mean_round(runs[n]) for n in names}
    plain = means["plain Flower + peft"]
    print("  ".join(f"{h:>24}" for h in header))
    for row in table:
        print("  ".join(f"{v!s:>24}" for v in row))
    lines = []
    for n in names:
        final = runs[n][-1]["accuracy"]
        lines.append(f"{n}: {means[n]:.2f} s/round = {means[n] / plain:.2f}x the plain Flower app; "
                     f"final accuracy {final:.4f}; whole run {totals[n]:.1f} s")
        print(lines[-1], flush=True)
    if args.no_write:
        return
    full_bytes = 4 * summary["total_parameters"]
    fl_rows = runs[names[0]]
    up = statistics.mean(r["bytes_up"] / max(1, r["clients"]) for r in fl_rows if r["round"] >= 1)
    cfg = plain_cfg
    body = "\n".join([
        "## Runtime overhead (`bench/overhead.py`)",
        "",
        f"Model `{cfg.model.model}`, {cfg.partition.num_clients} clients, {cfg.train.local_steps} local steps of "
        f"{cfg.train.batch_size}, max-length {cfg.data.max_length}, {cfg.federation.rounds} rounds, server "
        f"evaluation on {cfg.data.eval_size}; the same work in every runtime, one after the other in one run "
        f"(`--preset {args.preset} {' '.join('--set ' + s for s in args.set)}`). CPU: {cpu()}, "
        f"load average (1 min) at the end {os.getloadavg()[0]:.1f}.",
        "",
        common.table(header, table),
        "",
        "| runtime | s/round | vs plain Flower + peft | final accuracy | whole run incl. start-up (s) |",
        "|---|---|---|---|---|",
        *[f"| {n} | {means[n]:.2f} | {means[n] / plain:.2f}x | {runs[n][-1]['accuracy']:.4f} | {totals[n]:.1f} |"
          for n in names],
        "",
        "s/round: the mean of rounds 2..N (round 1 of the plain app includes building each actor's model). "
        "The plain app (`bench/plain_flower.py`) starts from a random head (no FedNCM); start-up (Ray, actors, "
        "model and data per process) is outside the per-round figures.",
        "",
        f"**Bytes up per client per round: {up / 1e6:.3f} MB = {100 * up / full_bytes:.2f}% of the full model** "
        f"({full_bytes / 1e6:.1f} MB fp32; goal <= 1%).",
    ])
    common.write_section("overhead", body)
    print(f"written to {common.DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
