"""Heterogeneous-rank federated LoRA on Flower: the shared machinery of the seven strategies.

The server's global state (the ``arrays`` Flower hands from round to round) is the server
model's trainable tensors, with the adapter at rank R = the largest rank of any profile and
scale s_R, plus ``base-delta/<layer>`` dense deltas of frozen base weights. Each node gets
its own message: ``view(global, profile)`` (its rank, its layers, its scale) plus the base
deltas every client must apply (``shared_base``). Replies state their rank, alpha, scale and
profile; ``parse`` checks them against the node's profile and the tensors' shapes, then the
subclass's ``combine`` aggregates one layer's ``ClientFactors`` with the pure functions of
``fedtune.strategies.lora``. The head (non-LoRA trainable tensors) is FedAvg'd by examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedtune import wire
from fedtune.adapter_kinds import kind_of
from fedtune.adapters import deepest, join, split
from fedtune.config import ModelConfig, RunConfig
from fedtune.profiles import Profile, candidates
from fedtune.strategies.aggregation import weighted_mean
from fedtune.strategies.fedavg import FedAvg, ordered
from fedtune.strategies.lora import ClientFactors, LoRAFactors, lora_scale, rslora_scale, slice_to_rank
from fedtune.strategies.recipes import ClientRecipe

ModelState = tuple[dict[str, Tensor], dict[str, Tensor]]  # (base deltas by layer, trainable tensors)


@dataclass(frozen=True)
class GlobalState:
    trainable: dict[str, Tensor]  # server model names; adapter at the server's rank and scale
    base: dict[str, Tensor]  # {layer: dense delta of the frozen base weight}

    @classmethod
    def decode(cls, arrays: ArrayRecord) -> GlobalState:
        base, rest = wire.split_base(wire.from_record(arrays))
        return cls(rest, base)

    def encode(self) -> ArrayRecord:
        return wire.to_record({**self.trainable, **{wire.BASE + k: v for k, v in self.base.items()}})


@dataclass(frozen=True)
class Update:
    client: int
    profile: Profile
    weight: float
    layers: dict[str, ClientFactors]
    head: dict[str, Tensor]


def members_of(grid: Grid) -> Mapping[int, Any]:
    """{node id: Member} from the discovered roster (``fedtune.server.nodes.OrderedGrid``)."""
    members = getattr(grid, "members", None)
    if members is None:
        raise RuntimeError("rank-aware strategies need the node roster: pass an OrderedGrid")
    return members


def check_stated(stated: str, rank: int, alpha: float, rslora: bool, scale: float, profile: Profile,
                 joined: Profile | None, model: ModelConfig) -> None:
    """The one check of what a train reply states about its adapter: profile ``stated`` (found
    as ``profile``) against the one its node joined as (``joined``, where known), its rank
    against that profile's, and what the run's adapter kind checks of the rest (LoRA: alpha,
    rsLoRA and scale against the run's; fedtune.adapter_kinds). A one-line ValueError names the
    first mismatch. The validate screen (fedtune.server.validate) runs it on every reply;
    ``RankAware.parse`` on what reaches it unscreened (SecAgg+'s pseudo-replies)."""
    if joined is not None and joined.name != stated:
        raise ValueError(f"states profile {stated!r}; the node joined as {joined.name!r}")
    if rank != profile.lora_rank:
        raise ValueError(f"states rank {rank}; profile {profile.name!r} has rank {profile.lora_rank}")
    why = kind_of(model.adapter).statement_mismatch(model, rank, alpha, rslora, scale)
    if why:
        raise ValueError(why)


class RankAware(FedAvg):
    """Per-node messages and stated-rank replies; subclasses define ``combine`` (and may
    change ``sends``, ``rewrites``, ``shared_base``, ``client_factors``)."""

    recipe: ClientRecipe = ClientRecipe()
    sends: tuple[str, ...] = ("A", "B")  # the adapter parts a client receives
    rewrites: tuple[str, ...] = ("A", "B")  # the parts of the global adapter an aggregation replaces

    def __init__(self, cfg: RunConfig, **sampling: Any) -> None:
        super().__init__(**sampling)
        self.alpha, self.rslora, self.seed = cfg.model.lora_alpha, cfg.model.use_rslora, cfg.federation.seed
        self.model = cfg.model
        self.rank = max(p.lora_rank for p in candidates(cfg))
        self.scale = self.scale_of(self.rank)
        self.members: Mapping[int, Any] = {}
        self.current: GlobalState | None = None

    def scale_of(self, rank: int) -> float:
        return rslora_scale(self.alpha, rank) if self.rslora else lora_scale(self.alpha, rank)

    # -- what one client gets -----------------------------------------------------------
    def combine(self, layer: str, clients: list[ClientFactors], g: GlobalState) -> tuple[LoRAFactors, Tensor | None]:
        """(new global factors of ``layer``, its new base delta or None = unchanged)."""
        raise NotImplementedError

    def shared_base(self, g: GlobalState) -> dict[str, Tensor]:
        """Base deltas every client applies to its frozen weights (none by default)."""
        return {}

    def client_factors(self, g: GlobalState, layer: str, rank: int, scale: float) -> LoRAFactors:
        """The global adapter of ``layer`` for a rank-``rank`` client: its first r components."""
        parts = split(g.trainable)[0][layer]
        return slice_to_rank(LoRAFactors(parts["A"], parts["B"], self.scale), rank, scale)

    def view(self, g: GlobalState, profile: Profile) -> dict[str, Tensor]:
        """The tensors a client of ``profile`` receives, under its own model's names."""
        layers, head = split(g.trainable)
        rank, scale = profile.lora_rank, self.scale_of(profile.lora_rank)
        out = {}
        for layer in sorted(deepest(layers, profile.layers)):
            f = self.client_factors(g, layer, rank, scale) if self.sends else None
            out[layer] = {p: getattr(f, p).float().contiguous() for p in self.sends}
        return join(out, head)

    def node_record(self, g: GlobalState, profile: Profile) -> ArrayRecord:
        return wire.to_record({**self.view(g, profile), **{wire.BASE + k: v for k, v in self.shared_base(g).items()}})

    def node_arrays(self, arrays: ArrayRecord, profile: Profile) -> ArrayRecord:
        """What a node of ``profile`` receives when the global state is ``arrays``."""
        return self.node_record(GlobalState.decode(arrays), profile)

    def _per_node(self, msgs: Iterable[Message], g: GlobalState, grid: Grid) -> list[Message]:
        self.members = members_of(grid)
        records: dict[str, ArrayRecord] = {}  # clients of one profile get the same tensors
        out = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if node not in self.members:  # joined after discovery: its rank is unknown, skip it
                continue
            profile = self.members[node].profile
            if profile.name not in records:
                records[profile.name] = self.node_record(g, profile)
            content = RecordDict({self.arrayrecord_key: records[profile.name],
                                  self.configrecord_key: m.content[self.configrecord_key]})
            out.append(Message(content, message_type=m.metadata.message_type, dst_node_id=node))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = GlobalState.decode(arrays)
        return self._per_node(super().configure_train(server_round, arrays, config, grid), self.current, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        msgs = super().configure_evaluate(server_round, arrays, config, grid)
        return self._per_node(msgs, GlobalState.decode(arrays), grid)

    # -- what comes back ------------------------------------------------------------------
    def parse(self, m: Message, g: GlobalState) -> Update:
        """One reply as ClientFactors per layer, after checking its stated adapter."""
        met = m.content[wire.METRICS]
        client, rank, scale = int(met[wire.CLIENT_ID]), int(met[wire.RANK]), float(met[wire.SCALE])
        profile = self.members[m.metadata.src_node_id].profile
        try:  # screened already, except under SecAgg+
            check_stated(str(m.content[wire.ADAPTER][wire.PROFILE]), rank, float(met[wire.ALPHA]),
                         bool(met[wire.RSLORA]), scale, profile, profile, self.model)
        except ValueError as e:
            raise ValueError(f"client {client} {e}") from None
        glayers = split(g.trainable)[0]
        layers, head = split(wire.from_record(m.content[wire.ARRAYS]))
        if set(layers) != deepest(glayers, profile.layers):
            raise ValueError(f"client {client} ({profile.name}) sends adapters of {len(layers)} layers, "
                             f"its profile has {len(deepest(glayers, profile.layers))}")
        factors = {}
        for layer, parts in layers.items():
            if "A" not in parts and "lora_A" in self.recipe.frozen:  # FFA: the shared frozen A
                parts = {**parts, "A": glayers[layer]["A"][:rank]}
            A, B = parts.get("A"), parts.get("B")
            if A is None or B is None or A.shape[0] != rank or B.shape[1] != rank:
                shapes = {p: tuple(t.shape) for p, t in parts.items()}
                raise ValueError(f"client {client} states rank {rank} but sends {layer}: {shapes}")
            factors[layer] = ClientFactors(A, B, scale, float(met[wire.WEIGHT]))
        return Update(client, profile, float(met[wire.WEIGHT]), factors, head)

    def after_aggregate(self, updates: list[Update]) -> None:
        """Hook for per-group server state (FedSA's group B)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower's consistency check wants equal keys in every reply: profiles differ in layers.
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if not valid or self.current is None:
            return None, None
        valid, g = ordered(valid), self.current
        updates = [self.parse(m, g) for m in valid]
        head = weighted_mean([u.head for u in updates], [u.weight for u in updates])
        layers = {k: dict(v) for k, v in split(g.trainable)[0].items()}
        base = dict(g.base)
        for layer in sorted(set().union(*(u.layers for u in updates))):
            try:
                factors, delta = self.combine(layer, [u.layers[layer] for u in updates if layer in u.layers], g)
            except ValueError as e:
                raise ValueError(f"layer {layer!r}: {e}") from e
            full = slice_to_rank(factors, self.rank, self.scale)  # zero-pads lower ranks: exact
            layers[layer].update({p: getattr(full, p).float() for p in self.rewrites if p in layers[layer]})
            if delta is not None:
                base[layer] = delta.float()
        self.after_aggregate(updates)
        self.current = GlobalState(join(layers, head), base)
        return self.current.encode(), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)

    # -- what the server evaluates --------------------------------------------------------
    def group_view(self, g: GlobalState, profile: Profile) -> dict[str, Tensor]:
        """The adapter a client of ``profile`` runs with (FedSA adds its group's mean B)."""
        return self.view(g, profile)

    def model_view(self, g: GlobalState, profile: Profile, group: bool = True) -> dict[str, Tensor]:
        """Every trainable tensor of the model a client of ``profile`` runs, under its own
        model's names (what the server writes to ``RUN/views``): what it receives (``group``:
        with its group's B, FedSA; else what it is sent) and, for the parts it is not sent,
        what it runs with: FFA's shared A (the first r rows of the global A), B = 0 (a fresh
        adapter: FLoRA's, whose A then has no effect)."""
        layers, head = split(g.trainable)
        got = split(self.group_view(g, profile) if group else self.view(g, profile))[0]
        rank, out = profile.lora_rank, {}
        for layer in sorted(deepest(layers, profile.layers)):
            parts, mine = layers[layer], got.get(layer, {})
            out[layer] = {"A": mine.get("A", parts["A"][:rank]).float().contiguous(),
                          "B": mine.get("B", torch.zeros(parts["B"].shape[0], rank)).float().contiguous()}
        return join(out, head)

    def lift(self, g: GlobalState, profile: Profile) -> dict[str, Tensor]:
        """A client's model in the server model's shape: rank zero-padded to R, B rescaled
        from the client's scale to the server's, layers it lacks with B = 0."""
        layers, head = split(g.trainable)
        mine = split(self.group_view(g, profile))[0]
        rank, scale = profile.lora_rank, self.scale_of(profile.lora_rank)
        out = {}
        for layer, parts in layers.items():
            if layer not in mine:
                out[layer] = {**parts, "B": torch.zeros_like(parts["B"])}
                continue
            A = mine[layer].get("A", parts["A"][:rank])  # not sent: FFA's shared A, or a fresh adapter
            B = mine[layer].get("B", torch.zeros(parts["B"].shape[0], rank, dtype=parts["B"].dtype))
            f = slice_to_rank(LoRAFactors(A, B, scale), self.rank, self.scale)
            out[layer] = {p: getattr(f, p) for p in parts}
        return join(out, head)

    def model_states(self, arrays: ArrayRecord) -> dict[str, ModelState]:
        """{'' : the global model} plus, with several profiles, {'rank_r': the model a client
        of that profile runs}, each as (base deltas, server-model trainable tensors)."""
        g = GlobalState.decode(arrays)
        profiles = sorted({m.profile for m in self.members.values()}, key=lambda p: (p.lora_rank, p.name))
        out: dict[str, ModelState] = {}
        if len(profiles) > 1:
            ranks = [p.lora_rank for p in profiles]
            for p in profiles:
                key = f"rank_{p.lora_rank}" if ranks.count(p.lora_rank) == 1 else f"rank_{p.lora_rank}_{p.name}"
                out[key] = (self.shared_base(g), self.lift(g, p))
        out[""] = (g.base, g.trainable)
        return out


def rank_aware_of(strategy: object) -> RankAware | None:
    """The RankAware strategy inside ``strategy``'s wrappers (Metered, DP: ``.inner`` /
    ``.strategy``), or None."""
    seen = 0
    while strategy is not None and not isinstance(strategy, RankAware) and seen < 16:
        strategy, seen = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None), seen + 1
    return strategy if isinstance(strategy, RankAware) else None
