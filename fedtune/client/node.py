"""What a deployed node states about itself in Flower's node config (``fedtune join``), and
how it changes the run config this node runs with.

- ``partition-id``: the node's client id (also in simulation);
- ``profile``: its device profile; used when the run lets clients choose (``profiles=auto``),
  in place of detection from the hardware; other runs assign profiles by client id;
- ``device``: where this node trains (``fedtune join --device``), in place of the run's
  ``device`` and its profile's;
- ``threads``: torch threads this node trains with (``fedtune join --threads``, default the
  machine's cores), in place of the run's ``client-cpus`` and its profile's ``num-cpus``
  (those size simulated clients sharing one machine);
- ``dataset``: on this node only, in place of the run's ``dataset``: a bundled dataset
  name (the node takes its partition of it) or a local CSV/TSV path (the node's own data:
  all of it, split into train/validation by ``val-fraction``). Same columns and label set
  as the run's.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context, Message

from fedtune import wire
from fedtune.config import RunConfig
from fedtune.data.sources import SOURCES
from fedtune.profiles import AUTO, Profile, apply, assign, lookup

PROFILE = "profile"
DATASET = "dataset"
DEVICE = "device"
THREADS = "threads"


@dataclass(frozen=True)
class NodeRun:
    """The run as this node runs it, resolved once per message."""

    cfg: RunConfig  # the run's config with this node's profile (rank, layers, batch, ...) and declared device
    client: int  # the partition this node holds
    profile: Profile


def resolve(msg: Message, context: Context) -> NodeRun:
    """This node's view of the run a message belongs to: the run config it carries, this node's
    client id and profile (declared or assigned), the profile and the node's device applied."""
    run = RunConfig.from_json(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
    profile = profile_of(run, context)
    cfg = node_threads(node_device(apply(run, profile), context), context)
    return NodeRun(cfg, int(context.node_config["partition-id"]), profile)


def declared_profile(cfg: RunConfig, context: Context) -> Profile | None:
    """The profile the node declares, if the run takes it (``profiles=auto``)."""
    name = str(context.node_config.get(PROFILE, "")).strip()
    if not name or name == AUTO or cfg.federation.profiles.strip() != AUTO:
        return None
    return lookup(cfg, name)


def profile_of(cfg: RunConfig, context: Context) -> Profile:
    """This node's device profile: declared (profiles=auto), else the run's assignment."""
    return declared_profile(cfg, context) or assign(cfg, int(context.node_config["partition-id"]))


def node_device(cfg: RunConfig, context: Context) -> RunConfig:
    """``cfg`` with the device this node declares (``fedtune join --device``), if any."""
    device = str(context.node_config.get(DEVICE, "")).strip()
    return cfg.replace(device=device) if device and device != cfg.model.device else cfg


def node_threads(cfg: RunConfig, context: Context) -> RunConfig:
    """``cfg`` with the torch threads this node states (``fedtune join --threads``), if any."""
    threads = int(context.node_config.get(THREADS, 0) or 0)
    return cfg.replace(**{"client-cpus": threads}) if threads > 0 and threads != cfg.federation.client_cpus else cfg


def local_data(cfg: RunConfig, client: int, context: Context) -> tuple[RunConfig, int]:
    """(config, client id) this node reads its data with (``get_worker``): by default the
    run's partition ``client`` of the run's dataset; for a bundled dataset the node names,
    its partition of that; for a file of the node's own, all of it (one client, one part)."""
    dataset = str(context.node_config.get(DATASET, "")).strip()
    if not dataset or dataset == cfg.data.dataset:
        return cfg, client
    if dataset in SOURCES:
        return cfg.replace(dataset=dataset), client
    return cfg.replace(**{"dataset": dataset, "num-clients": 1, "partition": "iid"}), 0
