"""The names of every pluggable kind and what each can do: torch-free, flwr-free.

The one place a config is checked against (``fedtune.config`` per field, ``fedtune.compat``
across sections). The implementations register under these names in their own modules
(strategies, adapter kinds, codecs, selections, tasks, robust aggregators, accountants);
tests/test_layering.py keeps each registry equal to its names here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedtune.errors import ConfigError

ADAPTER_KINDS = ("lora", "sparse")  # fedtune.adapter_types
SELECTIONS = ("magnitude", "random", "ks")  # sparse entry selection: fedtune.sparse.select
CODECS = ("none", "fp16", "int8", "int8-row", "topk", "dare")  # fedtune.compression.codecs
SHAPELESS = ("topk", "dare")  # codecs that need the shape of what the server sent
TASKS = ("classify", "causal-lm")  # fedtune.tasks
ROBUST = ("none", "norm-bound", "median", "trimmed-mean")  # fedtune.strategies.robust
ACCOUNTANTS = ("rdp", "prv")  # fedtune.privacy.accountant (opacus' mechanisms)
BASE_DTYPES = ("float32", "bfloat16", "float16")
BASE_QUANTS = ("none", "nf4", "int8")
DP_MODES = ("none", "sample", "client-fixed", "client-adaptive")
WEIGHT_BOUNDS = ("clip", "reject")  # what the validate screen does with an example count above its bound
SECURE_AGGREGATIONS = ("none", "secagg+")

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_name(kind: str, name: str, names: tuple[str, ...]) -> None:
    """``name`` among ``names``, else the one-line error a fedtune Registry gives for ``kind``."""
    if name not in names:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(names))}")


def check_device(key: str, value: str) -> None:
    """A device request's syntax only (a config may be written on one machine and run on another)."""
    if not _DEVICE.fullmatch(value):
        raise ConfigError(f"bad value {key}={value!r}: must be auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class StrategyInfo:
    """What a strategy is and what it composes with: the torch-free half of its StrategySpec
    (fedtune.strategies.specs adds the class, the math and the client recipe)."""

    name: str
    rank_aware: bool  # aggregates clients of several LoRA ranks / layer sets (fedtune.strategies.hetero)
    sends: tuple[str, ...] = ("A", "B")  # adapter parts the server sends down
    trains: tuple[str, ...] = ("A", "B")  # adapter parts the clients train and send up
    sparse: bool = False  # aggregates sparse adapters (the mask-aware mean)
    client_dp: bool = False  # Flower's client-level DP wrappers (a uniform mean of clipped updates)
    robust: bool = False  # its aggregate is a mean of same-shape updates (fedtune.strategies.robust)
    secagg: str = ""  # "" = SecAgg+ composes (the weighted sum is all it needs); else why not
    client: str = "plain"  # the client recipe (fedtune.strategies.recipes): plain | shared-frozen-A | local-B

    @property
    def shapeless_codecs(self) -> bool:
        """``topk`` / ``dare`` need the shape of what the server sent: every trained part must be sent."""
        return set(self.trains) <= set(self.sends)


STRATEGIES: dict[str, StrategyInfo] = {s.name: s for s in (
    StrategyInfo("fedavg", rank_aware=True, sparse=True, client_dp=True, robust=True),
    StrategyInfo("fedavgm", rank_aware=False, robust=True),
    StrategyInfo("fedadam", rank_aware=False, robust=True),
    StrategyInfo("hetlora", rank_aware=True, secagg="it zero-pads and prunes per client rank"),
    StrategyInfo("flexlora", rank_aware=True, secagg="it takes the SVD of each client's product B A"),
    StrategyInfo("flora", rank_aware=True, sends=(), secagg="it stacks the clients' factors"),
    StrategyInfo("ffa", rank_aware=True, sends=("B",), trains=("B",), client="shared-frozen-A"),
    StrategyInfo("fedsa", rank_aware=True, sends=("A",), secagg="it keeps per-group B matrices from individual replies",
                 client="local-B"),
    StrategyInfo("fedex", rank_aware=True, secagg="it needs each client's factors for the residual"),
)}


def strategies_where(flag: str) -> tuple[str, ...]:
    """The strategy names (in catalog order) whose ``flag`` holds (``secagg``: composes)."""
    if flag == "secagg":
        return tuple(n for n, s in STRATEGIES.items() if not s.secagg)
    return tuple(n for n, s in STRATEGIES.items() if getattr(s, flag))
