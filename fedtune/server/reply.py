"""The update decoder: one train reply's content -> checked statements and tensors.

``decode_update`` is the only place the server turns bytes from a client into tensors
before aggregation decisions; anything it cannot vouch for raises ``BadUpdate`` (its only
documented failure) with a reason that names the problem. It never unpickles (numpy's
``allow_pickle=False``) and reads an array's .npy header before its data, so a header that
claims a huge or unexpected shape is refused before anything is allocated.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedtune import wire
from fedtune.server.screen import BadUpdate

DTYPE = "float32"  # what clients send: the trainable tensors of a float32 model
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Stated:
    """What a reply says about itself (MetricRecord and the ADAPTER ConfigRecord)."""

    client: int
    weight: float
    rank: int
    alpha: float
    scale: float
    rslora: bool
    profile: str


@dataclass(frozen=True)
class Decoded:
    stated: Stated
    tensors: dict[str, Tensor]


def _number(met: MetricRecord, key: str) -> float:
    value = met.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadUpdate(f"metric {key!r} is missing or not a finite number: {value!r}")
    return float(value)


def read_stated(content: Any) -> Stated:
    """The reply's statements (client id, weight, rank, alpha, scale, rsLoRA, profile)."""
    if not isinstance(content, RecordDict):
        raise BadUpdate(f"reply content is a {type(content).__name__}, not a RecordDict")
    met = content.get(wire.METRICS)
    if not isinstance(met, MetricRecord):
        raise BadUpdate(f"no MetricRecord {wire.METRICS!r} in the reply")
    client, weight, rank = _number(met, wire.CLIENT_ID), _number(met, wire.WEIGHT), _number(met, wire.RANK)
    if not client.is_integer() or client < 0:
        raise BadUpdate(f"bad client id {client!r}")
    if weight < 0:
        raise BadUpdate(f"negative weight {wire.WEIGHT}={weight}")
    if not rank.is_integer() or rank < 0:
        raise BadUpdate(f"bad rank {wire.RANK}={rank!r}")
    adapter = content.get(wire.ADAPTER)
    profile = adapter.get(wire.PROFILE) if isinstance(adapter, ConfigRecord) else None
    if not isinstance(profile, str):
        raise BadUpdate(f"no profile stated (ConfigRecord {wire.ADAPTER!r}, key {wire.PROFILE!r})")
    return Stated(int(client), weight, int(rank), _number(met, wire.ALPHA), _number(met, wire.SCALE),
                  bool(_number(met, wire.RSLORA)), profile)


def decode_array(name: str, arr: Any, shape: tuple[int, ...], dtypes: tuple[str, ...] = (DTYPE,)) -> Tensor:
    """One Array as a tensor of ``shape``, of one of ``dtypes``, with finite values, or BadUpdate."""
    if not isinstance(arr, Array):
        raise BadUpdate(f"{name}: not an Array ({type(arr).__name__})")
    if arr.stype != "numpy.ndarray":
        raise BadUpdate(f"{name}: unsupported serialization {arr.stype!r}")
    if arr.dtype not in dtypes:
        raise BadUpdate(f"{name}: wrong dtype {arr.dtype!r}, expected {' or '.join(dtypes)}")
    dtype = arr.dtype
    if tuple(arr.shape) != tuple(shape):
        raise BadUpdate(f"{name}: wrong shape {tuple(arr.shape)}, expected {tuple(shape)}")
    buf = io.BytesIO(arr.data)
    try:  # the .npy header first: nothing is allocated for a shape we do not expect
        version = np.lib.format.read_magic(buf)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        hshape, fortran, hdtype = header(buf)
        if tuple(hshape) != tuple(shape) or hdtype != np.dtype(dtype) or fortran:
            raise BadUpdate(f"{name}: data holds {hdtype} {tuple(hshape)}, the Array states {arr.dtype} {arr.shape}")
        buf.seek(0)
        nd = np.load(buf, allow_pickle=False)
    except BadUpdate:
        raise
    except Exception as err:  # numpy's parsers raise many kinds on corrupt bytes: all mean "bad data"
        raise BadUpdate(f"{name}: data cannot be decoded ({type(err).__name__}: {err})"[:300]) from None
    if not isinstance(nd, np.ndarray) or nd.shape != tuple(shape) or nd.dtype != np.dtype(dtype):
        raise BadUpdate(f"{name}: data does not match its stated dtype and shape")
    if not np.isfinite(nd).all():
        raise BadUpdate(f"{name}: NaN or Inf values")
    return torch.from_numpy(np.array(nd, copy=True))


def decode_update(content: Any, expected: Callable[[Stated], Shapes], dtypes: tuple[str, ...] = (DTYPE,)) -> Decoded:
    """A train reply's statements and tensors, checked: the keys must be exactly
    ``expected(stated)`` (which may itself raise BadUpdate, e.g. for a rank above the
    maximum), each tensor of that shape, of one of ``dtypes``, finite. Raises only ``BadUpdate``."""
    stated = read_stated(content)
    shapes = expected(stated)
    record = content.get(wire.ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise BadUpdate(f"no ArrayRecord {wire.ARRAYS!r} in the reply")
    keys = list(record.keys())
    missing, extra = sorted(set(shapes) - set(keys)), sorted(set(keys) - set(shapes))
    if missing:
        raise BadUpdate(f"missing keys ({len(missing)}): {', '.join(missing[:3])}")
    if extra:
        raise BadUpdate(f"unexpected keys ({len(extra)}): {', '.join(str(k) for k in extra[:3])}")
    return Decoded(stated, {k: decode_array(k, record[k], shapes[k], dtypes) for k in keys})
