"""Screens: every train reply passes them, in ``ORDER``, before the strategy aggregates it.

A screen takes the round, the replies still kept, and what the server sent each node this
round (``{node id: {name: tensor}}``), and returns the replies it keeps (possibly rewritten,
e.g. a compressed update decoded to dense tensors) and the ones it rejects, each with a
reason. ``Metered`` applies them (it stays outermost, so ``bytes_up`` is what crossed the
wire) and records every rejection in the round's ``rejected`` list in ``metrics.jsonl``; a
rejected reply never reaches the aggregation, so the global model is what the good replies
alone give. A screen may also keep a reply but change it (the validate screen clips an
absurd stated weight): it lists those in its ``notes`` (``Rejected`` records: the reply and
why), which ``Metered`` records in the round's ``adjusted`` list.

Screens are registered by name; ``build_screens`` returns the active ones in ``ORDER``:
``decode`` (compressed and sparse updates, fedtune.compression) before ``validate`` (keys,
shapes, ranks, dtypes, NaN/Inf, norms; fedtune.server.validate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Message
from torch import Tensor

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.registry import Registry

ORDER = ("decode", "validate")


class BadUpdate(FedtuneError):
    """A reply that must not be aggregated; ``str(err)`` is the reason recorded."""


@dataclass(frozen=True)
class Rejected:
    message: Message
    reason: str


Sent = dict[int, dict[str, Tensor]]  # {dst node id: the tensors the server sent it this round}
Screen = Callable[[int, list[Message], Sent], tuple[list[Message], list[Rejected]]]
# A builder returns the run's screen of that name, or None when the run does not need it.
SCREENS: Registry[Callable[[RunConfig], Screen | None]] = Registry("screen")


def build_screens(cfg: RunConfig, weight_caps: Sequence[int] | None = None) -> list[Screen]:
    """The run's active screens, in ``ORDER``. ``weight_caps``: each client's training examples,
    where the server knows them (simulation), for the screens that bound stated weights."""
    _load_builtin()
    out = []
    for name in ORDER:
        if name in SCREENS:
            screen = SCREENS.get(name)(cfg)
            if screen is not None:
                if hasattr(screen, "weight_caps"):
                    screen.weight_caps = weight_caps
                out.append(screen)
    return out


def per_reply(check: Callable[[Message, Sent], Message]) -> Screen:
    """A screen from a per-reply check that returns the (possibly rewritten) reply or raises
    ``BadUpdate(reason)``."""

    def screen(server_round: int, replies: list[Message], sent: Sent) -> tuple[list[Message], list[Rejected]]:
        kept, rejected = [], []
        for m in replies:
            try:
                kept.append(check(m, sent))
            except BadUpdate as err:
                rejected.append(Rejected(m, str(err)))
        return kept, rejected

    return screen


def _load_builtin() -> None:
    """Import the modules that register the built-in screens (each is optional until it exists)."""
    import importlib

    for module in ("fedtune.compression.screen", "fedtune.server.validate"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (module, module.rsplit(".", 1)[0]):
                raise
