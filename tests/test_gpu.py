"""GPU-only checks (``pytest -m gpu``; skipped without CUDA): run on the GPU test machine by
scripts/gpu_check.sh. Models are built from configs (random weights): placement, precision
and memory do not depend on the weight values."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _enc(n: int = 32, labels: int = 4, vocab: int = 100):
    from fedtune.training import Encoded

    rng = np.random.default_rng(0)
    return Encoded(tuple(rng.integers(5, vocab, size=int(rng.integers(6, 16))) for _ in range(n)),
                   rng.integers(0, labels, n))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A config-built Llama (random weights) saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, num_labels=4)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(str(path))
    return str(path)


def _lm_batches(vocab: int = 256, batch: int = 8, length: int = 32):
    from fedtune.llm.data import LMEncoded

    rng = np.random.default_rng(0)
    ids = tuple(rng.integers(3, vocab, size=length) for _ in range(batch))
    return LMEncoded(ids, ids, np.zeros(batch, dtype=np.int64))


def test_model_optimizer_and_batches_live_on_cuda() -> None:
    from fedtune.config import ModelConfig, TrainConfig
    from fedtune.device import placement_of
    from fedtune.modeling import build_model, trainable_state
    from fedtune.training import BatchStream, make_optimizer, run_steps, warmup

    model = build_model(ModelConfig(model="tiny", lora_rank=4, device="cuda"), 4)
    assert placement_of(model).device.type == "cuda"
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    opt = make_optimizer(model, TrainConfig())
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.extend(v.device.type for v in kw.values()),
                                           with_kwargs=True)
    losses = run_steps(model, opt, warmup(opt, 0), BatchStream(_enc(vocab=1000), 8, 0, 0), 3)
    hook.remove()
    assert set(seen) == {"cuda"} and all(np.isfinite(losses))
    assert {t.device.type for s in opt.state.values() for t in s.values() if t.dim() > 0} == {"cuda"}
    assert {t.device.type for t in trainable_state(model).values()} == {"cpu"}  # the wire boundary


def test_bf16_autocast_with_fp32_adapters_on_cuda(tiny_llama_dir) -> None:
    from fedtune.config import ModelConfig, TrainConfig
    from fedtune.device import placement_of
    from fedtune.modeling import build_model
    from fedtune.training import BatchStream, make_optimizer, run_steps, warmup

    cfg = ModelConfig(model=tiny_llama_dir, task="causal-lm", base_dtype="bfloat16", device="cuda",
                      target_modules=("q_proj", "v_proj"), lora_rank=8)
    model = build_model(cfg, 0)
    assert placement_of(model).autocast is torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    q = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj.base_layer"))
    dtypes = []
    q.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    with placement_of(model).compute():
        out = model(input_ids=torch.ones(2, 8, dtype=torch.long, device="cuda"))
    assert dtypes == [torch.bfloat16] and out.logits.isfinite().all()
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    losses = run_steps(model, opt, warmup(opt, 0), BatchStream(_lm_batches(), 8, 0, 0), 10)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_step_lowers_the_loss(kind, tiny_llama_dir) -> None:
    pytest.importorskip("bitsandbytes")
    from fedtune.config import ModelConfig, TrainConfig
    from fedtune.modeling import build_model
    from fedtune.training import BatchStream, make_optimizer, run_steps, warmup

    cfg = ModelConfig(model=tiny_llama_dir, task="causal-lm", base_quant=kind, device="cuda", lora_rank=8,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), gradient_checkpointing=True)
    model = build_model(cfg, 0)
    quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert quantized, "no bitsandbytes layer in the base"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    losses = run_steps(model, opt, warmup(opt, 0), BatchStream(_lm_batches(), 8, 0, 0), 15)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_a_quantized_classifier_keeps_its_head_trainable(tiny_bert_dir) -> None:
    """The README pitfall: a BERT classifier in 4/8-bit fails in prepare_model_for_kbit_training
    unless its new head stays out of quantization."""
    pytest.importorskip("bitsandbytes")
    from fedtune.config import ModelConfig, TrainConfig
    from fedtune.modeling import build_model
    from fedtune.training import train_local

    model = build_model(ModelConfig(model=tiny_bert_dir, base_quant="nf4", device="cuda", lora_rank=4), 4)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert head and all(p.dtype == torch.float32 for p in head)
    stats = train_local(model, _enc(vocab=128), TrainConfig(local_steps=3, batch_size=8), 0, 0)
    assert np.isfinite(stats["train_loss"])


def _in_subprocess(code: str) -> subprocess.CompletedProcess:
    """The memory cap is per process and cannot be lifted: test it in a fresh one."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_the_client_gpus_share_is_a_hard_cap() -> None:
    r = _in_subprocess("""
        import torch
        from fedtune.device import cap_memory
        dev = torch.device("cuda", 0)
        total = torch.cuda.get_device_properties(dev).total_memory
        cap_memory(0.05, dev)
        small = torch.empty(int(0.02 * total), dtype=torch.uint8, device=dev)
        try:
            torch.empty(int(0.10 * total), dtype=torch.uint8, device=dev)
            print("NO-OOM")
        except torch.cuda.OutOfMemoryError:
            print("CAPPED")
    """)
    assert "CAPPED" in r.stdout, r.stdout + r.stderr


def test_a_real_out_of_memory_fails_the_handler_and_the_process_goes_on() -> None:
    r = _in_subprocess("""
        import torch
        from fedtune.client.gpu import oom_mod
        from fedtune.device import cap_memory
        dev = torch.device("cuda", 0)
        cap_memory(0.05, dev)
        total = torch.cuda.get_device_properties(dev).total_memory
        def hog(msg, ctx):
            keep = [torch.empty(int(0.02 * total), dtype=torch.uint8, device=dev) for _ in range(10)]
            return keep
        try:
            oom_mod(None, None, hog)
        except RuntimeError as exc:
            print("FAILED:", exc)
        x = torch.empty(int(0.03 * total), dtype=torch.uint8, device=dev)  # the memory came back
        print("GOES-ON", x.numel() > 0)
    """)
    assert "FAILED: CUDA out of memory on cuda:0" in r.stdout and "GOES-ON True" in r.stdout, r.stdout + r.stderr
