"""The client side of ``secure-aggregation=secagg+``: Flower's ``secaggplus_mod``, speaking
fedtune's records (fedtune.server.secagg is the server side).

``secaggplus_mod`` runs the protocol's stages and, at the "collect masked vectors" stage,
calls the train handler, reads the reply as a legacy ``FitRes`` (``fitres.parameters``,
``fitres.num_examples``), scales the parameters by the weight, quantizes, masks, and sends
only the masked vector (it clears the reply's arrays). ``secagg_mod`` wraps it: the legacy
``fitins.*`` records the workflow sends are turned into fedtune's ``arrays`` / ``config``
before the train handler (and the client-side DP clipping mod) sees them, and fedtune's
reply into ``fitres.*`` after. The stated weight is bounded here, before masking, because
the server can no longer screen it: at most ``secagg-max-weight`` (the protocol's own
scale: above it the weighted sum would overflow the quantization range). Under client-level
DP every client states 1: the noise is calibrated to a *uniform* mean of clipped updates, and
the server can no longer reweight (the run's max weight is then 1, see fedtune.server.secagg).
Messages without SecAgg+ records pass straight through.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedtune import wire
from fedtune.catalog import adapter_kind

KEYS = "fedtune-keys"  # the array names, in order (fedtune.server.secagg)
MASK = "secagg-mask/"  # + a sparse layer's key: its 0/1 mask, summed securely beside the masked delta
PROFILE = "fedtune-profile"  # the reply's stated profile (its ADAPTER record), in the clear metrics
FITINS, FITRES = "fitins", "fitres"


def _to_fedtune(msg: Message) -> None:
    """Replace the legacy fitins records by fedtune's arrays / config in place."""
    content = msg.content
    from flwr.compat.common import recorddict_compat as compat

    params = compat.arrayrecord_to_parameters(content.array_records[f"{FITINS}.parameters"], keep_input=True)
    config = dict(content.config_records[f"{FITINS}.config"])
    keys = json.loads(str(config.pop(KEYS)))
    arrays = parameters_to_ndarrays(params)
    for name in (f"{FITINS}.parameters", f"{FITINS}.config", RECORD_KEY_CONFIGS):
        if name in content:
            del content[name]
    from flwr.app import Array

    content[wire.ARRAYS] = ArrayRecord({k: Array(a) for k, a in zip(keys, arrays)})
    content[wire.CONFIG] = ConfigRecord(config)


def _to_fitres(out: Message, max_weight: float, uniform: bool = False) -> Message:
    """fedtune's reply as the legacy fitres records secaggplus_mod reads; the weight bounded
    (``uniform``: client-level DP, every client weighs 1, as ``UniformWeights`` does without SecAgg+).
    The reply's array names (sorted: every client of the run sends the same) and its profile
    travel in the clear metrics, as the weight does in Flower's protocol."""
    content = out.content
    record = content[wire.ARRAYS]
    metrics = content[wire.METRICS]
    weight = 1.0 if uniform else min(float(metrics[wire.WEIGHT]), max_weight)
    from flwr.compat.common import recorddict_compat as compat

    keys = sorted(record.keys())
    params: Parameters = ndarrays_to_parameters([record[k].numpy() for k in keys])
    content[f"{FITRES}.parameters"] = compat.parameters_to_arrayrecord(params, keep_input=True)
    content[f"{FITRES}.num_examples"] = MetricRecord({"num_examples": int(weight)})
    # Flower's FitRes metrics take scalars only
    clear = {k: v for k, v in metrics.items() if k != wire.WEIGHT and isinstance(v, (int, float, str, bytes, bool))}
    clear[KEYS] = json.dumps(keys)
    if wire.ADAPTER in content:
        clear[PROFILE] = str(content[wire.ADAPTER][wire.PROFILE])
    content[f"{FITRES}.metrics"] = ConfigRecord(clear)
    content[f"{FITRES}.status"] = ConfigRecord({"code": 0, "message": "Success"})
    del content[wire.ARRAYS]  # the individual update never leaves unmasked
    return out


def _dense_sparse(out: Message, received: dict, flat: dict) -> Message:
    """A sparse adapter's reply (its trained entries, fedtune.compression.sparse_wire) as dense
    tensors the protocol can sum: per sparse layer, the delta on the client's entries (zero
    elsewhere) and, under ``MASK + key``, the 0/1 mask. The server's secure averages of the two
    give the mask-aware mean: sum w m d / sum w m (fedtune.server.secagg)."""
    import torch

    from fedtune.compression.client import params
    from fedtune.compression.downlink import densify
    from fedtune.compression.screen import seeded_masks
    from fedtune.compression.sparse_wire import decode_update
    from fedtune.config import RunConfig

    cfg = RunConfig.from_json(json.dumps(flat))
    ref = densify(received)
    keys = {k for k in ref if k.startswith(wire.BASE)}
    state, masks = decode_update(wire.from_record(out.content[wire.ARRAYS]), ref, keys, cfg.federation.compression,
                                 params(cfg), seeded_masks(cfg, out))
    arrays = {}
    for k, t in state.items():
        if k in masks:
            mask = torch.zeros(t.numel(), dtype=torch.float32)
            mask[masks[k]] = 1.0
            arrays[k] = ((t.float() - ref[k].float()).flatten() * mask).reshape(t.shape)
            arrays[MASK + k] = mask.reshape(t.shape)
        else:
            arrays[k] = t
    out.content[wire.ARRAYS] = wire.to_record(arrays)
    return out


def secagg_mod(msg: Message, context: Context, call_next):  # a Flower Mod, outermost on the train handler
    """Flower's SecAgg+ client mod around fedtune's train handler (see the module docstring)."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    def train(m: Message, ctx: Context) -> Message:
        _to_fedtune(m)
        flat = json.loads(str(m.content[wire.CONFIG][wire.RUN_CONFIG]))
        if adapter_kind(flat.get("adapter", "lora")).reply == "entries":  # indices cannot be summed: a dense
            # masked delta and its mask
            received = wire.from_record(m.content[wire.ARRAYS])
            return _to_fitres(_dense_sparse(call_next(m, ctx), received, flat),
                              float(flat.get("secagg-max-weight", 1000.0)))
        if flat.get("dp") in ("client-fixed", "client-adaptive"):  # the noise is calibrated to a uniform mean
            return _to_fitres(call_next(m, ctx), 1.0, uniform=True)
        return _to_fitres(call_next(m, ctx), float(flat.get("secagg-max-weight", 1000.0)))

    return secaggplus_mod(msg, context, train)
