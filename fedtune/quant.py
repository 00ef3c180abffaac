"""A frozen 4-bit / 8-bit base through bitsandbytes (``base-quant=nf4|int8``): QLoRA
(Dettmers et al., 2023), as FlowerTune (Mistral-7B, 4-bit) and OpenFedLLM (Llama-2-7B,
8-bit) fine-tune: the base is quantized and frozen, peft's ``prepare_model_for_kbit_training``
upcasts the rest for stable training, LoRA (fp32) goes on top.

bitsandbytes is an optional extra (``pip install fedtune[gpu]``) and needs CUDA here; without
either, ``base-quant`` is a one-line ModelError. A classifier's new head stays out of
quantization (``llm_int8_skip_modules``): a quantized head cannot require gradients.
"""

from __future__ import annotations

import importlib.util
import tempfile

import torch
from torch import nn

from fedtune.errors import ModelError

HEADS = ["classifier", "score", "lm_head"]  # kept in full precision


def require(kind: str, device: torch.device) -> None:
    """One line, before anything is built, when ``base-quant=kind`` cannot run here."""
    if device.type != "cuda":
        raise ModelError(f"bad value base-quant={kind!r}: a bitsandbytes base needs a CUDA device; "
                         f"this process trains on {device} (set base-quant=none, or device=cuda on a GPU machine)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"bad value base-quant={kind!r}: bitsandbytes is not installed (pip install 'fedtune[gpu]')")


def bnb_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=HEADS)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEADS)


def quantize(base: nn.Module, kind: str, device: torch.device, gradient_checkpointing: bool) -> nn.Module:
    """``base`` (built in full precision, with its seeded new head) reloaded with a 4/8-bit
    frozen body on ``device``, prepared for k-bit training. Saving and reloading makes any
    base quantizable the way transformers intends, config-built test models included."""
    from peft import prepare_model_for_kbit_training

    require(kind, device)
    with tempfile.TemporaryDirectory(prefix="fedtune-quant-") as tmp:
        base.save_pretrained(tmp)
        quantized = type(base).from_pretrained(tmp, quantization_config=bnb_config(kind),
                                               device_map={"": device.index or 0}, dtype=torch.bfloat16)
    quantized = prepare_model_for_kbit_training(
        quantized, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    return quantized
