"""The ``validate`` screen: every train reply is checked before aggregation.

Per reply (``fedtune.server.reply.decode_update``): the statements (client id, weight,
rank, alpha, scale, profile) against what the node joined as and the run's adapter; a rank
above the allowed maximum (the largest rank of any profile); then exactly the keys a client
of that profile and rank trains (its layers, A [r, d_in] and B [d_out, r] unless the
strategy freezes one, the head), each of that shape, float32, finite. Per cohort: the update
norm ||reply - sent|| (over the tensors the node was sent) above ``max-norm-ratio`` times the
median of the round's other valid replies (with 3 or more). A rejected reply is never
aggregated; ``Metered`` records it with its reason in ``metrics.jsonl``.

The weight a reply states (its example count, ``num-examples``) cannot be verified in a
deployment, and one stating 1e9 examples would take over the example-weighted mean. It is
bounded twice: by the client's own partition size where the server knows it (simulation,
``weight_caps``), and by ``max-weight-ratio`` times the median weight of the round's other
valid replies (with 3 or more). Above a bound, ``weight-bound=clip`` lowers the stated weight
to the bound (the reply is kept; ``Metered`` records it under ``adjusted``), ``reject`` drops
the reply (under ``rejected``). With clipping, a liar's share of the mean is at most
``b / (b + sum of the others' weights)`` with ``b`` its bound.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from torch import Tensor

from fedtune import wire
from fedtune.adapter_kinds import kind_of
from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.profiles import candidates, lookup
from fedtune.server.reply import DTYPE, Shapes, Stated, decode_update
from fedtune.server.screen import SCREENS, BadUpdate, Rejected, Sent
from fedtune.strategies.rank_aware import check_stated
from fedtune.strategies.recipes import recipe_for
from fedtune.strategies.robust import update_norm

__all__ = ["Validator", "decode_update", "BadUpdate"]


class Validator:
    """The screen; ``begin_round`` (called by ``Metered``) gives it the round's global arrays
    (the reference shapes, at the server's rank) and the node roster."""

    def __init__(self, cfg: RunConfig, weight_caps: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.weight_caps = weight_caps  # {client id: its training examples}, where the server knows them
        self.weight_ratio = cfg.federation.max_weight_ratio
        self.weight_bound = cfg.federation.weight_bound  # clip | reject
        self.notes: list[Rejected] = []  # replies kept but changed (a clipped weight), with the reason
        self.max_rank = max(p.lora_rank for p in candidates(cfg))
        self.frozen = recipe_for(cfg.federation.strategy).frozen
        self.ratio = cfg.federation.max_norm_ratio
        self.kind = kind_of(cfg.model.adapter)  # what a reply states and carries (fedtune.adapter_kinds)
        self.entries = self.kind.info.reply == "entries"  # sparse: their dense deltas travel as base-delta/
        self.reference: dict[str, tuple[int, ...]] = {}
        self.members: Mapping[int, Any] = {}

    def begin_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> None:
        self.reference = {k: tuple(a.shape) for k, a in arrays.items() if self._replied(k)}
        self.members = dict(getattr(grid, "members", None) or {})

    def _replied(self, key: str) -> bool:
        """Whether clients send ``key`` back: base deltas only with sparse adapters (LoRA strategies
        send them down, FLoRA / FedEx-LoRA, and never get them back)."""
        return self.entries or not key.startswith(wire.BASE)

    def _check_stated(self, node: int, st: Stated) -> Any:
        """The profile the reply's statements are consistent with, or BadUpdate."""
        n = self.cfg.partition.num_clients
        if st.client >= n:
            raise BadUpdate(f"client id {st.client} out of range (num-clients {n})")
        member = self.members.get(node)
        if member is not None and member.client != st.client:
            raise BadUpdate(f"states client {st.client}; node {node} holds client {member.client}")
        if st.rank > self.max_rank:
            raise BadUpdate(f"rank {st.rank} above the allowed maximum {self.max_rank}")
        try:
            profile = lookup(self.cfg, st.profile)
        except ConfigError:
            raise BadUpdate(f"unknown profile {st.profile[:40]!r}") from None
        try:  # the kind checks the rest (LoRA: alpha, rsLoRA, scale; fedtune.adapter_kinds)
            check_stated(profile.name, st.rank, st.alpha, st.rslora, st.scale, profile,
                         None if member is None else member.profile, self.cfg.model)
        except ValueError as err:
            raise BadUpdate(str(err)) from None
        return profile

    def expected(self, node: int, st: Stated, sent: dict[str, Tensor]) -> Shapes:
        """The {name: shape} a client of the stated (and checked) profile and rank sends back."""
        profile = self._check_stated(node, st)
        reference = self.reference or {k: tuple(t.shape) for k, t in sent.items() if self._replied(k)}
        return self.kind.reply_shapes(reference, sent, profile.layers, st.rank, self.frozen)

    def __call__(self, server_round: int, replies: list[Message], sent: Sent) -> tuple[list[Message], list[Rejected]]:
        kept: list[tuple[Message, float]] = []
        rejected: list[Rejected] = []
        self.notes = []
        for m in replies:
            node = m.metadata.src_node_id
            mine = sent.get(node, {})
            # float32 (the model's), or what the server sent (a decoded update is sent + delta; FedAdam's
            # global is float64)
            dtypes = tuple(dict.fromkeys([DTYPE, *(str(t.dtype).removeprefix("torch.") for t in mine.values())]))
            try:
                dec = decode_update(m.content, lambda st: self.expected(node, st, mine), dtypes)
                self._cap_weight(m, dec.stated)
            except BadUpdate as err:
                rejected.append(Rejected(m, str(err)))
                continue
            common = {k: t.double() - mine[k].double() for k, t in dec.tensors.items()
                      if k in mine and mine[k].shape == t.shape}
            kept.append((m, update_norm(common)))
        kept = self._cohort(kept, rejected)
        return self._cohort_weights(kept, rejected), rejected

    def _bound_weight(self, m: Message, weight: float, bound: float, why: str) -> None:
        """Clip the reply's stated weight to ``bound`` (noted), or raise BadUpdate (weight-bound=reject)."""
        if self.weight_bound == "reject":
            raise BadUpdate(f"{why}: rejected (weight-bound=reject)")
        m.content[wire.METRICS][wire.WEIGHT] = float(bound)
        self.notes.append(Rejected(m, f"{why}: clipped to {bound:.6g}"))

    def _cap_weight(self, m: Message, st: Stated) -> None:
        """The hard cap: no client states more examples than its partition holds (simulation)."""
        if self.weight_caps is None:
            return
        member = self.members.get(m.metadata.src_node_id)
        client = st.client if member is None else int(member.client)
        cap = self.weight_caps[client]
        if st.weight > cap:
            self._bound_weight(m, st.weight, cap, f"states {st.weight:.6g} examples; client {client}'s "
                                                  f"partition holds {cap}")

    def _cohort_weights(self, kept: list[Message], rejected: list[Rejected]) -> list[Message]:
        """Bound each stated weight by max-weight-ratio times the median of the others' (3 or more)."""
        if len(kept) < 3 or math.isinf(self.weight_ratio):
            return kept
        weights = [float(m.content[wire.METRICS][wire.WEIGHT]) for m in kept]
        out = []
        for i, m in enumerate(kept):
            med = statistics.median(w for j, w in enumerate(weights) if j != i)
            bound = self.weight_ratio * med
            if med > 0 and weights[i] > bound:
                try:
                    self._bound_weight(m, weights[i], bound, f"states {weights[i]:.6g} examples, {weights[i] / med:.1f}x "
                                       f"the median {med:.6g} of the cohort (max-weight-ratio {self.weight_ratio:g})")
                except BadUpdate as err:
                    rejected.append(Rejected(m, str(err)))
                    continue
            out.append(m)
        return out

    def _cohort(self, kept: list[tuple[Message, float]], rejected: list[Rejected]) -> list[Message]:
        """Reject updates whose norm is far above the median of the others (3 or more)."""
        if len(kept) < 3 or math.isinf(self.ratio):
            return [m for m, _ in kept]
        out = []
        for i, (m, norm) in enumerate(kept):
            med = statistics.median(n for j, (_, n) in enumerate(kept) if j != i)
            if med > 0 and norm > self.ratio * med:
                rejected.append(Rejected(m, f"update norm {norm:.4g} is {norm / med:.1f}x the median {med:.4g} "
                                            f"of the cohort (max-norm-ratio {self.ratio:g})"))
            else:
                out.append(m)
        return out


@SCREENS.register("validate")
def build_validate(cfg: RunConfig, weight_caps: Sequence[int] | None = None) -> Validator:
    return Validator(cfg, weight_caps)
