"""The structure of a peft LoRA model as the wire and the strategies see it.

Trainable state keys (``modeling.trainable_state``) are peft parameter names; an adapted
layer ``L`` (a module path, e.g. ``base_model.model.bert.encoder.layer.1.attention.self.query``)
owns ``L.lora_A.default.weight`` (A: [r, d_in]) and ``L.lora_B.default.weight`` (B: [d_out, r]);
every other trainable tensor is "head". Base-weight updates (FLoRA, FedEx-LoRA) are dense
[d_out, d_in] deltas keyed by layer, applied *absolutely* (W = W0 + delta, never W += delta),
so applying the same delta twice, or once per client served by one process, is harmless.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

A_SUFFIX = ".lora_A.default.weight"
B_SUFFIX = ".lora_B.default.weight"
_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")  # peft's default layers_to_transform pattern
_W0: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()


def split(state: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """{name: tensor} -> ({layer: {'A': .., 'B': ..}} (either may be absent), {head name: tensor})."""
    layers: dict[str, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    for name, t in state.items():
        for part, suffix in (("A", A_SUFFIX), ("B", B_SUFFIX)):
            if name.endswith(suffix):
                layers.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            head[name] = t
    return layers, head


def join(layers: Mapping[str, Mapping[str, Tensor]], head: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``split``."""
    out = dict(head)
    for layer, parts in layers.items():
        for part, t in parts.items():
            out[layer + (A_SUFFIX if part == "A" else B_SUFFIX)] = t
    return out


def layer_index(layer: str) -> int:
    """The transformer layer number in a module path (as peft's layers_to_transform reads it)."""
    m = _LAYER_INDEX.match(layer + ".")
    if not m:
        raise ValueError(f"no layer index in {layer!r}")
    return int(m.group(1))


def deepest(layers: Iterable[str], count: int) -> set[str]:
    """The layers among ``layers`` in the deepest ``count`` transformer layers (0 = all)."""
    layers = list(layers)
    n = 1 + max(layer_index(x) for x in layers)
    return {x for x in layers if count == 0 or layer_index(x) >= n - count}


def scalings(model: nn.Module) -> dict[str, float]:
    """{layer: peft's scaling s} for every LoRA layer (s = alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    out = {}
    for name, mod in model.named_modules():
        scaling = getattr(mod, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            out[name] = float(scaling["default"])
    return out


def set_trainable(model: nn.Module, names: Iterable[str]) -> None:
    """requires_grad exactly for ``names`` (the trainable set is what crosses the wire)."""
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def _base_weight(model: nn.Module, layer: str) -> nn.Parameter:
    mod = model.get_submodule(layer)
    return getattr(mod, "base_layer", mod).weight


@torch.no_grad()
def set_base(model: nn.Module, deltas: Mapping[str, Tensor]) -> None:
    """Frozen base weight of each layer := W0 + deltas[layer] (W0 = the weight as built; layers
    not in ``deltas`` go back to W0). Idempotent: the same call twice leaves the same model."""
    w0 = _W0.setdefault(model, {})
    for layer in sorted(set(w0) | set(deltas)):
        w = _base_weight(model, layer)
        if layer not in w0:
            w0[layer] = w.detach().clone()
        delta = deltas.get(layer)
        if delta is not None and delta.shape != w.shape:
            raise ValueError(f"base delta of {layer}: shape {tuple(delta.shape)} != weight {tuple(w.shape)}")
        w.copy_(w0[layer] if delta is None else w0[layer] + delta.to(w.device, w.dtype))
