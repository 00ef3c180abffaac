"""The ServerApp: builds the global adapter, runs the strategy, evaluates and records rounds."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtune import wire
from fedtune.config import RunConfig
from fedtune.data import load_dataset
from fedtune.tasks import task_of
from fedtune.adapters import set_base
from fedtune.modeling import load_trainable_state, shared_model, num_parameters, trainable_state
from fedtune.profiles import server_model
from fedtune.server.head import head_builder, init_head
from fedtune.server import checkpoint
from fedtune.server.metered import Metered
from fedtune.server.model_eval import evaluate_states, profiles_due
from fedtune.server.nodes import OrderedGrid, discover
from fedtune.server.screen import build_screens
from fedtune.server.views import save_views
from fedtune.sparse.layer import zero_deltas
from fedtune.server.resume import Offset, load_for_resume
from fedtune.artifacts import RunDir
from fedtune.strategies import build_strategy
from fedtune.strategies.rank_aware import rank_aware_of
from fedtune.strategies.recipes import recipe_for

_BOOKKEEPING = {wire.CLIENT_ID, wire.WEIGHT, *wire.ADAPTER_KEYS, wire.DEVICE_INDEX, wire.GPU_PEAK}
Progress = Callable[[dict[str, Any]], None]
PRIVACY_KEYS = ("epsilon", "epsilon_audit", "epsilon_audit_low", "epsilon_audit_high")


def print_progress(row: dict[str, Any]) -> None:
    line = (
        f"round {row['round']:>3}/{row['rounds']}  accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}"
        f"  up {row['bytes_up'] / 1e6:7.3f} MB  down {row['bytes_down'] / 1e6:7.3f} MB  {row['seconds']:6.1f} s"
    )
    if "perplexity" in row:
        line += f"  perplexity {row['perplexity']:.2f}"
    if row.get("failures"):
        line += f"  ({len(row['failures'])} failed)"
    if row.get("missing"):
        line += f"  (missing clients: {', '.join(str(c) for c in row['missing'])})"
    if not row.get("aggregated", True):
        line += "  (global model kept)"
    if row.get("rejected"):
        line += f"  ({len(row['rejected'])} rejected: " + "; ".join(r["reason"] for r in row["rejected"]) + ")"
    if row.get("adjusted"):
        line += f"  ({len(row['adjusted'])} adjusted: " + "; ".join(r["reason"] for r in row["adjusted"]) + ")"
    print(line, file=sys.stderr, flush=True)


def run_federation(
    grid: Grid, cfg: RunConfig, run: RunDir, progress: Progress = print_progress, resume: bool = False,
    weight_caps: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The whole federated run; returns the summary it also writes to the run directory.
    After every round a checkpoint goes to ``run/checkpoint``; ``resume`` continues from it.
    ``weight_caps``: each client's training examples where the server knows them (simulation):
    no reply may state more (fedtune.server.validate)."""
    ds = load_dataset(cfg.data)
    shared = shared_model(server_model(cfg), ds.num_labels, seed=cfg.federation.seed)  # profiles: the largest rank
    model = shared.reset()
    recipe_for(cfg.federation.strategy).initialize(model, cfg.federation.seed)  # ffa: the shared frozen A
    trainable, total = num_parameters(model)
    evaluator = task_of(cfg).evaluator(cfg, run.path)  # classify: TestEvaluator; causal-lm: perplexity + generations
    secure = cfg.federation.secure_aggregation != "none"  # the server sees only the sum: no per-reply screens
    strategy = Metered(build_strategy(cfg), seed=cfg.federation.seed,
                       screens=[] if secure else build_screens(cfg, weight_caps),
                       min_replies=min(cfg.federation.min_train_nodes, cfg.partition.num_clients))
    if secure:  # Flower's SecAgg+ around the metered strategy (fedtune.server.secagg)
        from fedtune.server.secagg import secagg_of

        strategy = secagg_of(strategy, cfg)
    rank_aware = rank_aware_of(strategy)
    clock = {"t": time.perf_counter()}
    ckpt = load_for_resume(run.path, cfg.federation.rounds) if resume else None
    if ckpt:
        checkpoint.restore_strategy(strategy, ckpt.tensors, ckpt.meta)
        checkpoint.restore_clients(ckpt, cfg.federation.client_state_dir)  # fedsa's personal B, as of that round
    latest: dict[str, ArrayRecord] = {}  # the global arrays last evaluated: the run's result

    def model_states(arrays: ArrayRecord) -> dict[str, tuple[dict, dict]]:
        """{'': the global model, 'rank_r': each profile's model}: (base deltas, trainable)."""
        return rank_aware.model_states(arrays) if rank_aware else {"": wire.split_base(wire.from_record(arrays))}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        def load(base: dict, state: dict) -> None:
            set_base(model, base)
            load_trainable_state(model, state)

        states = model_states(arrays)
        if not profiles_due(server_round, cfg.federation.rounds, cfg.federation.profile_eval_every):
            states = {"": states[""]}  # the global model only this round
        results = evaluate_states(states, load, lambda: evaluator(model))  # the global model last
        res = results.pop("")
        evaluator.end_round(server_round, model)  # the global model is loaded last (causal-lm: generations)
        stats = strategy.rounds.get(server_round)
        now = time.perf_counter()
        row = {
            "round": server_round,
            "rounds": cfg.federation.rounds,
            "accuracy": res["accuracy"],
            "loss": res["loss"],
            "bytes_up": stats.bytes_up if stats else 0,
            "bytes_down": stats.bytes_down if stats else 0,
            "seconds": now - clock["t"],
            "clients": stats.replied if stats else 0,
            "failures": stats.failures if stats else [],
            "rejected": stats.rejected if stats else [],
            "adjusted": stats.adjusted if stats else [],  # replies kept but changed (a clipped weight)
            "missing": stats.missing if stats else [],  # sampled clients whose good reply never came
            "aggregated": stats.aggregated if stats else server_round == 0,
        }
        if stats and stats.note:
            row["note"] = stats.note
        if stats and stats.clients:
            row["client_devices"] = stats.clients  # each replying client's profile, device and GPU peak
        row.update({k: v for k, v in res.items() if k not in row and k != "num_examples"})  # e.g. perplexity
        for key, r in results.items():  # per profile (rank group), on the same test slice
            row.update({f"accuracy_{key}": r["accuracy"], f"loss_{key}": r["loss"]})
        if stats:
            row.update({k: v for k, v in stats.train.items() if k not in _BOOKKEEPING})
            row.update({f"client_{k}": v for k, v in stats.client_eval.items() if k not in _BOOKKEEPING})
        clock["t"] = now
        run.append_metrics(row)
        checkpoint.save(run.path, server_round, arrays, strategy, cfg.federation.client_state_dir)  # after the row
        latest["arrays"] = arrays
        progress(row)
        return MetricRecord({"accuracy": res["accuracy"], "loss": res["loss"]})

    run_config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json()})
    started = time.perf_counter()
    timeout = cfg.federation.round_timeout
    grid = OrderedGrid(grid, discover(grid, cfg.partition.num_clients, timeout, cfg))
    if cfg.train.head_init != "random" and not ckpt:  # ncm | ridge: fedtune/head_init.py
        per_node = None
        if rank_aware:  # each node gets the server's initial adapter at its own rank
            per_node = lambda node, arrays: rank_aware.node_arrays(arrays, grid.members[node].profile)  # noqa: E731
        strategy.rounds[0] = init_head(grid, model, run_config, head_builder(cfg), timeout, per_node)
    offset = Offset(strategy, ckpt.round if ckpt else 0)  # resumed: rounds keep their true numbers
    offset.start(
        grid=grid,
        initial_arrays=ckpt.arrays if ckpt else wire.to_record({**trainable_state(model), **zero_deltas(model)}),
        num_rounds=cfg.federation.rounds - offset.done,
        timeout=timeout,
        train_config=run_config,
        evaluate_config=ConfigRecord(dict(run_config)),
        evaluate_fn=offset.evaluate_fn(evaluate_fn),
    )
    base, state = model_states(latest.get("arrays") or ckpt.arrays)[""]
    set_base(model, {})  # the adapter is saved on the original base; base deltas go beside it
    load_trainable_state(model, state)
    adapter_dir = run.save_adapter(model, ds.label_names, base)  # FLoRA / FedEx-LoRA / FlexLoRA: W = W0 + delta
    set_base(model, base)
    rows = run.metrics()
    try:  # each profile's and each personal client's final model, for export (fedtune.server.views)
        save_views(run.path, cfg, rank_aware, latest.get("arrays") or ckpt.arrays,
                   [m.profile for m in grid.members.values()], rows[-1]["round"])
    except Exception as exc:  # noqa: BLE001 - the run's results stand; export says what is missing
        print(f"fedtune: warning: the model views were not written ({type(exc).__name__}: {exc})"[:300],
              file=sys.stderr, flush=True)
    summary = {
        "final_accuracy": rows[-1]["accuracy"],
        "initial_accuracy": rows[0]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "rounds": cfg.federation.rounds,
        "seconds": time.perf_counter() - started,
        "seconds_per_round": sum(r["seconds"] for r in rows[1:]) / max(1, len(rows) - 1),
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter": str(adapter_dir),
        "eval_examples": len(evaluator.enc),
    }
    for key in PRIVACY_KEYS:  # the accountant's epsilon and the audit's estimate, as of the last round
        if key in rows[-1]:
            summary[key] = rows[-1][key]
    if "perplexity" in rows[0]:  # causal-lm
        summary.update(initial_perplexity=rows[0]["perplexity"], final_perplexity=rows[-1]["perplexity"])
    run.write_summary(summary)
    return summary


def make_server_app(
    cfg: RunConfig, run: RunDir, progress: Progress = print_progress, resume: bool = False,
    weight_caps: Sequence[int] | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run, progress, resume, weight_caps)

    return app
