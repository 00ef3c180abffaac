"""Secure aggregation (``secure-aggregation=secagg+``) on Flower's own SecAgg+.

Flower 1.41 ships SecAgg+ (Bell et al., CCS 2020) for its *legacy* workflow API only:
``flwr.server.workflow.SecAggPlusWorkflow`` drives the four stages (setup, share keys,
collect masked vectors, unmask) through the Grid and hands the unmasked weighted average to
a legacy ``flwr.server.strategy.Strategy`` (``configure_fit`` / ``aggregate_fit``); the
clients run ``flwr.client.mod.secaggplus_mod``. fedtune's strategies are Message-API ones,
so ``SecAggPlus`` bridges the two without any cryptography of its own:

- ``configure_train`` lets the wrapped strategy (``Metered`` around the run's strategy) sample
  and build its train messages as usual, keeps them, and returns none: Flower's round loop
  sends nothing directly;
- ``aggregate_train`` runs ``SecAggPlusWorkflow`` through the Grid with a ``LegacyContext``
  whose legacy strategy (``_Bridge``) turns the kept messages into ``FitIns`` (their arrays,
  their config, the array names) and receives, in ``aggregate_fit``, only the unmasked
  weighted average;
- the wrapped strategy then aggregates one pseudo-reply per surviving client, each carrying
  that same average and the client's stated weight and metrics, exactly as Flower's own
  workflow does for legacy strategies ("backward compatibility with Strategy"). A weighted
  mean of identical arrays is the array, so FedAvg / FedAvgM / FedAdam / FFA apply their
  server step to the secure average, and no individual update ever reaches strategy code.

The client side is ``fedtune.client.secagg.secagg_mod``. A round whose protocol halts (fewer
surviving neighbours than the reconstruction threshold) releases nothing: the global model
is kept and the round records why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import wire

KEYS = "fedtune-keys"  # FitIns config / FitRes metrics key: the names of the arrays, in order
PROFILE = "fedtune-profile"  # FitRes metrics key: the reply's stated profile
TrainResult = tuple[ArrayRecord | None, MetricRecord | None]


class _Proxy:
    """What SecAggPlusWorkflow needs of a ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


