"""A stateful privacy accountant for one client, cumulative over rounds and restarts.

A thin layer over opacus' accountants (RDP, PRV), created through opacus' own registry.
Its whole state is the list of (noise multiplier, sample rate, steps) it has seen, so
``state_dict()`` is plain JSON and an accountant restored from it reports the same epsilon.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fedtune.registry import Registry

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

ACCOUNTANTS: Registry[Callable[[], IAccountant]] = Registry("privacy accountant")


def _opacus_factory(mechanism: str) -> Callable[[], IAccountant]:
    def create() -> IAccountant:
        from opacus.accountants import create_accountant  # imported on use: opacus is slow to import

        return create_accountant(mechanism=mechanism)

    return create


for _name in ("rdp", "prv"):
    ACCOUNTANTS.register(_name)(_opacus_factory(_name))

STATE_VERSION = 1
Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class PrivacyAccountant:
    """Epsilon spent so far by one client's DP-SGD steps (Poisson-subsampled Gaussian)."""

    def __init__(self, mechanism: str = "rdp") -> None:
        self._acc: IAccountant = ACCOUNTANTS.get(mechanism)()
        if self._acc.mechanism() != mechanism:  # pragma: no cover - guards a changed opacus registry
            raise RuntimeError(f"opacus created a {self._acc.mechanism()!r} accountant for {mechanism!r}")

    # -- what has been spent -------------------------------------------------------------
    @property
    def mechanism(self) -> str:
        return self._acc.mechanism()

    @property
    def history(self) -> list[Entry]:
        return [tuple(e) for e in self._acc.history]  # type: ignore[misc]

    @property
    def steps(self) -> int:
        """Total DP-SGD steps accounted so far (all rounds)."""
        return sum(int(s) for _, _, s in self._acc.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Account ``steps`` more steps; consecutive identical (sigma, q) merge into one entry."""
        _check_entry((noise_multiplier, sample_rate, steps), where="step")
        for _ in range(steps):
            self._acc.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step; inf after a step without noise)."""
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not self._acc.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self._acc.history):
            return math.inf
        import numpy as np

        with np.errstate(divide="ignore"):  # opacus' PRV at sample rate 1 takes log(0) = -inf, on purpose
            return float(self._acc.get_epsilon(delta=delta))

    def projected_epsilon(self, delta: float, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps at (sigma, q), without recording them."""
        future = self.copy()
        future.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return future.epsilon(delta)

    def copy(self) -> PrivacyAccountant:
        out = PrivacyAccountant(self.mechanism)
        out._acc.history = copy.deepcopy(self._acc.history)
        return out

    def optimizer_hook(self, sample_rate: float) -> Callable[[Any], None]:
        """A DPOptimizer step hook that accounts one step at the optimizer's noise multiplier."""

        def hook(optimizer: Any) -> None:
            q = sample_rate * optimizer.accumulated_iterations
            self.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=q)

        return hook

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: {'version', 'mechanism', 'history': [[sigma, q, steps], ...]}."""
        return {
            "version": STATE_VERSION,
            "mechanism": self.mechanism,
            "history": [[float(n), float(q), int(s)] for n, q, s in self._acc.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this accountant's history with a saved one, after validating it.

        Raises ValueError on a wrong mechanism, an unknown version or a malformed entry;
        on error the current history is left untouched."""
        if not isinstance(state, Mapping):
            raise ValueError(f"accountant state must be a mapping, got {type(state).__name__}")
        missing = {"mechanism", "history"} - state.keys()
        if missing:
            raise ValueError(f"accountant state lacks {sorted(missing)}")
        version = state.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"accountant state version {version!r} is not supported (expected {STATE_VERSION})")
        if state["mechanism"] != self.mechanism:
            raise ValueError(
                f"accountant state is for mechanism {state['mechanism']!r}, cannot load it into {self.mechanism!r}"
            )
        history = state["history"]
        if not isinstance(history, (list, tuple)):
            raise ValueError(f"accountant history must be a list, got {type(history).__name__}")
        entries = [_check_entry(e, where=f"history[{i}]") for i, e in enumerate(history)]
        self._acc.history = entries

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        if not isinstance(state, Mapping) or "mechanism" not in state:
            raise ValueError("accountant state must be a mapping with a 'mechanism'")
        out = cls(str(state["mechanism"]))
        out.load_state_dict(state)
        return out

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self.mechanism!r}, steps={self.steps}, history={self.history})"


def _check_entry(entry: Any, where: str) -> Entry:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ValueError(f"accountant {where}: expected [noise_multiplier, sample_rate, steps], got {entry!r}")
    sigma, q, steps = entry
    for name, x in (("noise_multiplier", sigma), ("sample_rate", q)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"accountant {where}: {name} must be a finite number, got {x!r}")
    if sigma < 0:
        raise ValueError(f"accountant {where}: noise_multiplier must be >= 0, got {sigma!r}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"accountant {where}: sample_rate must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"accountant {where}: steps must be an integer >= 1, got {steps!r}")
    return float(sigma), float(q), int(steps)
