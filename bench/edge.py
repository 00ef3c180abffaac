"""Edge export benchmark: size, parity, accuracy and latency of MiniLM in torch vs onnxruntime.

    .venv/bin/python bench/edge.py [--run RUN_DIR] [--examples 1000] [--latency-runs 100] [--threads 1]

Without --run it first trains a demo run (MiniLM + LoRA, 60 centralized steps, about a
minute). All engines are timed in the same process on the same inputs, interleaved, so the
onnxruntime/torch ratio holds even on a busy machine. Prints the table and rewrites the
``## Edge export`` section of docs/benchmarks.md (between its edge markers, nothing else).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (environment first)

from fedtune.edge_export.export import ExportOptions, export_fp32_int8
from fedtune.edge_export.report import ENGINES, format_table

GOAL_SPEED, GOAL_SIZE = 0.5, 0.30


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def demo_run(folder: Path) -> Path:
    import torch

    from fedtune.edge_export.demo_run import train_demo_run
    from fedtune.presets import resolve

    print("bench: training a demo MiniLM run (60 steps)...", file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    return train_demo_run(resolve("default", None, {"eval-size": 200}), folder / "run", steps=60).path


def markdown(report: dict, run_label: str) -> str:
    ver, lat, sizes, r = report["verification"], report["latency"], report["sizes_mb"], report["ratios"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [
        "| engine | size (MB) | max abs logit diff vs torch | argmax agreement | accuracy "
        "| batch 1 p50 / p95 (ms) | batch 8 p50 / p95 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in ENGINES.items():
        v, b1, b8 = ver[key], lat["batch_1"][key], lat["batch_8"][key]
        size = f"{sizes[key]:.1f}" if key in sizes else "-"
        rows.append(
            f"| {name} | {size} | {v['max_abs_diff']:.1e} | {v['argmax_agreement']:.3f} | {v['accuracy']:.3f} "
            f"| {b1['p50_ms']:.1f} / {b1['p95_ms']:.1f} | {b8['p50_ms']:.1f} / {b8['p95_ms']:.1f} |"
        )
    speed, size = r["fp32_vs_torch_p50_batch_1"], r["int8_vs_fp32_size"]
    drop = 100 * (ver["reference_accuracy"] - ver["int8"]["accuracy"])
    return "\n".join([
        "## Edge export",
        "",
        f"`python bench/edge.py`: all-MiniLM-L6-v2 + merged LoRA, 20 Newsgroups, "
        f"max-length {report['max_length']}, opset {report['opset']}; run: {run_label}. "
        f"{cpu_name()}, {os.cpu_count()} cores (shared; 1-min load {load:.1f} at the end), "
        f"{lat['threads']} intra-op thread(s) for every engine; {ver['examples']} held-out test examples; "
        f"{lat['runs']} timed runs per batch size, engines interleaved on the same inputs "
        "(real test texts truncated to max-length; tokenization not timed).",
        "",
        *rows,
        "",
        f"- onnxruntime fp32 p50 at batch 1: **{speed:.2f}x** torch eager "
        f"(goal <= {GOAL_SPEED}x: {'met' if speed <= GOAL_SPEED else 'missed'}); "
        f"at batch 8: {r['fp32_vs_torch_p50_batch_8']:.2f}x.",
        f"- int8 file: **{size:.0%}** of fp32 (goal <= {GOAL_SIZE:.0%}: {'met' if size <= GOAL_SIZE else 'missed'}); "
        f"int8 p50 at batch 1: {r['int8_vs_torch_p50_batch_1']:.2f}x torch; "
        f"int8 accuracy {ver['int8']['accuracy']:.3f} vs torch {ver['reference_accuracy']:.3f}: "
        f"drop {drop:.1f} points (goal <= 1: {'met' if drop <= 1 else 'missed'}; negative = int8 better).",
        "- Logit differences are against the torch model with the adapter unmerged (what the run evaluated); "
        "the torch eager row is the merged model used for timing.",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory to export (default: train a demo MiniLM run)")
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--latency-runs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtune-edge-bench-") as tmp:
        run = Path(args.run) if args.run else demo_run(Path(tmp))
        options = ExportOptions(examples=args.examples, latency_runs=args.latency_runs, threads=args.threads)
        report = export_fp32_int8(run, Path(tmp) / "edge", options)
    print(format_table(report))
    label = f"`{args.run}`" if args.run else "demo run (60 centralized steps)"
    common.write_section("edge", markdown(report, label))
    print(f"bench: updated {common.DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
