"""LLM benchmark: SmolLM2-135M-Instruct + LoRA on chatterbot dialogs (the ``llm`` preset).

    .venv/bin/python bench/llm.py [--run RUN_DIR] [--central DIR] [--edge DIR] [--threads 1]

Held-out perplexity per round, federated (4 clients, 3 rounds) vs centralized (the same
adapter on the pooled data with the same number of steps); greedy tokens/s of the exported
decoder on onnxruntime with its KV cache vs torch ``generate``; export sizes fp32 / int8.
Existing folders given with --run / --central / --edge are reused (else they are made under
a temporary folder). Prints the figures and rewrites the ``llm`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (environment first)

from fedtune.presets import resolve
from fedtune.server.run_dir import RunDir


def _rows(folder: Path) -> list[dict]:
    return RunDir(folder).metrics()


def ensure_run(folder: Path) -> float | None:
    """The federated run (seconds it took, or None when reused)."""
    if (folder / "summary.json").is_file():
        return None
    from fedtune.simulations.simulate import simulate

    t = time.perf_counter()
    simulate(resolve("llm"), folder)
    return time.perf_counter() - t


def ensure_central(folder: Path) -> None:
    if (folder / "summary.json").is_file() or (folder / "metrics.jsonl").is_file():  # finished, or given as is
        return
    import torch

    from fedtune.simulations.centralized import centralized

    torch.set_num_threads(2)
    centralized(resolve("llm"), folder)


def ensure_edge(run: Path, edge: Path, threads: int) -> dict:
    if (edge / "export_report.json").is_file():
        return json.loads((edge / "export_report.json").read_text())
    from fedtune.edge_export.export_lm import LMExportOptions, export_lm

    return export_lm(run, edge, LMExportOptions(int8=True, threads=threads, timing_tokens=32))


def markdown(fed: list[dict], central: list[dict], report: dict, seconds: float | None, c: dict,
             note: str = "") -> str:
    from common import table

    by_round = {c["round"]: c for c in central}  # a centralized run still going: its finished rounds
    rows = [[f["round"], f["perplexity"], by_round.get(f["round"], {}).get("perplexity", "-"), f["accuracy"],
             by_round.get(f["round"], {}).get("accuracy", "-")] for f in fed]
    ppl = table(["round", "perplexity federated", "perplexity centralized", "answer-token accuracy fed.",
                 "answer-token accuracy central."], rows)
    v, sp, mb = report["verification"], report["tokens_per_second"], report["sizes_mb"]
    missing = "" if len(by_round) >= len(fed) else (
        '\nCentralized "-": a round-equivalent that had not finished when this section was written.')
    speed = table(["engine", "greedy tokens/s", "size (MB)"],
                  [["torch generate (fp32, merged)", sp["torch_generate"], "-"],
                   ["onnxruntime fp32 + KV cache", sp["onnx_fp32_kv"], mb["fp32"]],
                   ["onnxruntime int8 + KV cache", sp.get("onnx_int8_kv", float("nan")), mb.get("int8", "-")]])
    agree = sum(v.get("int8_tokens_equal", [])), len(v.get("int8_tokens_equal", []))
    took = f"{seconds / 60:.1f} min" if seconds else "see the run's metrics.jsonl"
    return f"""## LLM: SmolLM2-135M-Instruct, federated instruction tuning

`fedtune simulate --preset llm`: LoRA r={c['lora-rank']} on q/k/v/o of all 30 layers, English chatterbot
dialogs (answer-only loss), {c['num-clients']} clients with topic skew (Dirichlet {c['dirichlet-alpha']}),
{c['rounds']} rounds x {c['local-steps']} local steps of {c['batch-size']} dialogs, max {c['max-length']} tokens;
held-out perplexity on {c['eval-size']} test dialogs. Centralized: the same adapter and steps on the pooled
data. Federation wall time: {took}{note}.

{ppl}

Export (`fedtune export RUN --int8`): ONNX decoder with past key/values (opset 18); greedy
tokens equal torch `generate` for all {len(v['prompts'])} fixed prompts: {v['tokens_equal']};
cached vs uncached logits max diff {v['cache_vs_nocache_max_abs_diff']:.1e}, ONNX vs torch
{v['onnx_vs_torch_max_abs_diff']:.1e}; int8 greedy tokens equal to fp32 on {agree[0]}/{agree[1]}
prompts. Speed: {sp['tokens']} new tokens after a chat prompt, {sp['threads']} thread(s),
batch 1, timed during the export.{missing}

{speed}

GPU peak memory per profile (bf16/fp16 bases, gradient checkpointing) was not measured:
no GPU was available to this run (the options are tested for plumbing on CPU)."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run")
    ap.add_argument("--central")
    ap.add_argument("--edge")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="appended to the wall time (e.g. the machine's load)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    run = Path(args.run or tmp / "run")
    central = Path(args.central or tmp / "central")
    edge = Path(args.edge or tmp / "edge")
    seconds = ensure_run(run)
    if seconds is None and (run / "summary.json").is_file():
        seconds = json.loads((run / "summary.json").read_text()).get("seconds")
    ensure_central(central)
    report = ensure_edge(run, edge, args.threads)
    config = json.loads((run / "config.json").read_text())
    body = markdown(_rows(run), _rows(central), report, seconds, config, args.note)
    print(body)
    common.write_section("llm", body)
    print(f"bench: wrote the llm section of {common.DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
