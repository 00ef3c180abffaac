"""Per-tensor codecs as pure functions: a float tensor <-> {part: tensor}.

- ``none``: float32 as is; ``fp16``: half precision (relative error <= 2^-11);
- ``int8``: q = round(x / s), s = max|x| / 127 for the tensor; ``int8-row``: one s per row
  (QSGD-style linear quantisation, Alistarh et al., 2017); error per entry <= s / 2;
- ``topk``: the ``topk-fraction`` largest |x| as int32 indices + float32 values (Aji &
  Heafield, 2017; lossy, biased: pair it with error feedback);
- ``dare``: drop each entry with probability p and rescale the rest by 1/(1-p) (DARE, Yu et
  al., 2024): unbiased; the kept set comes from a seed sent as one int64, so only the values
  and the seed cross the wire.

Decoding never trusts the payload: dtypes, sizes, index bounds and order are checked and a
bad one raises ``ValueError`` with the reason. ``shape`` is what the server expects; codecs
whose payload carries the shape (``needs_shape`` False) also decode without one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedtune.registry import Registry


@dataclass(frozen=True)
class Params:
    topk_fraction: float = 0.01
    dare_p: float = 0.9
    seed: int = 0  # dare: the seed of this tensor's kept set


@dataclass(frozen=True)
class Codec:
    encode: Callable[[Tensor, Params], dict[str, Tensor]]
    decode: Callable[[dict[str, Tensor], tuple[int, ...] | None, Params], Tensor]
    needs_shape: bool = False  # the payload does not carry the dense shape
    lossless: bool = False


CODECS: Registry[Codec] = Registry("compression")


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(why)


def _part(parts: dict[str, Tensor], name: str, dtype: torch.dtype) -> Tensor:
    _need(name in parts, f"missing part {name!r}")
    t = parts[name]
    _need(t.dtype == dtype, f"part {name!r} has dtype {t.dtype}, expected {dtype}")
    return t


def _check_shape(t: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    _need(shape is None or tuple(t.shape) == tuple(shape), f"shape {tuple(t.shape)} != expected {shape}")
    return t.to(torch.float32)


def _plain(part: str, dtype: torch.dtype) -> Codec:
    """The tensor itself in ``dtype`` (its payload carries the shape)."""
    return Codec(lambda x, p: {part: x.to(dtype)},
                 lambda parts, shape, p: _check_shape(_part(parts, part, dtype), shape),
                 lossless=dtype == torch.float32)


CODECS.register("none")(_plain("f32", torch.float32))
CODECS.register("fp16")(_plain("f16", torch.float16))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)  # [R, C]


def _int8_encode(x: Tensor, per_row: bool) -> dict[str, Tensor]:
    rows = _rows(x.float())
    amax = rows.abs().amax(dim=1) if per_row else rows.abs().amax().reshape(1)  # [R] or [1]
    scale = amax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe[:, None] if per_row else rows / safe).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(x.shape), "scale": scale.float()}


def _int8_decode(parts: dict[str, Tensor], shape: tuple[int, ...] | None, per_row: bool) -> Tensor:
    q, scale = _part(parts, "q", torch.int8), _part(parts, "scale", torch.float32)
    _check_shape(q, shape)
    n_scales = _rows(q).shape[0] if per_row else 1
    _need(scale.shape == (n_scales,), f"{scale.numel()} scales for {n_scales} rows")
    _need(bool(torch.isfinite(scale).all()) and bool((scale >= 0).all()), "scales must be finite and >= 0")
    rows = _rows(q).float() * (scale[:, None] if per_row else scale)
    return rows.reshape(q.shape)


for _name, _per_row in (("int8", False), ("int8-row", True)):
    CODECS.register(_name)(Codec(lambda x, p, r=_per_row: _int8_encode(x, r),
                                 lambda parts, shape, p, r=_per_row: _int8_decode(parts, shape, r)))


def check_indices(idx: Tensor, numel: int) -> None:
    """int32 flat indices, strictly increasing, in [0, numel)."""
    _need(idx.dtype == torch.int32 and idx.dim() == 1, f"indices must be 1-D int32, got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel():
        _need(int(idx[0]) >= 0 and int(idx[-1]) < numel, f"index out of bounds [0, {numel})")
        _need(bool((idx[1:] > idx[:-1]).all()), "indices must be strictly increasing")


def scatter(shape: tuple[int, ...], idx: Tensor, values: Tensor) -> Tensor:
    """A dense float32 tensor of ``shape``: zeros, ``values`` at the flat ``idx``."""
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    out[idx.long()] = values.float()
    return out.reshape(shape)


def _topk_encode(x: Tensor, p: Params) -> dict[str, Tensor]:
    flat = x.float().flatten()
    k = max(1, math.ceil(p.topk_fraction * flat.numel()))
    idx = torch.topk(flat.abs(), k).indices.sort().values
    return {"idx": idx.to(torch.int32), "val": flat[idx]}


def _topk_decode(parts: dict[str, Tensor], shape: tuple[int, ...] | None, p: Params) -> Tensor:
    _need(shape is not None, "topk needs the tensor's shape")
    idx, val = _part(parts, "idx", torch.int32), _part(parts, "val", torch.float32)
    check_indices(idx, math.prod(shape))
    _need(val.shape == idx.shape, f"{val.numel()} values for {idx.numel()} indices")
    return scatter(shape, idx, val)


def dare_keep(seed: int, numel: int, p: float) -> Tensor:
    """The kept entries of a DARE mask: each kept with probability 1-p, from ``seed``. [numel] bool."""
    gen = torch.Generator().manual_seed(seed & (2**63 - 1))
    return torch.rand(numel, generator=gen) >= p


def _dare_encode(x: Tensor, p: Params) -> dict[str, Tensor]:
    flat = x.float().flatten()
    keep = dare_keep(p.seed, flat.numel(), p.dare_p)
    return {"val": flat[keep] / (1.0 - p.dare_p), "seed": torch.tensor([p.seed], dtype=torch.int64)}


def _dare_decode(parts: dict[str, Tensor], shape: tuple[int, ...] | None, p: Params) -> Tensor:
    _need(shape is not None, "dare needs the tensor's shape")
    seed, val = _part(parts, "seed", torch.int64), _part(parts, "val", torch.float32)
    _need(seed.shape == (1,), "the dare seed must be one int64")
    keep = dare_keep(int(seed), math.prod(shape), p.dare_p)  # p is the run's, not the client's claim
    _need(val.dim() == 1 and val.numel() == int(keep.sum()), f"{val.numel()} values for {int(keep.sum())} kept entries")
    return scatter(shape, keep.nonzero().flatten(), val)


CODECS.register("topk")(Codec(_topk_encode, _topk_decode, needs_shape=True))
CODECS.register("dare")(Codec(_dare_encode, _dare_decode, needs_shape=True))
