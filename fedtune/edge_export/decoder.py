"""A causal LM as an ONNX decoder with a KV cache: flat tensors in, flat tensors out.

Signature (L layers, H key/value heads, D head size; P past tokens, S new tokens, P may be 0):

    input_ids [B, S] int64, attention_mask [B, P + S] int64, position_ids [B, S] int64,
    past_key_0 [B, H, P, D], past_value_0 [B, H, P, D], ... past_value_{L-1}
    -> logits [B, S, V], present_key_0 [B, H, P + S, D], ..., present_value_{L-1}

The same file serves the prompt (prefill, empty past) and every single-token decode step.
transformers' cache object (``DynamicCache``) is built inside the wrapper, so the exported
graph sees only plain tensors and the device needs no transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fedtune.edge_export.errors import ExportError
from fedtune.edge_export.onnx_io import OPSET, _quiet

INPUTS = ("input_ids", "attention_mask", "position_ids")


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, head_dim


def past_names(layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


class KVDecoder(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = cache_shape(model.config)[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)], config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def example_inputs(config, batch: int = 2, past: int = 3, seq: int = 2) -> tuple[Tensor, ...]:
    """Trace inputs with every dynamic axis > 1 (torch.export specialises sizes 0 and 1)."""
    layers, kv, head_dim = cache_shape(config)
    ids = torch.ones((batch, seq), dtype=torch.long)
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    pos = torch.arange(past, past + seq).repeat(batch, 1)
    cache = [torch.zeros((batch, kv, past, head_dim)) for _ in range(2 * layers)]
    return (ids, mask, pos, *cache)


def export_decoder(model: nn.Module, path: Path) -> Path:
    """Export a merged (plain transformers) causal LM as one ONNX file with dynamic batch,
    sequence and past lengths."""
    wrapper = KVDecoder(model.eval()).eval()
    layers = wrapper.layers
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
    t = torch.export.Dim.AUTO  # past + sequence: derived, not free
    dims = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple([{0: b, 2: p}] * (2 * layers)))  # *past: one tuple
    try:
        with _quiet("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"), torch.no_grad():
            torch.onnx.export(
                wrapper, example_inputs(model.config), str(path), input_names=[*INPUTS, *past_names(layers)],
                output_names=["logits", *present_names(layers)], dynamic_shapes=dims, opset_version=OPSET,
                dynamo=True, external_data=False, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "this model does not export"
        raise ExportError(f"torch.onnx.export of the decoder failed: {str(exc).strip().splitlines()[0][:300]}") from None
    return path
