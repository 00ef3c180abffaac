"""``fedtune export`` and ``fedtune infer``. Import-light: ``infer`` never loads torch."""

from __future__ import annotations

import argparse
import sys


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


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.edge_export.errors import ExportError
    from fedtune.edge_export.export import ExportOptions, export_fp32, export_fp32_int8
    from fedtune.edge_export.report import format_table

    if args.examples < 1 or args.latency_runs < 1 or args.threads < 1 or not args.max_abs_diff > 0:
        raise ExportError("--examples, --latency-runs, --threads and --max-abs-diff must be positive")
    if _run_task(args.run_dir) == "causal-lm":  # a decoder with a KV cache (fedtune/edge_export/export_lm.py)
        return _export_lm(args)
    options = ExportOptions(
        examples=args.examples, max_abs_diff=args.max_abs_diff, latency_runs=args.latency_runs, threads=args.threads
    )
    export = export_fp32_int8 if args.int8 else export_fp32
    what = args.run_dir if args.client is None else f"{args.run_dir} (client {args.client})"
    what = what if args.profile is None else f"{args.run_dir} (profile {args.profile})"
    print(f"fedtune: exporting {what} -> {args.out}, verifying on {args.examples} examples", file=sys.stderr)
    report = export(args.run_dir, args.out, options, client=args.client, profile=args.profile)
    print(format_table(report))
    print(f"export written to {args.out}")
    return 0


def _run_task(run_dir: str) -> str:
    import json
    from pathlib import Path

    try:
        return str(json.loads((Path(run_dir) / "config.json").read_text()).get("task", "classify"))
    except (OSError, ValueError):
        return "classify"  # the classifier export reports what is missing


def _export_lm(args: argparse.Namespace) -> int:
    from fedtune.edge_export.errors import ExportError
    from fedtune.edge_export.export_lm import LMExportOptions, export_lm, format_lm_table

    if args.client is not None or args.profile is not None:
        raise ExportError(f"--{'client' if args.client is not None else 'profile'}: an LLM run exports its global "
                          "model only")
    options = LMExportOptions(max_abs_diff=args.max_abs_diff, int8=args.int8, threads=args.threads)
    print(f"fedtune: exporting LLM {args.run_dir} -> {args.out} (decoder with KV cache), verifying greedy tokens",
          file=sys.stderr)
    print(format_lm_table(export_lm(args.run_dir, args.out, options)))
    print(f"export written to {args.out}")
    return 0


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
