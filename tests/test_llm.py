"""Causal-LM task on a tiny config-built Llama (SmolLM2's real tokenizer): answer-only loss,
the KV-cache ONNX decoder against torch, the torch-free generator, config refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.llm.data import IGNORE, LMEncoded, encode_dialog, token_nll
from fedtune.modeling import build_model, load_tokenizer, trainable_state
from fedtune.presets import resolve

TINY = {"model": "tiny-llama", "eval-size": 16, "max-length": 64}


def _spans(ids: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    """Contiguous runs of labelled positions."""
    out, cur = [], []
    for i, y in zip(ids, labels):
        if y == IGNORE:
            if cur:
                out.append(cur)
            cur = []
        else:
            assert y == i  # a label is the token itself (the model shifts)
            cur.append(int(i))
    return out + ([cur] if cur else [])


def test_only_answer_tokens_carry_labels():
    tok = load_tokenizer("tiny-llama")
    ids, labels = encode_dialog(tok, ["Hi", "Hello there", "How are you?", "Fine."], 512)
    text = tok.decode(ids.tolist())
    assert text == tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in
         [("user", "Hi"), ("assistant", "Hello there"), ("user", "How are you?"), ("assistant", "Fine.")]],
        tokenize=False)
    answers = [tok.decode(s) for s in _spans(ids, labels)]
    assert answers == ["Hello there<|im_end|>\n", "Fine.<|im_end|>\n"]
    unlabelled = tok.decode([int(i) for i, y in zip(ids, labels) if y == IGNORE])
    assert "Hi" in unlabelled and "How are you?" in unlabelled and "Fine." not in unlabelled
    # truncation keeps ids and labels aligned
    short_ids, short_labels = encode_dialog(tok, ["Hi", "Hello there", "How are you?", "Fine."], 30)
    assert len(short_ids) == len(short_labels) == 30 and (short_labels == labels[:30]).all()


def test_loss_counts_answer_tokens_only():
    tok = load_tokenizer("tiny-llama")
    rows = [encode_dialog(tok, d, 64) for d in (["Hi", "Hello"], ["What is AI?", "A field of computer science."])]
    enc = LMEncoded(tuple(r[0] for r in rows), tuple(r[1] for r in rows), np.zeros(2, dtype=np.int64))
    batch = enc.collate(np.array([0, 1]), pad_id=tok.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()  # padding is never a target
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 50)  # [B, T, V]
    labels = batch["labels"].clamp(max=49).where(batch["labels"] != IGNORE, IGNORE)
    # by hand: position t predicts labels[t + 1]; per example the mean over its answer tokens
    per = []
    for b in range(2):
        terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for t in range(labels.shape[1] - 1)
                 if labels[b, t + 1] != IGNORE]
        per.append(torch.stack(terms).mean())
    assert torch.allclose(LMEncoded.loss(logits, labels), torch.stack(per).mean(), atol=1e-5)
    nll, n = token_nll(logits, labels)
    assert n.tolist() == [int((labels[b, 1:] != IGNORE).sum()) for b in range(2)]
    # the model's own loss (transformers' shifted CE) is the token mean of the same terms
    cfg = resolve("llm", None, TINY)
    model = build_model(cfg.model, 1)
    out = model(**batch)
    nll, n = token_nll(out.logits, batch["labels"])
    assert torch.allclose(out.loss, nll.sum() / n.sum(), atol=1e-5)


def test_llm_preset_and_refusals():
    cfg = resolve("llm")
    assert (cfg.model.task, cfg.model.model, cfg.data.dataset, cfg.train.head_init) == (
        "causal-lm", "smollm2", "chatterbot", "random")
    assert cfg.model.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(ConfigError, match="head-init='ncm'"):
        resolve("llm", None, {"head-init": "ncm"})
    assert resolve("tiny", None, {"base-dtype": "bfloat16"}).model.base_dtype == "bfloat16"  # both tasks (gpu.md)
    with pytest.raises(ConfigError, match="gradient-checkpointing"):
        resolve("llm", None, {"gradient-checkpointing": "true", "dp": "sample", "noise-multiplier": "1.0"})
    with pytest.raises(ConfigError, match="task"):
        resolve("llm", None, {"task": "seq2seq"})


def test_cli_refuses_ncm_for_an_llm_in_one_line():
    out = subprocess.run([sys.executable, "-m", "fedtune", "simulate", "--preset", "llm", "--set", "head-init=ncm"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "head-init='ncm'" in out.stderr and "Traceback" not in out.stderr


def test_bf16_base_and_checkpointing_train_fp32_adapters():
    from fedtune.client.worker import get_worker
    from fedtune.training import train_local

    plain = resolve("llm", None, {**TINY, "local-steps": 1, "batch-size": 4})
    grads = {}
    for name, cfg in (("fp32", plain), ("ckpt", plain.replace(**{"gradient-checkpointing": True})),
                      ("bf16", plain.replace(**{"base-dtype": "bfloat16"}))):
        w = get_worker(cfg, 0)
        model = w.model
        base = next(p for n, p in model.named_parameters() if "embed_tokens" in n)
        assert base.dtype == {"bf16": torch.bfloat16}.get(name, torch.float32)
        state = trainable_state(model)
        assert state and all(t.dtype == torch.float32 for t in state.values())  # the wire stays fp32
        batch = w.data.train.collate(np.arange(4), w.pad_id)
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        stats = train_local(model, w.data.train, cfg.train, seed=1, pad_id=w.pad_id)
        assert np.isfinite(stats["train_loss"])
    for n, g in grads["fp32"].items():  # checkpointing recomputes, it does not change the gradient
        assert torch.allclose(grads["ckpt"][n], g, atol=1e-6), n
    assert any(g.abs().sum() > 0 for g in grads["bf16"].values())


# -- export: the ONNX decoder with a KV cache ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm_run(tmp_path_factory):
    """A tiny-llama run directory whose adapter has random (non-zero) A and B."""
    from fedtune.data import load_dataset
    from fedtune.edge_export.demo_run import perturb_adapter
    from fedtune.server.run_dir import RunDir

    cfg = resolve("llm", None, TINY)
    model = build_model(cfg.model, 1, seed=0)
    perturb_adapter(model, std=0.5)
    run = RunDir(tmp_path_factory.mktemp("lm") / "run").create(cfg)
    run.save_adapter(model, load_dataset(cfg.data).label_names)
    return run.path, model.eval()


@pytest.fixture(scope="module")
def tiny_lm_export(tiny_lm_run, tmp_path_factory):
    from fedtune.edge_export.export_lm import LMExportOptions, export_lm

    out = tmp_path_factory.mktemp("lm-edge") / "edge"
    return out, export_lm(tiny_lm_run[0], out, LMExportOptions(int8=True, timing_tokens=4))


def test_onnx_kv_cache_greedy_equals_torch_generate_for_20_tokens(tiny_lm_run, tiny_lm_export):
    from fedtune.edge_export.generator import EdgeGenerator
    from fedtune.llm.data import prompt_ids

    _, model = tiny_lm_run
    out, report = tiny_lm_export
    assert report["verification"]["tokens_equal"] and report["task"] == "causal-lm"
    gen = EdgeGenerator(out)
    tok = load_tokenizer("tiny-llama")
    for prompt in ("What is AI?", "Tell me about the american civil war"):
        ids = prompt_ids(tok, prompt)
        assert gen.prompt_ids(prompt) == ids  # tokenizers alone renders the same chat template
        with torch.inference_mode():  # the unmerged peft model, as the run evaluated it
            ref = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        got, _ = gen.generate_ids(ids, 20)
        assert len(got) == 20 or got[-1] in gen.eos
        assert got == ref[0, len(ids):len(ids) + len(got)].tolist()
        assert len(set(got)) > 1  # not a degenerate constant sequence


def test_cached_and_uncached_logits_agree(tiny_lm_export):
    from fedtune.edge_export.generator import EdgeGenerator

    gen = EdgeGenerator(tiny_lm_export[0])
    ids = gen.prompt_ids("Who was the first president of the United States?")
    new, cached = gen.generate_ids(ids, 12)  # prefill with an empty cache, then one token per step
    uncached = gen.logits(ids + new)[len(ids) - 1 : len(ids) + len(new) - 1]
    assert cached.shape == uncached.shape
    assert np.abs(cached - uncached).max() < 1e-4
    assert tiny_lm_export[1]["verification"]["cache_vs_nocache_max_abs_diff"] < 1e-4


def test_export_folder_sizes_and_int8(tiny_lm_export):
    out, report = tiny_lm_export
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file()
    assert report["sizes_bytes"]["int8"] < 0.5 * report["sizes_bytes"]["fp32"]
    assert len(report["verification"]["int8_tokens_equal"]) == 4
    spec = json.loads((out / "generation.json").read_text())
    assert spec["layers"] == 2 and spec["kv_heads"] == 2 and 2 in spec["eos_token_ids"]


def test_infer_generate_runs_without_torch(tiny_lm_export):
    out = tiny_lm_export[0]
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'peft'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        from fedtune.cli import main
        rc = main(['infer', {str(out)!r}, '--generate', 'What is AI?', '--max-new-tokens', '6'])
        assert 'torch' not in sys.modules
        sys.exit(rc)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    from fedtune.edge_export.generator import EdgeGenerator

    assert res.stdout.strip() == EdgeGenerator(out).generate("What is AI?", 6)


def test_profiles_carry_base_dtype_and_checkpointing():
    from fedtune.profiles import apply, assign

    defs = "gpu-bf16 lora-rank=8 base-dtype=bfloat16 gradient-checkpointing=true"
    cfg = resolve("llm", None, {"profiles": "gpu-bf16,cpu-edge", "profile-defs": defs})
    gpu, edge = (apply(cfg, assign(cfg, c)).model for c in (0, 1))
    assert (gpu.lora_rank, gpu.base_dtype, gpu.gradient_checkpointing) == (8, "bfloat16", True)
    assert (edge.lora_rank, edge.base_dtype, edge.gradient_checkpointing) == (2, "float32", False)
    for bad, needle in (("x lora-rank=2 base-dtype=int4", "base-dtype"),
                        ("x lora-rank=2 gradient-checkpointing=maybe", "not a flag")):
        with pytest.raises(ConfigError, match=needle):
            resolve("llm", None, {"profile-defs": bad})
