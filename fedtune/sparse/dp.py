"""Opacus per-example gradients for SparseLinear's ``values`` (DP-SGD on sparse adapters).

W = base + scatter(values at idx), so d loss / d values = (d loss / d W) at idx; per example
that is (sum over positions of backprop^T activation) at idx, as for nn.Linear's weight.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from fedtune.sparse.layer import SparseLinear


@register_grad_sampler(SparseLinear)
def sparse_grad_sample(layer: SparseLinear, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    a = activations[0]  # [B, ..., d_in]
    out = {}
    if layer.sparse_values.requires_grad:
        gs = torch.einsum("n...i,n...j->nij", backprops, a)  # [B, d_out, d_in]
        out[layer.sparse_values] = gs.flatten(1)[:, layer.idx]  # [B, k]
    return out