class _Bridge(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow talks to: fit instructions from fedtune's train
    messages out, the unmasked average (and each survivor's stated weight and metrics) in."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.keys: list[str] = []
        self.average: list[np.ndarray] | None = None
        self.stated: list[tuple[int, int, dict[str, Any]]] = []  # (node id, weight, metrics) per survivor

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        out = []
        for m in self.messages:
            record = m.content[wire.ARRAYS]
            keys = list(record.keys())
            params = ndarrays_to_parameters([record[k].numpy() for k in keys])
            config = {k: v for k, v in m.content[wire.CONFIG].items()}
            config[KEYS] = json.dumps(keys)
            out.append((_Proxy(m.metadata.dst_node_id), FitIns(params, config)))
        return out

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)  # the same for every result
            self.stated = [(proxy.node_id, int(res.num_examples), dict(res.metrics)) for proxy, res in results]
            names = {str(met.get(KEYS)) for _, _, met in self.stated}
            self.keys = json.loads(names.pop()) if len(names) == 1 else []  # the reply's names; all must agree
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        return None


class _MeteredGrid:
    """The Grid, counting what the protocol's messages carry each way."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.down = 0
        self.up = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.down += sum(message_bytes(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(message_bytes(m) for m in replies if not m.has_error())
        return replies


def message_bytes(m: Message) -> int:
    """Array payloads plus config values, bytes (keys, shares, ciphertexts, masked vectors) at their length."""
    n = sum(wire.record_bytes(r) for r in m.content.array_records.values())
    for rec in m.content.config_records.values():
        for k, v in rec.items():
            items = v if isinstance(v, list) else [v]
            n += len(str(k)) + sum(len(x) if isinstance(x, bytes) else len(str(x)) for x in items)
    return n


class SecAggPlus(Strategy):
    """Runs each round's training through Flower's SecAgg+ (see the module docstring).
    ``inner`` is ``Metered`` (so rounds are still metered and recorded)."""

    def __init__(self, inner: Strategy, *, shares: int | float, threshold: int | float, clipping_range: float,
                 quantization_range: int, max_weight: float, timeout: float | None) -> None:
        from flwr.server.workflow import SecAggPlusWorkflow

        self.inner = inner
        self.workflow_args = dict(num_shares=shares, reconstruction_threshold=threshold, max_weight=max_weight,
                                  clipping_range=clipping_range, quantization_range=quantization_range,
                                  timeout=timeout)
        try:
            SecAggPlusWorkflow(**self.workflow_args)  # Flower's own argument checks, at build time
        except ValueError as err:
            from fedtune.errors import ConfigError

            raise ConfigError(f"bad value secure-aggregation='secagg+': {err}") from None
        self._messages: list[Message] = []
        self._grid: Grid | None = None
        self._arrays: ArrayRecord | None = None

    @property
    def rounds(self) -> dict:
        return self.inner.rounds  # type: ignore[attr-defined]

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._grid, self._arrays = grid, arrays
        return []  # sent by the protocol, in aggregate_train

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        assert self._grid is not None and self._arrays is not None
        bridge = _Bridge(self._messages)
        state = RecordDict({MAIN_PARAMS_RECORD: self._arrays,
                            MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round})})
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                                strategy=bridge)
        grid = _MeteredGrid(self._grid)
        if self._messages:
            SecAggPlusWorkflow(**self.workflow_args)(grid, context)  # type: ignore[arg-type]
        stats = self.rounds.get(server_round)
        pseudo = self._pseudo_replies(bridge)
        arrays, metrics = self.inner.aggregate_train(server_round, pseudo)
        if stats is not None:
            stats.bytes_up, stats.bytes_down = grid.up, grid.down  # the protocol's four exchanges, both ways
            if bridge.average is None:
                stats.aggregated = False
                stats.note = (f"secure aggregation halted: fewer surviving clients than the reconstruction threshold "
                              f"({len(self._messages)} sampled): global model kept")
        return arrays, metrics

    def _pseudo_replies(self, bridge: _Bridge) -> list[Message]:
        """One reply per surviving client: the secure average under its own stated weight and metrics."""
        if bridge.average is None:
            return []
        if len(bridge.average) != len(bridge.keys) or not all(np.isfinite(a).all() for a in bridge.average):
            bridge.average = None  # the screens that still apply: shapes and a finite sum
            return []
        avg = dict(zip(bridge.keys, bridge.average))
        masks = self._sparse(avg)  # sparse layers: the mask-aware mean from the averaged deltas and masks
        dtypes = {k: self._arrays[k].numpy().dtype for k in avg}  # type: ignore[index]
        average = ArrayRecord({k: Array(np.asarray(a, dtype=dtypes[k])) for k, a in avg.items()})
        by_node = {m.metadata.dst_node_id: m for m in self._messages}
        out = []
        for node, weight, metrics in bridge.stated:
            met = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            met[wire.WEIGHT] = weight
            content = RecordDict({wire.ARRAYS: ArrayRecord(dict(average.items())), wire.METRICS: MetricRecord(met)})
            if masks:
                content[wire.MASKS] = wire.to_record(masks)
            if PROFILE in metrics:
                content[wire.ADAPTER] = ConfigRecord({wire.PROFILE: str(metrics[PROFILE])})
            out.append(Message(content=content, reply_to=by_node[node]))
        return out

    def _sparse(self, avg: dict[str, np.ndarray]) -> dict:
        """Sparse layers (in place): from the secure averages of the masked deltas D = sum w m d / sum w and
        of the masks M = sum w m / sum w, the mask-aware mean sent + D / M where some client trained an
        entry (M > 0: an untrained entry sums exact zeros), the sent value elsewhere; returns {key: the
        trained entries' flat indices} for the strategy's mask-aware mean (fedtune.strategies.sparse)."""
        import torch

        from fedtune.client.secagg import MASK

        masks = {}
        for name in [k for k in avg if k.startswith(MASK)]:
            key, share = name[len(MASK):], avg.pop(name)
            sent = self._arrays[key].numpy().astype(np.float64)  # type: ignore[index]
            trained = share > 0
            avg[key] = np.where(trained, sent + avg[key] / np.where(trained, share, 1.0), sent)
            masks[key] = torch.from_numpy(np.flatnonzero(trained).astype(np.int64))
        return masks

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def quantization_error(weights: list[float], *, clipping_range: float, quantization_range: int,
                       max_weight: float, max_abs: float) -> float:
    """An upper bound on |secure average - plain weighted mean| per entry (values within the
    clipping range): each client's w_i / W-scaled values are stochastically rounded to a grid of
    step 2R / Q (error < one step each), the sum is divided by sum_i r_i (r_i = w_i / W rounded
    to 1 / Q), and the rounded weights move the mean by at most max|x| sum_i |r_i - w_i/W| / sum_i r_i."""
    step = 2 * clipping_range / quantization_range
    ratios = [round(w / max_weight * quantization_range) / quantization_range for w in weights]
    total = sum(ratios)
    weight_error = sum(abs(r - w / max_weight) for r, w in zip(ratios, weights))
    return (len(weights) * step + 2 * max_abs * weight_error) / total


def secagg_of(strategy: Strategy, cfg: Any) -> SecAggPlus:
    """``strategy`` (Metered) run through SecAgg+ with the run's knobs."""
    fed = cfg.federation
    shares = fed.secagg_shares if fed.secagg_shares <= 1 else int(fed.secagg_shares)
    threshold = fed.secagg_threshold if fed.secagg_threshold < 1 else int(fed.secagg_threshold)
    # client-level DP: every client states weight 1 (a uniform mean, as the noise assumes), so the
    # protocol's weight scale is 1 and no quantization resolution is spent on it
    max_weight = 1.0 if cfg.privacy.client_level else fed.secagg_max_weight
    return SecAggPlus(strategy, shares=shares, threshold=threshold, clipping_range=fed.secagg_clipping_range,
                      quantization_range=fed.secagg_quantization_range, max_weight=max_weight,
                      timeout=fed.round_timeout)
