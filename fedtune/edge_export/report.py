"""The export report: a JSON document and the short table printed after an export."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.config import RunConfig

ENGINES = {"torch": "torch eager", "fp32": "onnx fp32", "int8": "onnx int8"}


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """One row per engine: size, parity vs torch, accuracy, latency at batch 1 and 8."""
    ver, lat, sizes = report["verification"], report["latency"], report["sizes_mb"]
    head = f"{'engine':<12}{'size MB':>9}{'max|dlogit|':>13}{'agree':>7}{'acc':>7}"
    head += f"{'b1 p50/p95 ms':>17}{'b8 p50/p95 ms':>17}"
    lines = [head, "-" * len(head)]
    for key, name in ENGINES.items():
        if key not in ver:
            continue
        v = ver[key]
        b1, b8 = lat["batch_1"][key], lat["batch_8"][key]
        lines.append(
            f"{name:<12}{_num(sizes.get(key), '.1f'):>9}{_num(v.get('max_abs_diff'), '.1e'):>13}"
            f"{_num(v.get('argmax_agreement'), '.3f'):>7}{v['accuracy']:>7.3f}"
            f"{b1['p50_ms']:>9.1f} /{b1['p95_ms']:>6.1f}{b8['p50_ms']:>9.1f} /{b8['p95_ms']:>6.1f}"
        )
    r = report["ratios"]
    lines.append(
        f"{ver['examples']} test examples, {lat['runs']} timed runs per batch size, {lat['threads']} thread(s); "
        f"onnx fp32/torch p50 at batch 1: {r['fp32_vs_torch_p50_batch_1']:.2f}x"
        + (f"; int8 size {r['int8_vs_fp32_size']:.0%} of fp32" if "int8_vs_fp32_size" in r else "")
    )
    return "\n".join(lines)


def ratios(latency: dict[str, Any], sizes: dict[str, int]) -> dict[str, float]:
    out = {}
    for b in ("batch_1", "batch_8"):
        for k in ("fp32", "int8"):
            if k in latency[b]:
                out[f"{k}_vs_torch_p50_{b}"] = latency[b][k]["p50_ms"] / latency[b]["torch"]["p50_ms"]
    if "int8" in sizes:
        out["int8_vs_fp32_size"] = sizes["int8"] / sizes["fp32"]
    return out


def metadata(run_dir: Path, cfg: RunConfig, labels: list[str], opset: int) -> dict[str, Any]:
    """What was exported, from where, with which library versions."""
    from fedtune.version import installed

    return {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()),
        "model": cfg.model.model,
        "num_labels": len(labels),
        "max_length": cfg.data.max_length,
        "opset": opset,
        "versions": {p: installed(p) for p in ("fedtune", "torch", "transformers", "peft", "onnx", "onnxruntime")},
    }
