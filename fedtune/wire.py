"""What crosses the wire: trainable tensors as a Flower ArrayRecord, and their byte count."""

from __future__ import annotations

from flwr.app import ArrayRecord
from torch import Tensor

ARRAYS = "arrays"  # RecordDict key of the adapter tensors
CONFIG = "config"  # RecordDict key of the ConfigRecord
METRICS = "metrics"  # RecordDict key of the MetricRecord in replies
RUN_CONFIG = "fedtune-config"  # ConfigRecord key carrying the run's flat config as JSON
WEIGHT = "num-examples"  # MetricRecord key used as the aggregation weight
CLIENT_ID = "client-id"  # MetricRecord key: the partition a reply came from


def to_record(state: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    return dict(record.to_torch_state_dict())


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of the arrays (numpy .npy payloads, headers included)."""
    return int(record.count_bytes())
