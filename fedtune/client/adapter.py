"""The client's side of heterogeneous ranks: which profile this node holds, the model it
runs for it, what it takes from a message, what it keeps, and what its replies state.

A simulation actor serves many clients with one cached model per profile, so every message
fully determines the model it runs on: which tensors train (the strategy's recipe), the
frozen base (``set_base``: absolute, W0 + delta), and the trainable tensors, taken from the
message, else from this node's own ``context.state`` (FedSA's B), else as built (a fresh
adapter, FLoRA). With a ``client-state-dir`` the personal tensors also go to
``client-<id>.safetensors`` after every training round: ``fedtune export --client ID`` reads
them (it pairs them with the run's final global adapter).
"""

from __future__ import annotations


from flwr.app import ConfigRecord, Context, Message
from safetensors.torch import save as save_safetensors
from torch import Tensor

from fedtune import wire
from fedtune.adapter_kinds import kind_of
from fedtune.adapters import set_base
from fedtune.client.node import local_data, node_device, profile_of
from fedtune.client.restore import saved_personal
from fedtune.client.worker import Worker, get_worker
from fedtune.compression.downlink import densify
from fedtune.config import RunConfig
from fedtune.modeling import load_trainable_state, trainable_state
from fedtune.profiles import Profile, apply
from fedtune.artifacts import atomic_write, client_state_file
from fedtune.strategies.recipes import recipe_for

LOCAL = "fedtune-local"  # context.state key: the tensors that never leave this node


def node_profile(cfg: RunConfig, context: Context) -> Profile:
    return profile_of(cfg, context)  # declared in the node config (profiles=auto), else assigned


def prepare(msg: Message, context: Context) -> tuple[RunConfig, int, Worker]:
    """(the run config as this client runs it, its client id, its worker with the model
    loaded as the message says)."""
    run = RunConfig.from_json(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
    client = int(context.node_config["partition-id"])
    cfg = node_device(apply(run, node_profile(run, context)), context)  # a device the node declares wins
    worker = get_worker(*local_data(cfg, client, context))  # deployed: the node's own data, if it has some
    recipe = recipe_for(cfg.federation.strategy)
    recipe.prepare(worker.model, worker.initial, cfg.federation.seed)
    base, received = wire.split_base(densify(wire.from_record(msg.content[wire.ARRAYS])))  # sparse downlink
    set_base(worker.model, base)
    names = [n for n, p in worker.model.named_parameters() if p.requires_grad]
    state = {n: worker.initial[n] for n in names}
    if recipe.local:  # this node's own tensors; after a restart, from its client-state-dir file
        local = wire.from_record(context.state[LOCAL]) if LOCAL in context.state else saved_personal(cfg, client, msg)
        state.update({k: v for k, v in local.items() if k in state and recipe.keeps(k) and v.shape == state[k].shape})
    state.update(received)
    load_trainable_state(worker.model, state)
    return cfg, client, worker


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


def reply_adapter(
    cfg: RunConfig, worker: Worker, context: Context, server_round: int = 0
) -> tuple[dict[str, float | int], ConfigRecord]:
    """After training: keep this node's local tensors in ``context.state`` (and, with a
    client-state-dir, in its file), and return what the reply states (MetricRecord entries:
    rank, alpha, scale, rsLoRA; ConfigRecord: profile)."""
    recipe = recipe_for(cfg.federation.strategy)
    if recipe.local:
        mine = {k: v for k, v in trainable_state(worker.model).items() if recipe.keeps(k)}
        context.state[LOCAL] = wire.to_record(mine)
        save_personal(cfg, int(context.node_config["partition-id"]), node_profile(cfg, context), mine, server_round)
    scale = kind_of(cfg.model.adapter).stated_scale(worker.model)  # LoRA: its one scaling; others: 1
    stated = {wire.RANK: cfg.model.lora_rank, wire.ALPHA: cfg.model.lora_alpha, wire.SCALE: scale,
              wire.RSLORA: int(cfg.model.use_rslora)}
    return stated, ConfigRecord({wire.PROFILE: node_profile(cfg, context).name})
