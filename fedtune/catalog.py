"""The names of every pluggable kind and what each can do: torch-free, flwr-free.

The one place a config is checked against (``fedtune.config`` per field, ``fedtune.compat``
across sections): strategies (``StrategyInfo``) and adapter kinds (``AdapterKindInfo``) carry the
flags compat reads. The implementations register under these names in their own modules
(strategies, adapter kinds, codecs, selections, tasks, robust aggregators, accountants);
tests/test_layering.py keeps each registry equal to its names here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedtune.errors import ConfigError

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
    dense: bool = False  # aggregates whole trainable states by a mean, with no LoRA factor maths (any dense adapter)
    secagg: str = ""  # "" = SecAgg+ composes (the weighted sum is all it needs); else why not
    client: str = "plain"  # the client recipe (fedtune.strategies.recipes): plain | shared-frozen-A | local-B

    @property
    def shapeless_codecs(self) -> bool:
        """``topk`` / ``dare`` need the shape of what the server sent: every trained part must be sent."""
        return set(self.trains) <= set(self.sends)


STRATEGIES: dict[str, StrategyInfo] = {s.name: s for s in (
    StrategyInfo("fedavg", dense=True, rank_aware=True, sparse=True, client_dp=True, robust=True),
    StrategyInfo("fedavgm", dense=True, rank_aware=False, robust=True),
    StrategyInfo("fedadam", dense=True, rank_aware=False, robust=True),
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


@dataclass(frozen=True)
class AdapterKindInfo:
    """What an adapter kind (``--set adapter=NAME``) is and what it composes with: the torch-free
    half of its ``fedtune.adapter_kinds.AdapterKind``. fedtune.compat reads these flags, never names;
    the federation layer resolves the names (``aggregation``, ``training``)."""

    name: str
    params: tuple[str, ...] = ()  # in the names of its trainable parameters (the rest is the head: head-lr)
    strategies: str = ""  # the StrategyInfo flag a strategy needs to aggregate it; "" = every strategy
    aggregation: str = "mean"  # what fedavg runs: mean (the strategy's own) | mask-aware (fedtune.strategies.sparse)
    training: str = "plain"  # the client's local run: plain (fedtune.training, DP-SGD) | sparse (fedtune.sparse.train)
    reply: str = "state"  # a train reply: state (the trainable tensors) | entries (chosen base-weight entries)
    factors: bool = False  # LoRA factors: replies state rank, alpha, scale, checked by the server
    profiles: bool = True  # clients of several profiles (ranks, layer sets, densities) in one run
    uniform_mean: bool = True  # aggregated as a mean of whole updates (client-level DP, canaries)
    base_quant: str = ""  # "" = trains on a quantized base (base-quant); else why not
    sample_dp: str = ""  # "" = DP-SGD (dp=sample) trains it; else why not


ADAPTERS: dict[str, AdapterKindInfo] = {a.name: a for a in (
    AdapterKindInfo("lora", params=("lora_",), factors=True),  # peft LoRA: fedtune.adapter_kinds.lora
    AdapterKindInfo("sparse", params=(".sparse_values",), strategies="sparse", aggregation="mask-aware", training="sparse", reply="entries",
                    uniform_mean=False, base_quant="trains entries of the base weights"),  # fedtune.sparse
    AdapterKindInfo("ia3", params=("ia3_",), strategies="dense", profiles=False,  # peft IA3 (Liu et al., 2022)
                    base_quant="rescales the base weights, merged on export; not wired for a quantized base",
                    sample_dp="opacus computes no per-example gradients for peft's IA3 vectors"),
)}
ADAPTER_KINDS = tuple(ADAPTERS)  # the names (fedtune.adapter_kinds.KINDS)
BUILTIN_ADAPTER_KINDS = ADAPTER_KINDS


def adapter_kind(name: str) -> AdapterKindInfo:
    """The catalog entry of adapter kind ``name``; an unknown name is a one-line ConfigError."""
    check_name("adapter", name, tuple(ADAPTERS))
    return ADAPTERS[name]


def add_adapter_kind(info: AdapterKindInfo) -> None:
    """Add a kind registered from outside fedtune (``fedtune.adapter_kinds.register_adapter_kind``)."""
    global ADAPTER_KINDS
    if info.name in ADAPTERS:
        raise ConfigError(f"adapter kind {info.name!r} exists already"
                          f"{' (built in)' if info.name in BUILTIN_ADAPTER_KINDS else ''}")
    ADAPTERS[info.name] = info
    ADAPTER_KINDS = tuple(ADAPTERS)
