"""The sparse adapter: trainable values at chosen entries of the targeted base weights.

Sparse fine-tuning (SpIEL, Ansell et al., 2024; Composable Sparse Fine-Tuning, Ansell et al.,
2022) trains a small subset of a pretrained model's own weights. Each targeted ``nn.Linear``
becomes a :class:`SparseLinear`: its frozen ``base_layer`` holds W0 + the global sparse delta
(set absolutely by ``fedtune.adapters.set_base``, as for FLoRA's base deltas), and during a
client's local run a parameter vector ``sparse_values`` [k] is scattered into the weight at the flat
indices ``idx`` [k]. Only ``sparse_values`` gets gradients, so the optimizer state covers the k
trained entries and nothing else. Between local runs ``sparse_values`` is empty (requires_grad off):
the model's trainable state (what ``modeling.trainable_state`` returns) is the head alone,
and the global sparse delta travels as base deltas (``wire.BASE``).

The head is kept the way peft keeps it (``classifier.modules_to_save.default``), so the
FedNCM head initialisation and the head learning rate work unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

from fedtune.adapters import layer_index
from fedtune.config import ModelConfig
from fedtune.errors import ModelError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class SparseLinear(nn.Module):
    """W = base_layer.weight + scatter(values at idx); only ``sparse_values`` [k] trains."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = {"default": 1.0}  # a merged sparse delta has scale 1 (read by adapters.scalings)
        self.idx = torch.empty(0, dtype=torch.long)  # [k] flat indices; a plain attribute (opacus refuses buffers)
        self.sparse_values = nn.Parameter(torch.empty(0), requires_grad=False)  # [k]

    def forward(self, x: Tensor) -> Tensor:
        w = self.base_layer.weight  # [d_out, d_in]
        if self.sparse_values.numel():
            w = w.flatten().index_add(0, self.idx.to(w.device), self.sparse_values.to(w.dtype)).view_as(w)
        return F.linear(x, w, self.base_layer.bias)

    def start(self, idx: Tensor) -> nn.Parameter:
        """Train the entries ``idx`` from zero; returns the new trainable ``sparse_values``."""
        device = self.base_layer.weight.device
        self.idx = idx.to(device, torch.long)
        self.sparse_values = nn.Parameter(torch.zeros(len(idx), dtype=torch.float32, device=device))
        return self.sparse_values

    def stop(self) -> tuple[Tensor, Tensor]:
        """(idx [k], trained values [k]); the layer is its frozen base again."""
        out = (self.idx.to("cpu", copy=True), self.sparse_values.detach().to("cpu", copy=True))  # for the wire
        self.idx = torch.empty(0, dtype=torch.long)
        self.sparse_values = nn.Parameter(torch.empty(0), requires_grad=False)
        return out


class HeadHolder(nn.Module):
    """The classification head under peft's name (``modules_to_save.default``)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.modules_to_save = nn.ModuleDict({"default": head})

    def forward(self, x: Tensor) -> Tensor:
        return self.modules_to_save["default"](x)


class SparseModel(nn.Module):
    """A sequence classifier with sparse layers; peft-like ``save_pretrained`` / ``merge_and_unload``."""

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.adapter_cfg = cfg

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def save_pretrained(self, path: str) -> None:
        """The head (``adapter_model.safetensors``) and the adapter settings; the sparse delta
        itself is a base delta, saved beside it by the server (``base_delta.safetensors``)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}
        save_file(state, str(out / WEIGHTS_FILE))
        c = self.adapter_cfg
        meta = {"adapter": "sparse", "target_modules": list(c.target_modules), "sparse_density": c.sparse_density,
                "sparse_selection": c.sparse_selection}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold any trained values into the base weights and return the plain model (in place)."""
        for name, mod in list(self.model.named_modules()):
            if isinstance(mod, (SparseLinear, HeadHolder)):
                if isinstance(mod, SparseLinear):
                    w = mod.base_layer.weight
                    idx, values = mod.stop()
                    w.view(-1).index_add_(0, idx.to(w.device), values.to(w.device, w.dtype))
                    plain = mod.base_layer
                else:
                    plain = mod.modules_to_save["default"]
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, plain)
        return self.model


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """{layer path: SparseLinear}, in module order (paths are the base-delta keys)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _targets(model: nn.Module, cfg: ModelConfig) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in cfg.target_modules]
    if cfg.lora_layers and names:
        n_layers = 1 + max(layer_index(n) for n in names)
        names = [n for n in names if layer_index(n) >= n_layers - cfg.lora_layers]
    return names


def attach_sparse(base: nn.Module, cfg: ModelConfig) -> SparseModel:
    """Freeze ``base``, wrap its target linear layers as SparseLinear and its head as HeadHolder."""
    for p in base.parameters():
        p.requires_grad_(False)
    targets = _targets(base, cfg)
    if not targets:
        raise ModelError(f"cannot attach a sparse adapter to {cfg.model!r}: no linear layer named "
                         f"{', '.join(cfg.target_modules)}")
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = base.get_submodule(parent)
        setattr(owner, child, SparseLinear(getattr(owner, child)))
    head = getattr(base, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ModelError(f"cannot attach a sparse adapter to {cfg.model!r}: no linear 'classifier' head")
    base.classifier = HeadHolder(head)
    for p in head.parameters():
        p.requires_grad_(True)
    return SparseModel(base, cfg)


def zero_deltas(model: nn.Module) -> dict[str, Tensor]:
    """{base-delta/LAYER: zeros [d_out, d_in]} for every sparse layer (the initial global
    sparse delta, so every round's message carries each layer); {} for other models."""
    from fedtune import wire

    return {wire.BASE + n: torch.zeros_like(m.base_layer.weight) for n, m in sparse_layers(model).items()}
