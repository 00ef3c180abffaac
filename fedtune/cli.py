"""The ``fedtune`` command. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Library chatter a user cannot act on (also inherited by Ray's worker processes).
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=FutureWarning)

from fedtune.errors import FedtuneError  # noqa: E402

Handler = Callable[[argparse.Namespace], int]


def _config_args(p: argparse.ArgumentParser) -> None:
    from fedtune.presets import summary

    p.add_argument("--preset", default="default", help=f"starting point (default: default): {summary()}")
    p.add_argument("--config", help="TOML file of flat keys, applied after the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key (repeatable)")


def _resolve(args: argparse.Namespace):
    from fedtune.config import parse_set
    from fedtune.presets import resolve

    return resolve(args.preset, args.config, parse_set(args.set))


def _default_out(kind: str) -> Path:
    from datetime import datetime

    return Path("runs") / f"{kind}-{datetime.now():%Y%m%d-%H%M%S}"


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.resume:  # the run's own config.json; nothing else may change it
        from fedtune.server.resume import resume_config

        cfg, out = resume_config(args.resume, args.config, args.set, args.out), Path(args.resume)
    else:
        cfg = _resolve(args)
        out = Path(args.out) if args.out else _default_out("sim")
    from fedtune.simulations.simulate import simulate

    f = cfg.federation
    print(
        f"fedtune: {f.strategy} on {cfg.data.dataset}, model {cfg.model.model}, {cfg.partition.num_clients} clients "
        f"({cfg.partition.partition}), {f.rounds} rounds -> {out}",
        file=sys.stderr,
    )
    summary = simulate(cfg, out, verbose=args.verbose, resume=bool(args.resume))
    print(
        f"done: accuracy {summary['initial_accuracy']:.4f} (round 0) -> {summary['final_accuracy']:.4f} "
        f"(round {summary['rounds']}), {summary['seconds_per_round']:.1f} s/round; adapter in {summary['adapter']}"
    )
    if "final_perplexity" in summary:  # task=causal-lm
        print(f"perplexity {summary['initial_perplexity']:.2f} (round 0) -> {summary['final_perplexity']:.2f}")
    return 0


def cmd_centralized(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    from fedtune.simulations.centralized import centralized

    out = Path(args.out) if args.out else _default_out("central")
    summary = centralized(cfg, out)
    print(f"done: centralized accuracy {summary['final_accuracy']:.4f} after {summary['steps']} steps; results in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtune.report import write_report

    html = write_report(Path(args.run_dir))
    print(f"report: {html}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of adapters with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a federation on Flower's simulation runtime")
    _config_args(p)
    p.add_argument("--out", help="run directory (default: runs/sim-TIMESTAMP)")
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("centralized", help="train the same adapter on the pooled data (the ceiling)")
    _config_args(p)
    p.add_argument("--out", help="output directory (default: runs/central-TIMESTAMP)")
    p.set_defaults(func=cmd_centralized)

    p = sub.add_parser("report", help="plots and a one-page HTML summary of a run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    for register in _plugins():
        register(sub)
    return parser


def _plugins() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands defined next to the code they drive (export, infer, ...)."""
    found = []
    for module in ("fedtune.edge_export.commands", "fedtune.deploy.commands"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        found.append(mod.register)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
