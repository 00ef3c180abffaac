"""``fedtune export`` of a causal-LM run: merged adapter -> ONNX decoder with a KV cache,
verified against torch (greedy tokens for the fixed prompts equal torch's ``generate``;
cached vs uncached logits within tolerance), optional int8, written atomically."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.edge_export.decoder import cache_shape, export_decoder
from fedtune.edge_export.errors import ExportError, ParityError
from fedtune.edge_export.export import torch_threads
from fedtune.edge_export.folder import check_destination, staging
from fedtune.edge_export.generator import GENERATION, EdgeGenerator
from fedtune.edge_export.layout import MODEL_FP32, MODEL_INT8, REPORT, TOKENIZER
from fedtune.edge_export.onnx_io import OPSET, quantize_int8
from fedtune.edge_export.report import metadata

PLACEHOLDER = "\x00PROMPT\x00"


@dataclass(frozen=True)
class LMExportOptions:
    new_tokens: int = 20  # greedy tokens compared per fixed prompt
    max_abs_diff: float = 1e-4  # cached vs uncached ONNX logits, relative to max(1, the largest |logit|)
    int8: bool = False
    threads: int = 1
    timing_tokens: int = 32  # tokens/s measurement (ORT with cache vs torch generate)


def load_lm(run_dir: Path):
    """The run's global causal LM (fp32 base, adapter not merged) and its config."""
    from safetensors.torch import load_file

    from fedtune.adapter_kinds import kind_of
    from fedtune.adapters import set_base
    from fedtune.edge_export.merge import _base_deltas, _run_files, for_export
    from fedtune.modeling import build_model
    from fedtune.profiles import server_model
    from fedtune.artifacts import RunDir

    weights, labels_file = _run_files(run_dir)
    cfg = RunDir(run_dir).config()
    mcfg = for_export(server_model(cfg))  # the full-precision base on the CPU
    model = build_model(mcfg, len(json.loads(labels_file.read_text())), seed=cfg.federation.seed)
    try:
        kind_of(mcfg.adapter).load_saved(model, load_file(str(weights)))
        set_base(model, _base_deltas(run_dir))
    except Exception as exc:
        raise ExportError(f"the adapter in {run_dir} does not fit its base model: {str(exc).splitlines()[0]}") from None
    return cfg, model.eval()


def write_assets(model_name: str, config, folder: Path) -> None:
    """tokenizer.json (no truncation, no padding) and generation.json (template, eos, cache)."""
    from fedtune.llm.data import messages, render
    from fedtune.modeling import load_tokenizer

    hf = load_tokenizer(model_name)
    hf.save_pretrained(str(folder))
    if not (folder / TOKENIZER).is_file():
        raise ExportError(f"the tokenizer of {model_name!r} has no {TOKENIZER}: the edge runtime needs a fast one")
    text = render(hf, messages([PLACEHOLDER]), True)
    prefix, _, suffix = text.partition(PLACEHOLDER)
    eos = {hf.eos_token_id, *([config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id or [])}
    layers, kv, head_dim = cache_shape(config)
    spec = {"prefix": prefix, "suffix": suffix, "eos_token_ids": sorted(int(e) for e in eos if e is not None),
            "layers": layers, "kv_heads": kv, "head_dim": head_dim, "vocab_size": config.vocab_size}
    (folder / GENERATION).write_text(json.dumps(spec, indent=1), encoding="utf-8")


@torch.inference_mode()
def torch_greedy(model, ids: list[int], n: int, eos: list[int]) -> tuple[list[int], float]:
    """torch ``generate`` (greedy, its own KV cache): new tokens and tokens/s."""
    x = torch.tensor([ids])
    t = time.perf_counter()
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, len(ids):].tolist()
    return new, len(new) / (time.perf_counter() - t)


def verify(merged, gen: EdgeGenerator, prompts: tuple[str, ...], options: LMExportOptions) -> dict[str, Any]:
    """Per prompt: ORT greedy tokens (KV cache) vs torch generate; cache vs no-cache logits;
    ONNX vs torch logits on the whole sequence."""
    eos = sorted(gen.eos)
    rows, worst_cache, worst_torch, scale = [], 0.0, 0.0, 1.0
    for prompt in prompts:
        ids = gen.prompt_ids(prompt)
        ref, _ = torch_greedy(merged, ids, options.new_tokens, eos)
        got, cached = gen.generate_ids(ids, options.new_tokens)
        full = ids + got
        uncached = gen.logits(full)[len(ids) - 1 : len(full) - 1]  # [N, V]: the rows the tokens were chosen from
        with torch.inference_mode():
            tl = merged(input_ids=torch.tensor([full])).logits[0, len(ids) - 1 : len(full) - 1].numpy()
        d_cache, d_torch = float(np.abs(cached - uncached).max()), float(np.abs(cached - tl).max())
        worst_cache, worst_torch = max(worst_cache, d_cache), max(worst_torch, d_torch)
        scale = max(scale, float(np.abs(uncached).max()))
        rows.append({"prompt": prompt, "torch": ref, "onnx": got, "equal": ref == got,
                     "cache_vs_nocache_max_abs_diff": d_cache, "onnx_vs_torch_max_abs_diff": d_torch,
                     "answer": gen.tokenizer.decode(got, skip_special_tokens=True).strip()})
    return {"prompts": rows, "tokens_equal": all(r["equal"] for r in rows),
            "cache_vs_nocache_max_abs_diff": worst_cache, "onnx_vs_torch_max_abs_diff": worst_torch,
            "logit_scale": scale}


