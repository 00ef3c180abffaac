"""The client's side: what a train reply carries under ``wire.ARRAYS``.

Without compression and without a sparse adapter: the trainable state, as always. Otherwise
the update encoded by ``sparse_wire.encode_update``: dense tensors as deltas against what
the server sent, sparse layers as (indices +) values. With ``error-feedback`` (Seide et al.,
2014; Karimireddy et al., 2019) the client adds to each dense delta what compression lost
last time, and keeps the new loss in ``context.state`` (per node, like fedtune's LOCAL).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from torch import Tensor, nn

from fedtune import wire
from fedtune.adapter_kinds import kind_of
from fedtune.catalog import adapter_kind
from fedtune.compression.codecs import CODECS, Params
from fedtune.compression.downlink import densify
from fedtune.compression.sparse_wire import SEP, encode_dense, encode_update
from fedtune.config import RunConfig
from fedtune.modeling import trainable_state

RESIDUAL = "fedtune-residual"  # context.state key: {name: what compression dropped} (error feedback)


def encodes(cfg: RunConfig) -> bool:
    """Whether this run's train replies are encoded (and decoded by the server's screen)."""
    return cfg.federation.compression != "none" or adapter_kind(cfg.model.adapter).reply == "entries"


def params(cfg: RunConfig, seed: int = 0) -> Params:
    return Params(topk_fraction=cfg.federation.topk_fraction, dare_p=cfg.federation.dare_p, seed=seed)


def _with_feedback(dense: dict[str, Tensor], cfg: RunConfig, p: Params, context: Context) -> dict[str, Tensor]:
    """delta + residual per tensor; stores the new residuals (delta + r - decode(encode(...)))."""
    old = wire.from_record(context.state[RESIDUAL]) if RESIDUAL in context.state else {}
    codec = CODECS.get(cfg.federation.compression)
    target = {n: t + old[n] if n in old and old[n].shape == t.shape else t for n, t in dense.items()}
    residual = {}
    for name, t in target.items():
        parts = {k.split(SEP, 1)[1]: v for k, v in encode_dense(name, t, cfg.federation.compression, p).items()}
        residual[name] = t - codec.decode(parts, tuple(t.shape), p)
    context.state[RESIDUAL] = wire.to_record(residual)
    return target


def encode_reply(cfg: RunConfig, model: nn.Module, received: ArrayRecord, context: Context, seed: int) -> ArrayRecord:
    """The reply's ARRAYS record. ``received``: what the server sent; ``seed``: this client's
    round seed (DARE's kept sets)."""
    state = trainable_state(model)
    if not encodes(cfg):
        return wire.to_record(state)
    sent = densify(wire.from_record(received))
    dense = {n: t - sent[n] if n in sent else t for n, t in state.items()}
    sparse = kind_of(cfg.model.adapter).take_entries(model)  # sparse adapters: the trained entries, else {}
    p = params(cfg, seed)
    if cfg.federation.error_feedback and cfg.federation.compression != "none":
        dense = _with_feedback(dense, cfg, p, context)
    seeded = adapter_kind(cfg.model.adapter).reply == "entries" and cfg.model.sparse_selection == "random"
    return wire.to_record(encode_update(dense, sparse, cfg.federation.compression, p, seeded))
