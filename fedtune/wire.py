"""What crosses the wire: trainable tensors as a Flower ArrayRecord, and their byte count."""

from __future__ import annotations

from flwr.app import ArrayRecord
from torch import Tensor

from fedtune.wire_keys import (  # noqa: F401 - the key names
    ARRAYS,
    CONFIG,
    METRICS,
    RUN_CONFIG,
    WEIGHT,
    CLIENT_ID,
    RANK,
    ALPHA,
    SCALE,
    RSLORA,
    ADAPTER_KEYS,
    ADAPTER,
    PROFILE,
    DEVICE_INDEX,
    GPU_PEAK,
    BASE,
    MASKS,
)


def to_record(state: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    return dict(record.to_torch_state_dict())


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of the arrays (numpy .npy payloads, headers included)."""
    return int(record.count_bytes())


def split_base(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """({layer: base delta}, the rest) of a state whose base deltas are keyed BASE + layer."""
    base = {k[len(BASE):]: v for k, v in state.items() if k.startswith(BASE)}
    return base, {k: v for k, v in state.items() if not k.startswith(BASE)}
