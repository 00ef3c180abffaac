"""``fedtune export``: merge the run's adapter, export to ONNX, verify, time, write the folder."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.edge_export import latency, verify
from fedtune.edge_export.assets import write_labels, write_tokenizer
from fedtune.edge_export.errors import ExportError, ParityError
from fedtune.edge_export.folder import check_destination, staging
from fedtune.edge_export.layout import MODEL_FP32, MODEL_INT8, REPORT, TOKENIZER
from fedtune.edge_export.merge import LogitsOnly, load_client, load_profile, load_run, merge
from fedtune.edge_export.onnx_io import OPSET, export_onnx, quantize_int8
from fedtune.edge_export.report import metadata, ratios
from fedtune.edge_export.runtime import encode, open_session, read_tokenizer

FILES = {"fp32": MODEL_FP32, "int8": MODEL_INT8}


@dataclass(frozen=True)
class ExportOptions:
    examples: int = 256  # held-out test examples for parity and accuracy
    batch_size: int = 8  # verification batch size (batches are padded: masks are exercised)
    # fp32 ONNX vs torch logits, relative: beyond max_abs_diff x max(1, largest |logit|) the export fails
    max_abs_diff: float = 1e-4
    latency_runs: int = 50  # timed runs per batch size and engine
    warmup: int = 5
    threads: int = 1  # intra-op threads for torch and onnxruntime alike


def export_fp32(
    run_dir: str | Path, out: str | Path, options: ExportOptions = ExportOptions(), client: int | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """model.onnx + tokenizer + labels + export_report.json in ``out``; returns the report.
    The run's global model; with ``client`` that client's personalised model (FedSA); with
    ``profile`` the model a client of that profile runs (both: the run's views)."""
    return _export(Path(run_dir), Path(out), options, ("fp32",), client, profile)


def export_fp32_int8(
    run_dir: str | Path, out: str | Path, options: ExportOptions = ExportOptions(), client: int | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """As :func:`export_fp32`, plus a dynamically quantized model.int8.onnx."""
    return _export(Path(run_dir), Path(out), options, ("fp32", "int8"), client, profile)


def load_for_export(run_dir: Path, client: int | None = None, profile: str | None = None):
    """The model to export: the global one, a client's or a profile's (fedtune.edge_export.merge)."""
    if client is not None and profile is not None:
        raise ExportError("--client and --profile: give one of them")
    if client is not None:
        return load_client(run_dir, client)
    return load_run(run_dir) if profile is None else load_profile(run_dir, profile)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _export(
    run_dir: Path, out: Path, options: ExportOptions, variants: tuple[str, ...], client: int | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    check_destination(out)  # fail before minutes of work, not after
    run = load_for_export(run_dir, client, profile)
    texts, gold = verify.sample_texts(run.cfg, options.examples)
    with torch_threads(options.threads), staging(out) as tmp:
        write_tokenizer(run.cfg.model.model, run.cfg.data.max_length, tmp)
        write_labels(run.labels, tmp)
        tok = read_tokenizer(tmp / TOKENIZER)
        batches = verify.encode_batches(tok, texts, options.batch_size)
        reference = verify.logits(verify.torch_runner(LogitsOnly(run.model)), batches)  # adapter not merged
        merged = merge(run.model, run.cfg.model.adapter)
        _write_models(merged, tmp, variants)
        engines = {"torch": verify.torch_runner(merged)}
        engines.update({v: verify.ort_runner(open_session(tmp / FILES[v], options.threads)) for v in variants})
        checks = {k: verify.compare(reference, verify.logits(e, batches), gold) for k, e in engines.items()}
        _check_parity(checks["fp32"], options, len(texts))
        checks = {"examples": len(texts), "reference_accuracy": verify.accuracy(reference, gold), **checks}
        timing = {f"batch_{b}": _time(engines, tok, texts, b, options) for b in (1, 8)}
        sizes = {v: (tmp / FILES[v]).stat().st_size for v in variants}
        report = {**metadata(run_dir, run.cfg, run.labels, OPSET), "exported": run.source,
                  **_results(options, checks, timing, sizes)}
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _write_models(merged: LogitsOnly, folder: Path, variants: tuple[str, ...]) -> None:
    export_onnx(merged, folder / MODEL_FP32)
    if "int8" in variants:
        quantize_int8(folder / MODEL_FP32, folder / MODEL_INT8)


def _results(options: ExportOptions, checks: dict, timing: dict, sizes: dict[str, int]) -> dict[str, Any]:
    return {
        "files": {v: FILES[v] for v in sizes},
        "options": asdict(options),
        "verification": {"reference": "torch, adapter not merged (what the run evaluated)", **checks},
        "sizes_bytes": sizes,
        "sizes_mb": {k: v / 1e6 for k, v in sizes.items()},
        "latency": {
            "threads": options.threads, "runs": options.latency_runs, "warmup": options.warmup,
            "inputs": "held-out test texts truncated to max-length; tokenization not timed", **timing,
        },
        "ratios": ratios(timing, sizes),
    }


def _time(engines: dict, tok, texts: list[str], batch: int, options: ExportOptions) -> dict[str, dict[str, float]]:
    feeds = latency.latency_feeds(lambda t: encode(tok, t), texts, batch, options.latency_runs)
    return latency.measure(engines, feeds, options.warmup)


def _check_parity(fp32: dict[str, float], options: ExportOptions, n: int) -> None:
    """fp32 round-off is relative to the logits' size (a FedNCM head's logits can reach
    hundreds): the bound is ``max_abs_diff`` x max(1, the largest |logit|) (docs/edge.md)."""
    scale = fp32["logit_scale"]
    if not verify.within_tolerance(fp32["max_abs_diff"], scale, options.max_abs_diff):  # also catches NaN
        raise ParityError(
            f"ONNX fp32 logits differ from torch by up to {fp32['max_abs_diff']:.2e} "
            f"(> {options.max_abs_diff:.0e} x {scale:.1f}, the largest |logit|) on {n} test examples; nothing was written"
        )