def export_lm(run_dir: str | Path, out: str | Path, options: LMExportOptions = LMExportOptions(),
              prompts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """model.onnx (+ model.int8.onnx) + tokenizer.json + generation.json + export_report.json."""
    from fedtune.llm.evaluate import PROMPTS

    run_dir, out = Path(run_dir), Path(out)
    check_destination(out)
    prompts = prompts or PROMPTS
    with torch_threads(options.threads):
        cfg, model = load_lm(run_dir)
        from fedtune.adapter_kinds import kind_of

        merged = kind_of(cfg.model.adapter).merge_for_export(model).eval()
        with staging(out) as tmp:
            write_assets(cfg.model.model, merged.config, tmp)
            t = time.perf_counter()
            export_decoder(merged, tmp / MODEL_FP32)
            seconds = time.perf_counter() - t
            gen = EdgeGenerator(tmp, threads=options.threads)
            check = verify(merged, gen, prompts, options)
            if not check["tokens_equal"]:
                bad = next(r for r in check["prompts"] if not r["equal"])
                raise ParityError(f"ONNX greedy tokens differ from torch generate for {bad['prompt']!r}; nothing was written")
            # fp32 round-off grows with the logits' size (30 layers, |logit| ~ 20): the bound is relative
            if not check["cache_vs_nocache_max_abs_diff"] <= options.max_abs_diff * check["logit_scale"]:
                raise ParityError(f"cached and uncached ONNX logits differ by {check['cache_vs_nocache_max_abs_diff']:.2e} "
                                  f"(> {options.max_abs_diff:.0e} x {check['logit_scale']:.1f}, the largest |logit|); "
                                  "nothing was written")
            files, sizes = {"fp32": MODEL_FP32}, {"fp32": (tmp / MODEL_FP32).stat().st_size}
            speed = _speed(merged, gen, prompts[0], options)
            if options.int8:
                quantize_int8(tmp / MODEL_FP32, tmp / MODEL_INT8)
                files["int8"], sizes["int8"] = MODEL_INT8, (tmp / MODEL_INT8).stat().st_size
                q = EdgeGenerator.int8(tmp, threads=options.threads)
                check["int8_tokens_equal"] = [q.generate_ids(gen.prompt_ids(p), options.new_tokens)[0] == r["onnx"]
                                              for p, r in zip(prompts, check["prompts"])]
                speed["onnx_int8_kv"] = q.tokens_per_second(prompts[0], options.timing_tokens)
            report = {**metadata(run_dir, cfg, [], OPSET), "task": "causal-lm", "files": files,
                      "options": asdict(options), "export_seconds": seconds, "verification": check,
                      "sizes_bytes": sizes, "sizes_mb": {k: v / 1e6 for k, v in sizes.items()},
                      "tokens_per_second": speed}
            (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _speed(merged, gen: EdgeGenerator, prompt: str, options: LMExportOptions) -> dict[str, float]:
    """Greedy tokens/s on one prompt: ORT with the KV cache vs torch generate (same threads)."""
    ids = gen.prompt_ids(prompt)
    torch_greedy(merged, ids, 2, sorted(gen.eos))  # warm-up
    gen.generate_ids(ids, 2)
    n = options.timing_tokens
    t = time.perf_counter()
    new, _ = gen.generate_ids(ids, n)
    ort_tps = len(new) / (time.perf_counter() - t)
    _, torch_tps = torch_greedy(merged, ids, n, sorted(gen.eos))
    return {"onnx_fp32_kv": ort_tps, "torch_generate": torch_tps, "tokens": n, "threads": options.threads}


def format_lm_table(report: dict[str, Any]) -> str:
    v, s, sp = report["verification"], report["sizes_mb"], report["tokens_per_second"]
    lines = [f"{'prompt':<52}{'tokens equal':>13}", "-" * 65]
    lines += [f"{r['prompt'][:50]:<52}{str(r['equal']):>13}   {r['answer'][:60]!r}" for r in v["prompts"]]
    lines.append(f"cache vs no-cache max |dlogit| {v['cache_vs_nocache_max_abs_diff']:.1e}; "
                 f"onnx vs torch {v['onnx_vs_torch_max_abs_diff']:.1e}")
    lines.append("size MB: " + ", ".join(f"{k} {x:.1f}" for k, x in s.items()) + "; tokens/s: "
                 + ", ".join(f"{k} {x:.1f}" for k, x in sp.items() if k not in ("tokens", "threads")))
    return "\n".join(lines)
