"""Base model + adapter, shared by server, clients, centralized training and export.

Only the trainable tensors (adapter + classification head) ever leave this module:
``trainable_state`` / ``load_trainable_state`` are the wire boundary (fedtune.adapter_kinds.base).
The adapter itself is built by its kind (``--set adapter=NAME``, fedtune.adapter_kinds).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtune.adapter_kinds import kind_of
from fedtune.adapter_kinds.base import load_trainable_state, trainable_state  # the wire boundary, every kind
from fedtune.adapter_kinds.lora import adapted_layers, lora_config  # noqa: F401 - re-exported
from fedtune.bases import BUNDLED, TINY, TRUNCATED, _base_model, load_tokenizer, model_source  # noqa: F401
from fedtune.config import ModelConfig


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
    from fedtune.device import Placement, autocast_dtype, place, resolve

    device = resolve(cfg.device)
    base = _placed_base(cfg, num_labels, device)
    quantized = cfg.base_quant != "none"  # bitsandbytes computes in bf16 (fedtune/quant.py)
    where = Placement(device, torch.bfloat16 if quantized else autocast_dtype(device, cfg.base_dtype, cfg.cpu_autocast))
    model = kind_of(cfg.adapter).build(base, cfg, seed)  # fedtune.adapter_kinds (lora: peft LoRA, seeded)
    return place(_fp32_trainable(model), where)


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits [B, C], positionally: the module opacus wraps
    (fedtune.privacy.dp_train) and the exported ONNX signature (fedtune.edge_export). It holds
    the model itself, so its parameters are the model's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, C]


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


def num_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
