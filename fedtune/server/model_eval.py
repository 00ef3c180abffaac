"""Server evaluation of several model states (the global model and, with mixed ranks, the model
each profile runs), each distinct state evaluated once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

State = tuple[Mapping[str, Tensor], Mapping[str, Tensor]]  # (base deltas, trainable tensors)


def state_digest(*parts: Mapping[str, Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes: equal digests = bit-equal states."""
    h = hashlib.blake2b(digest_size=16)
    for i, part in enumerate(parts):
        for name in sorted(part):
            t = part[name].detach().cpu().contiguous()
            h.update(f"{i}/{name}/{t.dtype}/{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def profiles_due(server_round: int, rounds: int, every: int) -> bool:
    """Whether each profile's model is evaluated after ``server_round`` (``profile-eval-every``):
    every ``every`` rounds (round 0 included) and at the last; ``every`` = 0: the last only."""
    return server_round == rounds or (every > 0 and server_round % every == 0)


def evaluate_states(states: Mapping[str, State], load: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], None],
                    evaluate: Callable[[], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{key: evaluate() with that state loaded}, loading every state in order (the last one
    stays loaded) but evaluating a state bit-equal to an earlier one only once: under
    zero-padding the top rank's model is the global model, and evaluating it twice on a
    2,000-example slice costs a fifth of a mixed-rank round's evaluation for nothing."""
    seen: dict[str, dict[str, Any]] = {}
    out = {}
    for key, (base, state) in states.items():
        load(base, state)
        sig = state_digest(base, state)
        if sig not in seen:
            seen[sig] = evaluate()
        out[key] = dict(seen[sig])
    return out
