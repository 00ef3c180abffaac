"""The ``validate`` screen: every train reply is checked before aggregation.

Per reply (``fedtune.server.reply.decode_update``): the statements (client id, weight,
rank, alpha, scale, profile) against what the node joined as and the run's adapter; a rank
above the allowed maximum (the largest rank of any profile); then exactly the keys a client
of that profile and rank trains (its layers, A [r, d_in] and B [d_out, r] unless the
strategy freezes one, the head), each of that shape, float32, finite. Per cohort: the update
norm ||reply - sent|| (over the tensors the node was sent) above ``max-norm-ratio`` times the
median of the round's other valid replies (with 3 or more). A rejected reply is never
aggregated; ``Metered`` records it with its reason in ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from torch import Tensor

from fedtune import wire
from fedtune.adapters import A_SUFFIX, B_SUFFIX, deepest, split
from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.profiles import candidates, lookup
from fedtune.server.reply import DTYPE, Shapes, Stated, decode_update
from fedtune.server.screen import SCREENS, BadUpdate, Rejected, Sent
from fedtune.strategies.lora import lora_scale, rslora_scale
from fedtune.strategies.recipes import recipe_for
from fedtune.strategies.robust import update_norm

__all__ = ["Validator", "decode_update", "BadUpdate"]


class Validator:
    """The screen; ``begin_round`` (called by ``Metered``) gives it the round's global arrays
    (the reference shapes, at the server's rank) and the node roster."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.max_rank = max(p.lora_rank for p in candidates(cfg))
        self.frozen = recipe_for(cfg.federation.strategy).frozen
        self.ratio = cfg.federation.max_norm_ratio
        self.lora = cfg.model.adapter == "lora"  # sparse adapters: scale 1, their dense deltas travel as base-delta/
        self.reference: dict[str, tuple[int, ...]] = {}
        self.members: Mapping[int, Any] = {}

    def begin_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> None:
        self.reference = {k: tuple(a.shape) for k, a in arrays.items() if self._replied(k)}
        self.members = dict(getattr(grid, "members", None) or {})

    def _replied(self, key: str) -> bool:
        """Whether clients send ``key`` back: base deltas only with sparse adapters (LoRA strategies
        send them down, FLoRA / FedEx-LoRA, and never get them back)."""
        return not self.lora or not key.startswith(wire.BASE)

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
        if member is not None and member.profile.name != profile.name:
            raise BadUpdate(f"states profile {profile.name!r}; the node joined as {member.profile.name!r}")
        if st.rank != profile.lora_rank:
            raise BadUpdate(f"states rank {st.rank}; profile {profile.name!r} has rank {profile.lora_rank}")
        m = self.cfg.model
        if m.adapter == "sparse":  # no LoRA factors, nothing scaled: a sparse delta merges as is (fedtune.sparse)
            return profile
        scale = rslora_scale(m.lora_alpha, st.rank) if m.use_rslora else lora_scale(m.lora_alpha, st.rank)
        if self.lora and (st.alpha != m.lora_alpha or st.rslora != m.use_rslora
                          or not math.isclose(st.scale, scale, rel_tol=1e-6)):
            raise BadUpdate(f"states alpha {st.alpha:g}, rslora {st.rslora}, scale {st.scale:g}; the run has "
                            f"alpha {m.lora_alpha:g}, rslora {m.use_rslora}, scale {scale:g} at rank {st.rank}")
        return profile

    def expected(self, node: int, st: Stated, sent: dict[str, Tensor]) -> Shapes:
        """The {name: shape} a client of the stated (and checked) profile and rank sends back."""
        profile = self._check_stated(node, st)
        reference = self.reference or {k: tuple(t.shape) for k, t in sent.items() if self._replied(k)}
        layers, head = split(reference)  # type: ignore[arg-type]  # shapes in place of tensors
        out: dict[str, tuple[int, ...]] = dict(head)  # type: ignore[arg-type]
        for layer in deepest(layers, profile.layers) if layers else ():
            parts = layers[layer]
            if "A" in parts and "lora_A" not in self.frozen:
                out[layer + A_SUFFIX] = (st.rank, parts["A"][1])
            if "B" in parts and "lora_B" not in self.frozen:
                out[layer + B_SUFFIX] = (parts["B"][0], st.rank)
        if self.cfg.model.adapter == "sparse":  # the decode screen's dense sparse deltas (fedtune.compression)
            out.update({k: tuple(t.shape) for k, t in sent.items() if k.startswith(wire.BASE)})
        return out

    def __call__(self, server_round: int, replies: list[Message], sent: Sent) -> tuple[list[Message], list[Rejected]]:
        kept: list[tuple[Message, float]] = []
        rejected: list[Rejected] = []
        for m in replies:
            node = m.metadata.src_node_id
            mine = sent.get(node, {})
            # float32 (the model's), or what the server sent (a decoded update is sent + delta; FedAdam's
            # global is float64)
            dtypes = tuple(dict.fromkeys([DTYPE, *(str(t.dtype).removeprefix("torch.") for t in mine.values())]))
            try:
                dec = decode_update(m.content, lambda st: self.expected(node, st, mine), dtypes)
            except BadUpdate as err:
                rejected.append(Rejected(m, str(err)))
                continue
            common = {k: t.double() - mine[k].double() for k, t in dec.tensors.items()
                      if k in mine and mine[k].shape == t.shape}
            kept.append((m, update_norm(common)))
        return self._cohort(kept, rejected)

    def _cohort(
        self, kept: list[tuple[Message, float]], rejected: list[Rejected]
    ) -> tuple[list[Message], list[Rejected]]:
        """Reject updates whose norm is far above the median of the others (3 or more)."""
        if len(kept) < 3 or math.isinf(self.ratio):
            return [m for m, _ in kept], rejected
        out = []
        for i, (m, norm) in enumerate(kept):
            med = statistics.median(n for j, (_, n) in enumerate(kept) if j != i)
            if med > 0 and norm > self.ratio * med:
                rejected.append(Rejected(m, f"update norm {norm:.4g} is {norm / med:.1f}x the median {med:.4g} "
                                            f"of the cohort (max-norm-ratio {self.ratio:g})"))
            else:
                out.append(m)
        return out, rejected


@SCREENS.register("validate")
def build_validate(cfg: RunConfig) -> Validator:
    return Validator(cfg)
