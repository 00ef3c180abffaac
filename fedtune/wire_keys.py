"""The names of what crosses the wire: RecordDict, ConfigRecord, MetricRecord and ArrayRecord
keys. Plain strings (no flwr, no torch): fedtune.wire re-exports them with the record codecs."""

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
MASKS = "sparse-masks"  # RecordDict key the decode screen adds to a sparse reply: {base-delta/LAYER: flat indices}
