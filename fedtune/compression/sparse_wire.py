"""A whole update <-> the flat {key: tensor} that crosses the wire, as pure functions.

Encoded keys are ``NAME|PART``:

- a dense tensor ``NAME`` (LoRA factor, head): the codec's parts, e.g. ``NAME|q``,
  ``NAME|scale`` (int8); what is encoded is the *delta* against what the server sent, or
  the tensor itself when the server sent none (FLoRA's fresh adapter, FedSA's B: then only
  codecs whose payload carries the shape apply);
- a sparse layer ``base-delta/LAYER``: ``NAME|idx`` (int32 flat indices, strictly
  increasing) and the values through the codec as ``NAME|val|PART``; with seeded masks
  (``random``) there is no ``idx``: both sides regenerate the mask from the run's seed.

``decode_update`` rebuilds the dense state the strategies and the ``validate`` screen expect
(sent + delta, every sparse layer as a dense base delta) and the masks; any inconsistency
raises ``ValueError`` naming the tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from fedtune.compression.codecs import CODECS, Params, check_indices

SEP = "|"
Sparse = Mapping[str, tuple[Tensor, Tensor]]  # {key: (idx [k] int64, values [k])}
MaskOf = Callable[[str, int], Tensor]  # (key, numel) -> the seeded mask's idx [k] int64


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed (DARE's kept set) from the reply's seed and the tensor name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def encode_dense(name: str, t: Tensor, codec: str, p: Params) -> dict[str, Tensor]:
    parts = CODECS.get(codec).encode(t, replace(p, seed=tensor_seed(p.seed, name)))
    return {f"{name}{SEP}{part}": v for part, v in parts.items()}


def encode_update(dense: Mapping[str, Tensor], sparse: Sparse, codec: str, p: Params,
                  seeded: bool) -> dict[str, Tensor]:
    """{NAME|PART: tensor} for the dense deltas and the sparse layers' (idx, values)."""
    out: dict[str, Tensor] = {}
    for name, t in dense.items():
        out.update(encode_dense(name, t, codec, p))
    for key, (idx, values) in sparse.items():
        if not seeded:
            out[f"{key}{SEP}idx"] = idx.to(torch.int32)
        out.update(encode_dense(f"{key}{SEP}val", values, codec, p))
    return out


def _group(encoded: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in encoded.items():
        name, sep, part = key.partition(SEP)
        if not sep:
            raise ValueError(f"{key!r} is not an encoded tensor (NAME{SEP}PART)")
        groups.setdefault(name, {})[part] = t
    return groups


def decode_dense(name: str, parts: dict[str, Tensor], ref: Tensor | None, codec: str, p: Params) -> Tensor:
    c = CODECS.get(codec)
    if ref is None and c.needs_shape:
        raise ValueError(f"not sent by the server, and {codec} needs its shape")
    delta = c.decode(parts, None if ref is None else tuple(ref.shape), p)
    return delta if ref is None else ref.float() + delta


def decode_sparse(parts: dict[str, Tensor], ref: Tensor, codec: str, p: Params,
                  mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(ref + scattered values [ref's shape], idx int64) of one sparse layer; ``mask``: a seeded mask."""
    parts = dict(parts)
    if mask is None:
        if "idx" not in parts:
            raise ValueError("missing part 'idx'")
        idx = parts.pop("idx")
        check_indices(idx, ref.numel())
    elif "idx" in parts:
        raise ValueError("indices sent for a seeded mask")
    else:
        idx = mask.to(torch.int32)
    vparts = {k[len("val" + SEP):]: v for k, v in parts.items() if k.startswith("val" + SEP)}
    if len(vparts) != len(parts):
        raise ValueError(f"unexpected parts {sorted(k for k in parts if not k.startswith('val' + SEP))}")
    try:
        values = CODECS.get(codec).decode(vparts, (idx.numel(),), p)  # [k]
    except ValueError as err:
        raise ValueError(f"values for {idx.numel()} entries: {err}") from None
    if not bool(torch.isfinite(values).all()):
        raise ValueError("NaN or Inf values")
    dense = ref.float().flatten().clone()
    dense[idx.long()] += values
    return dense.reshape(ref.shape), idx.long()


def decode_update(encoded: Mapping[str, Tensor], sent: Mapping[str, Tensor], sparse_keys: set[str], codec: str,
                  p: Params, mask_of: MaskOf | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(dense state, {sparse key: idx int64}). ``sparse_keys``: the sent keys that are sparse
    layers (each must be in the reply); ``mask_of``: seeded masks, None = indices on the wire."""
    groups = _group(encoded)
    missing = sorted(sparse_keys - groups.keys())
    if missing:
        raise ValueError(f"sparse layer {missing[0]} missing from the reply")
    state: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for name, parts in groups.items():
        try:
            if name in sparse_keys:
                mask = None if mask_of is None else mask_of(name, sent[name].numel())
                state[name], masks[name] = decode_sparse(parts, sent[name], codec, p, mask)
            else:
                state[name] = decode_dense(name, parts, sent.get(name), codec, p)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return state, masks
