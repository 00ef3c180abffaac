"""``fedtune certs``, ``fedtune serve``, ``fedtune join`` (docs/deploying.md) and ``fedtune app``
(a Flower App for ``flwr run``, docs/api.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from fedtune.cli import _config_args

    p = sub.add_parser("certs", help="a self-signed CA, the SuperLink's TLS certificate and node key pairs (tests)")
    p.add_argument("out_dir")
    p.add_argument("--nodes", type=int, default=3, help="node key pairs node-<i>.key/.pub to make (default 3)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP the SuperLink is reached at (repeatable; localhost is always in)")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("serve", help="start a SuperLink (TLS, node authentication) and run a federation on it")
    _config_args(p)
    p.add_argument("--certs", required=True, metavar="DIR", help="folder from 'fedtune certs' (ca.pem, server.*)")
    p.add_argument("--address", default="127.0.0.1:9093", help="HOST:PORT to listen on (default 127.0.0.1:9093)")
    p.add_argument("--node-key", action="append", default=[], metavar="PUB",
                   help="public key of a SuperNode to let in (repeatable; default: every node-*.pub in --certs)")
    p.add_argument("--out", help="run directory (default: runs/deploy-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("join", help="run this machine's SuperNode: its partition, device profile and data")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--ca", required=True, help="CA certificate that signed the SuperLink's (ca.pem)")
    p.add_argument("--key", required=True, help="this node's private key (its .pub registered with the SuperLink)")
    p.add_argument("--partition-id", type=int, required=True, help="this node's client id in the run")
    p.add_argument("--profile", default="auto", help="device profile: auto (from the hardware) or a built-in name")
    p.add_argument("--data", default="", help="a bundled dataset name or a local .csv/.tsv (default: the run's)")
    p.add_argument("--device", default="", help="where this node trains: auto, cpu, cuda, cuda:N (default: the run's)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for training (default: this machine's cores; several nodes on one "
                        "machine: cores / nodes)")
    p.add_argument("--state-dir", help="this node's Flower home (default ~/.fedtune/node-ID)")
    p.add_argument("--runtime-port", type=int, default=0, help="local port of the SuperNode's app API (default: free)")
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("app", help="write a Flower App (pyproject.toml) that runs this config with 'flwr run DIR'")
    p.add_argument("app_dir", help="the app folder to write (its pyproject.toml is replaced)")
    _config_args(p)
    p.add_argument("--out", help="run directory the ServerApp writes (default: runs/app-<folder name>, absolute)")
    p.add_argument("--num-supernodes", type=int, default=None,
                   help="virtual SuperNodes of the local-simulation federation (default: num-clients)")
    p.set_defaults(func=cmd_app)


def cmd_certs(args: argparse.Namespace) -> int:
    from fedtune.deploy.certs import make_credentials

    creds = make_credentials(args.out_dir, args.nodes, args.host)
    print(f"wrote {creds.ca.name}, {creds.server_cert.name}/{creds.server_key.name} and {args.nodes} node key pairs "
          f"to {creds.folder} (a test CA: keep ca.key and node-*.key private)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from datetime import datetime

    from fedtune.cli import _resolve
    from fedtune.deploy.certs import Credentials
    from fedtune.deploy.serve import ServeOptions, check_inputs, serve

    if args.resume:  # the run's own config.json; nothing else may change it
        from fedtune.server.resume import resume_config

        cfg, out = resume_config(args.resume, args.config, args.set, args.out), Path(args.resume)
    else:
        cfg = _resolve(args)
        out = Path(args.out) if args.out else Path("runs") / f"deploy-{datetime.now():%Y%m%d-%H%M%S}"
    opts = ServeOptions(address=args.address, node_keys=tuple(Path(k) for k in args.node_key))
    creds = Credentials(Path(args.certs))
    check_inputs(creds, opts)
    print(f"fedtune: {cfg.federation.strategy}, {cfg.partition.num_clients} SuperNodes, {cfg.federation.rounds} rounds "
          f"-> {out}", file=sys.stderr)
    summary = serve(cfg, out, creds, opts, resume=bool(args.resume))
    print(f"done: accuracy {summary['initial_accuracy']:.4f} (round 0) -> {summary['final_accuracy']:.4f} "
          f"(round {summary['rounds']}), {summary['seconds_per_round']:.1f} s/round; adapter in {summary['adapter']}")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from fedtune.deploy.join import JoinOptions, join

    join(JoinOptions(superlink=args.superlink, ca=Path(args.ca), key=Path(args.key), partition_id=args.partition_id,
                     profile=args.profile, data=args.data, device=args.device, threads=args.threads,
                     state_dir=Path(args.state_dir) if args.state_dir else None, runtime_port=args.runtime_port))
    return 0  # not reached: join() becomes the SuperNode


def cmd_app(args: argparse.Namespace) -> int:
    from fedtune.cli import _resolve
    from fedtune.deploy.app_dir import LOCAL_FEDERATION, write_user_app
    from fedtune.errors import ConfigError

    cfg = _resolve(args)
    if args.num_supernodes is not None and args.num_supernodes < 1:
        raise ConfigError(f"bad --num-supernodes {args.num_supernodes}: must be >= 1")
    folder = Path(args.app_dir)
    out = Path(args.out) if args.out else Path("runs") / f"app-{folder.resolve().name}"
    write_user_app(folder, cfg, out.resolve(), args.num_supernodes)
    print(f"wrote {folder / 'pyproject.toml'}: {cfg.federation.strategy}, {cfg.partition.num_clients} clients, "
          f"{cfg.federation.rounds} rounds -> {out.resolve()}\n"
          f"run it: FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run {folder}  (local simulation, "
          f"federation {LOCAL_FEDERATION})\n"
          f"    or: flwr run {folder} MY-SUPERLINK  (SuperNodes started with --node-config 'partition-id=N')")
    return 0
