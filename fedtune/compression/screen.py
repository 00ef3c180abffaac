"""The server's ``decode`` reply screen: encoded updates -> the dense state strategies expect.

For each train reply: the tensors the server sent that node this round (``sent``) plus the
decoded delta, as a normal trainable-state ArrayRecord under ``wire.ARRAYS`` (a sparse
layer: its dense base delta ``base-delta/LAYER``), and for sparse adapters the masks under
``MASKS`` ({base-delta/LAYER: int64 flat indices}) for the mask-aware aggregation. A reply
that does not decode (bad indices, sizes, dtypes, a seed mask of the wrong size) is rejected
with the reason (``BadUpdate``), never aggregated. Metered counts ``bytes_up`` before the
screens, on the encoded message: what crossed the wire.
"""

from __future__ import annotations

from flwr.app import Message

from fedtune import wire
from fedtune.catalog import adapter_kind
from fedtune.compression.client import encodes, params
from fedtune.compression.downlink import densify
from fedtune.compression.sparse_wire import MaskOf, decode_update
from fedtune.config import RunConfig
from fedtune.profiles import apply, lookup
from fedtune.server.screen import SCREENS, BadUpdate, Screen, Sent, per_reply

MASKS = wire.MASKS  # RecordDict key, added by this screen: the sparse layers' masks (fedtune.wire_keys)


def seeded_masks(cfg: RunConfig, reply: Message) -> MaskOf | None:
    """For ``random`` selection: the masks the client used, regenerated from the run's seed at
    the density of the client's profile; None when indices travel."""
    if adapter_kind(cfg.model.adapter).reply != "entries" or cfg.model.sparse_selection != "random":
        return None
    from fedtune.sparse.select import num_entries, random_mask

    try:
        name = str(reply.content[wire.ADAPTER][wire.PROFILE])
        density = apply(cfg, lookup(cfg, name)).model.sparse_density
    except Exception as err:  # noqa: BLE001 - a missing or unknown profile is the client's fault
        raise BadUpdate(f"cannot tell the client's sparse density: {err}") from None
    return lambda key, numel: random_mask(cfg.federation.seed, key[len(wire.BASE):], numel, num_entries(density, numel))


@SCREENS.register("decode")
def build_decode(cfg: RunConfig) -> Screen | None:
    if not encodes(cfg):
        return None
    codec, p = cfg.federation.compression, params(cfg)
    sparse = adapter_kind(cfg.model.adapter).reply == "entries"  # sparse layers: masks for the mask-aware mean

    def check(reply: Message, sent: Sent) -> Message:
        node = reply.metadata.src_node_id
        if node not in sent:
            raise BadUpdate(f"node {node} was sent no training message this round")
        try:
            ref = sent[node] = densify(sent[node])  # a sparse run's downlink; later screens see it dense
        except ValueError as err:
            raise BadUpdate(f"cannot read what was sent to node {node}: {err}") from None
        keys = {k for k in ref if k.startswith(wire.BASE)} if sparse else set()
        try:
            encoded = wire.from_record(reply.content[wire.ARRAYS])
            state, masks = decode_update(encoded, ref, keys, codec, p, seeded_masks(cfg, reply))
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise BadUpdate(f"cannot decode the update: {err}") from None
        reply.content[wire.ARRAYS] = wire.to_record(state)
        if sparse:
            reply.content[MASKS] = wire.to_record(masks)
        return reply

    return per_reply(check)
