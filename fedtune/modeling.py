"""Base model + adapter, shared by server, clients, centralized training and export.

Only the trainable tensors (adapter + classification head) ever leave this module:
``trainable_state`` / ``load_trainable_state`` are the wire boundary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtune.bases import BUNDLED, TINY, TRUNCATED, _base_model, load_tokenizer, model_source  # noqa: F401
from fedtune.config import ModelConfig
from fedtune.errors import ModelError


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
