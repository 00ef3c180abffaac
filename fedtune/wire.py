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
# Every train reply states its adapter (MetricRecord) and profile (ConfigRecord ADAPTER):
# the server checks these against the tensors' shapes and never infers a rank from shapes.
RANK, ALPHA, SCALE, RSLORA = "lora-rank", "lora-alpha", "lora-scale", "use-rslora"
ADAPTER_KEYS = (RANK, ALPHA, SCALE, RSLORA)
ADAPTER = "adapter"  # RecordDict key of the reply's ConfigRecord {PROFILE: name}
PROFILE = "profile"
DEVICE_INDEX, GPU_PEAK = "device-index", "gpu-peak-mib"  # MetricRecord: where a client trained (-1 = CPU), its peak
BASE = "base-delta/"  # ArrayRecord key prefix: dense delta of a layer's frozen base weight


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
