"""``adapter=lora``: peft LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023), on the deepest
``lora-layers`` layers (LEGEND, Liu et al., 2024). Every strategy aggregates it; clients of
several ranks (profiles) are the rank-aware strategies' business (fedtune.strategies.hetero)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedtune.adapter_kinds.base import AdapterKind, Shapes
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


class LoRA(AdapterKind):
    name = "lora"

    def build(self, base: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
        from peft import get_peft_model

        from fedtune.device import resolve

        device = resolve(cfg.device)
        num_layers = int(getattr(base.config, "num_hidden_layers", 0) or 0)
        if cfg.lora_layers and not num_layers:
            raise ModelError(f"lora-layers needs a model with num_hidden_layers in its config; {cfg.model!r} has none")
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                return get_peft_model(base, lora_config(cfg, num_layers))
        except ValueError as exc:  # e.g. target modules not found in the model
            raise ModelError(f"cannot attach LoRA to {cfg.model!r}: {exc}") from None

    def stated_scale(self, model: nn.Module) -> float:
        from fedtune.adapters import scalings

        scales = set(scalings(model).values())
        if len(scales) != 1:
            raise RuntimeError(f"adapter layers with different scalings: {sorted(scales)}")
        return scales.pop()

    def statement_mismatch(self, m: ModelConfig, rank: int, alpha: float, rslora: bool, scale: float) -> str | None:
        from fedtune.strategies.lora import lora_scale, rslora_scale

        want = rslora_scale(m.lora_alpha, rank) if m.use_rslora else lora_scale(m.lora_alpha, rank)
        if alpha != m.lora_alpha or rslora != m.use_rslora or not math.isclose(scale, want, rel_tol=1e-6):
            return (f"states alpha {alpha:g}, rslora {rslora}, scale {scale:g}; the run has "
                    f"alpha {m.lora_alpha:g}, rslora {m.use_rslora}, scale {want:g} at rank {rank}")
        return None

    def reply_shapes(self, reference: Shapes, sent: Mapping[str, Tensor], layers: int, rank: int,
                     frozen: tuple[str, ...]) -> Shapes:
        """The head as sent; A [rank, d_in] and B [d_out, rank] on the profile's deepest
        ``layers`` layers, unless the strategy freezes one (FFA's A)."""
        from fedtune.adapters import A_SUFFIX, B_SUFFIX, deepest, split

        factors, head = split(reference)  # type: ignore[arg-type]  # shapes in place of tensors
        out: Shapes = dict(head)  # type: ignore[arg-type]
        for layer in deepest(factors, layers) if factors else ():
            parts = factors[layer]
            if "A" in parts and "lora_A" not in frozen:
                out[layer + A_SUFFIX] = (rank, parts["A"][1])
            if "B" in parts and "lora_B" not in frozen:
                out[layer + B_SUFFIX] = (parts["B"][0], rank)
        return out


KIND = LoRA()
