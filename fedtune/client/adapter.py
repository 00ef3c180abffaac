"""The client's side of heterogeneous ranks: which profile this node holds, the model it
runs for it, what it takes from a message, what it keeps, and what its replies state.

A simulation actor serves many clients with one cached model per profile, so every message
fully determines the model it runs on: which tensors train (the strategy's recipe), the
frozen base (``set_base``: absolute, W0 + delta), and the trainable tensors, taken from the
message, else from this node's own ``context.state`` (FedSA's B), else as built (a fresh
adapter, FLoRA). With a ``client-state-dir`` the personal tensors also go to
``client-<id>.safetensors`` after every training round: at the end of the run the server
makes them this client's view (``RUN/views``, fedtune.server.views) for ``fedtune export --client ID``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message
from safetensors.torch import save as save_safetensors
from torch import Tensor

from fedtune import wire
from fedtune.adapter_kinds import kind_of
from fedtune.adapters import set_base
from fedtune.client.node import local_data, resolve
from fedtune.client.restore import saved_personal
from fedtune.client.worker import Worker, get_worker
from fedtune.compression.downlink import densify
from fedtune.config import RunConfig
from fedtune.modeling import load_trainable_state, trainable_state
from fedtune.profiles import Profile
from fedtune.artifacts import atomic_write, client_state_file
from fedtune.strategies.recipes import recipe_for

LOCAL = "fedtune-local"  # context.state key: the tensors that never leave this node


@dataclass(frozen=True)
class Prepared:
    """One message's client: the run as this node runs it and its worker, loaded."""

    cfg: RunConfig  # the run config with this node's profile and device applied
    client: int
    profile: Profile
    worker: Worker


def prepare(msg: Message, context: Context) -> Prepared:
    """One pass down the layers: resolve this node's config and profile once
    (fedtune.client.node), get its worker (model, data), load the state the message carries."""
    me = resolve(msg, context)
    worker = get_worker(*local_data(me.cfg, me.client, context))  # deployed: the node's own data, if it has some
    load_state(worker, me.cfg, me.client, msg, context)
    return Prepared(me.cfg, me.client, me.profile, worker)


def load_state(worker: Worker, cfg: RunConfig, client: int, msg: Message, context: Context) -> None:
    """The model as the message says: the frozen base (W0 + the base deltas it carries), which
    tensors train (the strategy's recipe), and the trainable tensors: the message's, else this
    node's own (FedSA's B: from ``context.state``, after a restart from its client-state-dir
    file), else as built (a fresh adapter, FLoRA)."""
    arrays = densify(wire.from_record(msg.content[wire.ARRAYS]))  # a sparse downlink, made dense
    base, received = wire.split_base(arrays)
    recipe = recipe_for(cfg.federation.strategy)
    own: dict[str, Tensor] = {}
    if recipe.local:  # only the tensors it keeps, of this model's shapes
        saved = wire.from_record(context.state[LOCAL]) if LOCAL in context.state else saved_personal(cfg, client, msg)
        own = {k: v for k, v in saved.items() if recipe.keeps(k) and k in worker.initial
               and v.shape == worker.initial[k].shape}
    recipe.prepare(worker.model, worker.initial, cfg.federation.seed)
    set_base(worker.model, base)
    names = [n for n, p in worker.model.named_parameters() if p.requires_grad]
    state = {n: worker.initial[n] for n in names}
    state.update({k: v for k, v in own.items() if k in state})
    state.update(received)
    load_trainable_state(worker.model, state)


def save_personal(cfg: RunConfig, client: int, profile: Profile, tensors: dict[str, Tensor], server_round: int) -> None:
    """Write this client's personal tensors to ``<client-state-dir>/client-<id>.safetensors``
    (nothing without a client-state-dir), atomically: a temporary file in the same folder,
    fsync, rename. The metadata says which profile (rank, layers) the tensors belong to."""
    folder = cfg.federation.client_state_dir
    if not folder:
        return
    path = client_state_file(folder, client)
    meta = {"client": str(client), "profile": profile.name, "lora-rank": str(cfg.model.lora_rank),
            "strategy": cfg.federation.strategy, "round": str(server_round)}
    data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write(path, data)


def reply_adapter(me: Prepared, context: Context, server_round: int = 0) -> tuple[dict[str, float | int], ConfigRecord]:
    """After training: keep this node's local tensors in ``context.state`` (and, with a
    client-state-dir, in its file), and return what the reply states (MetricRecord entries:
    rank, alpha, scale, rsLoRA; ConfigRecord: profile)."""
    cfg, worker = me.cfg, me.worker
    recipe = recipe_for(cfg.federation.strategy)
    if recipe.local:
        mine = {k: v for k, v in trainable_state(worker.model).items() if recipe.keeps(k)}
        context.state[LOCAL] = wire.to_record(mine)
        save_personal(cfg, me.client, me.profile, mine, server_round)
    scale = kind_of(cfg.model.adapter).stated_scale(worker.model)  # LoRA: its one scaling; others: 1
    stated = {wire.RANK: cfg.model.lora_rank, wire.ALPHA: cfg.model.lora_alpha, wire.SCALE: scale,
              wire.RSLORA: int(cfg.model.use_rslora)}
    return stated, ConfigRecord({wire.PROFILE: me.profile.name})
