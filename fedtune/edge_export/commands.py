"""``fedtune export`` and ``fedtune infer``. Import-light: ``infer`` never loads torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from fedtune.edge_export.layout import MODEL_INT8

    p = sub.add_parser("export", help="merge a run's adapter and export it to ONNX for onnxruntime, verified")
    p.add_argument("run_dir", help="a finished run directory (with adapter/)")
    p.add_argument("--out", required=True, help="export folder to write (replaced if it is a previous export)")
    p.add_argument("--int8", action="store_true", help=f"also write a dynamically quantized {MODEL_INT8}")
    p.add_argument("--client", type=int, default=None, metavar="ID",
                   help="export client ID's personalised model (fedsa: global A + its own B) instead of the global one")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="export the model a client of profile NAME runs (its rank and layers) instead of the global one")
    p.add_argument("--examples", type=int, default=256, help="held-out test examples to verify on (default 256)")
    p.add_argument("--max-abs-diff", type=float, default=1e-4, help="fp32 parity tolerance on logits, relative: |dlogit| <= F x max(1, largest |logit|) "
                   "(default 1e-4)")
    p.add_argument("--latency-runs", type=int, default=50, help="timed runs per batch size and engine (default 50)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime (default 1)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "infer",
        help="classify texts with an export folder (onnxruntime only, no torch)",
        epilog="options go before the folder or after the texts: fedtune infer --int8 DIR 'text' ...",
    )
    p.add_argument("folder", help="a folder written by 'fedtune export'")
    p.add_argument("texts", nargs="*", help="texts to classify; '-' reads one text per line from stdin")
    p.add_argument("--generate", metavar="PROMPT", help="an LLM export: answer PROMPT (greedy, KV cache)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="with --generate (default 64)")
    p.add_argument("--int8", action="store_true", help=f"use {MODEL_INT8}")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.set_defaults(func=cmd_infer)


def export_run(run_dir: str | Path, out: str | Path, *, int8: bool = False, client: int | None = None,
               profile: str | None = None, examples: int = 256, latency_runs: int = 50, threads: int = 1,
               max_abs_diff: float | None = None) -> dict[str, Any]:
    """Export a run, verified: a classifier to ONNX (``client``/``profile``: that view), an LLM
    run to a decoder with a KV cache (fedtune/edge_export/export_lm.py). Returns the report;
    ``fedtune export`` and ``fedtune.export`` both go through here."""
    from fedtune.edge_export.errors import ExportError

    _check_positive(examples, latency_runs, threads, max_abs_diff)
    tol = {} if max_abs_diff is None else {"max_abs_diff": max_abs_diff}
    if _run_task(run_dir) == "causal-lm":
        from fedtune.edge_export.export_lm import LMExportOptions, export_lm

        if client is not None or profile is not None:
            raise ExportError(f"--{'client' if client is not None else 'profile'}: an LLM run exports its global "
                              "model only")
        return export_lm(run_dir, out, LMExportOptions(int8=int8, threads=threads, **tol))
    from fedtune.edge_export.export import ExportOptions, export_fp32, export_fp32_int8

    options = ExportOptions(examples=examples, latency_runs=latency_runs, threads=threads, **tol)
    return (export_fp32_int8 if int8 else export_fp32)(run_dir, out, options, client=client, profile=profile)


def _check_positive(examples: int, latency_runs: int, threads: int, max_abs_diff: float | None) -> None:
    from fedtune.edge_export.errors import ExportError

    if examples < 1 or latency_runs < 1 or threads < 1 or not (max_abs_diff is None or max_abs_diff > 0):
        raise ExportError("--examples, --latency-runs, --threads and --max-abs-diff must be positive")


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.edge_export.report import format_table

    _check_positive(args.examples, args.latency_runs, args.threads, args.max_abs_diff)  # before the first line
    lm = _run_task(args.run_dir) == "causal-lm"
    what = args.run_dir if args.client is None else f"{args.run_dir} (client {args.client})"
    what = what if args.profile is None else f"{args.run_dir} (profile {args.profile})"
    print(f"fedtune: exporting LLM {args.run_dir} -> {args.out} (decoder with KV cache), verifying greedy tokens"
          if lm else f"fedtune: exporting {what} -> {args.out}, verifying on {args.examples} examples", file=sys.stderr)
    report = export_run(args.run_dir, args.out, int8=args.int8, client=args.client, profile=args.profile,
                        examples=args.examples, latency_runs=args.latency_runs, threads=args.threads,
                        max_abs_diff=args.max_abs_diff)
    if lm:
        from fedtune.edge_export.export_lm import format_lm_table

        print(format_lm_table(report))
    else:
        print(format_table(report))
    print(f"export written to {args.out}")
    return 0


def _run_task(run_dir: str | Path) -> str:
    import json

    try:
        return str(json.loads((Path(run_dir) / "config.json").read_text()).get("task", "classify"))
    except (OSError, ValueError):
        return "classify"  # the classifier export reports what is missing


def _generate(args: argparse.Namespace) -> int:
    from fedtune.edge_export.generator import EdgeGenerator

    load = EdgeGenerator.int8 if args.int8 else EdgeGenerator
    print(load(args.folder, threads=args.threads).generate(args.generate, args.max_new_tokens))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from fedtune.edge_export.runtime import EdgeClassifier

    if args.generate is not None:
        return _generate(args)

    texts = sys.stdin.read().splitlines() if args.texts == ["-"] else args.texts
    load = EdgeClassifier.int8 if args.int8 else EdgeClassifier
    clf = load(args.folder, threads=args.threads)
    for text, (label, prob) in zip(texts, clf.predict(texts)):
        snippet = " ".join(text.split())
        print(f"{label}\t{prob:.4f}\t{snippet[:60] + ('...' if len(snippet) > 60 else '')}")
    return 0
