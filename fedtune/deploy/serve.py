"""``fedtune serve``: a SuperLink with TLS and node authentication, the run submitted to it
with ``flwr run``, followed until it finishes.

Layout under the run directory: the usual ``config.json``, ``metrics.jsonl``, ``adapter/``,
``summary.json`` (written by the ServerApp, a subprocess of the SuperLink), and
``superlink/``: the generated app folder, the ``flwr`` CLI's home and the SuperLink's log.
The SuperLink keeps its state in memory (Flower's default): a SQLite file cost it ~4 CPU-s
per round, taken from the nodes when they share the machine; a resumed run starts a fresh
SuperLink from fedtune's own checkpoint either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.deploy import processes as P
from fedtune.deploy.app_dir import CONNECTION, write_app, write_connection
from fedtune.deploy.certs import Credentials
from fedtune.deploy.checks import check_public_key, check_server_files, require_files
from fedtune.deploy.errors import DeployError
from fedtune.server.app import print_progress
from fedtune.artifacts import SUMMARY, RunDir

STATE_DIR = "superlink"
POLL_S = 10.0  # first wait between run-status checks (each is a `flwr ls` process: ~1.4 CPU-s)
POLL_ROUND_S = 30.0  # the first wait after a round's end (the run is known to be alive)
POLL_MAX_S = 60.0  # the wait doubles while no round ends, up to this
FINISH_GRACE_S = 30.0


@dataclass(frozen=True)
class ServeOptions:
    address: str = "127.0.0.1:9093"  # where the SuperLink listens (all its APIs, HTTPS)
    node_keys: tuple[Path, ...] = ()  # public keys of the SuperNodes allowed in; () = certs/node-*.pub
    ready: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))


class SuperLink:
    """A running ``flower-superlink`` and the ``flwr`` CLI set up to talk to it."""

    def __init__(self, state: Path, creds: Credentials, address: str) -> None:
        self.state, self.creds = state, creds
        self.host, self.port = P.parse_address(address)
        self.home = state / "flwr"
        self.log = state / "superlink.log"
        self.env = P.flower_env(self.home)
        self.proc: subprocess.Popen | None = None

    def start(self) -> SuperLink:
        require_files(self.creds.ca, self.creds.server_cert, self.creds.server_key)
        write_connection(self.home, P.format_address(P.dial_host(self.host), self.port), self.creds.ca)
        cmd = [P.executable("flower-superlink"), "--ssl-ca-certfile", str(self.creds.ca),
               "--ssl-certfile", str(self.creds.server_cert), "--ssl-keyfile", str(self.creds.server_key),
               "--enable-supernode-auth", "--disable-runtime-dependency-installation",
               "--host", self.host, "--port", str(self.port)]  # state in memory
        P.require_free(self.host, self.port)
        self.proc = P.start(cmd, self.env, self.log)
        P.wait_listening(self.host, self.port, self.proc, self.log)
        return self

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """``flwr ARGS --format json`` against this SuperLink; its JSON answer."""
        cmd = [P.executable("flwr"), *args, "--format", "json"]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        text = res.stdout[res.stdout.find("{"):] if "{" in res.stdout else ""
        try:
            out = json.loads(text)
        except json.JSONDecodeError:
            out = {}
        if res.returncode != 0 or not out.get("success", False):
            why = out.get("error-message") or (res.stderr or res.stdout).strip().splitlines()[-1:]
            raise DeployError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed: {why}")
        return out

    def register(self, public_key: Path) -> int:
        require_files(public_key)
        return int(self.flwr("supernode", "register", str(public_key), CONNECTION)["node-id"])

    def submit(self, app: Path) -> int:
        return int(self.flwr("run", str(app), CONNECTION)["run-id"])

    def status(self, run_id: int) -> tuple[str, str]:
        run = self.flwr("ls", CONNECTION, "--run-id", str(run_id))["runs"][0]
        return str(run.get("status", "")), str(run.get("status-details", ""))

    def stop(self) -> None:
        if self.proc is not None:
            P.stop_tree(self.proc)
            self.proc = None


def follow(link: SuperLink, run_id: int, run: RunDir) -> dict[str, Any]:
    """Print each round as metrics.jsonl grows; return the summary once the ServerApp has
    written it (and Flower reports the run finished, or after a short grace). A ServerApp that
    fails shows up in Flower's run status: checked ``POLL_S`` after the start and
    ``POLL_ROUND_S`` after a round's end, then at doubling waits up to ``POLL_MAX_S`` (a
    failure is seen within a minute; a 2-minute round costs 2 checks, not 12)."""
    shown, last_poll, wait = 0, time.monotonic(), POLL_S
    while True:
        rows = run.metrics()
        for row in rows[shown:]:
            print_progress(row)
        if len(rows) > shown:
            last_poll, wait = time.monotonic(), POLL_ROUND_S
        shown = len(rows)
        if link.proc is not None and link.proc.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {link.proc.returncode}; see {link.log}")
        if (run.path / SUMMARY).exists():
            deadline = time.monotonic() + FINISH_GRACE_S
            while time.monotonic() < deadline and not link.status(run_id)[0].startswith("finished"):
                time.sleep(1.0)
            return run.summary()
        if time.monotonic() - last_poll > wait:  # the flwr CLI is a process start: not too often
            last_poll, wait = time.monotonic(), min(2 * wait, POLL_MAX_S)
            status, details = link.status(run_id)
            if status.startswith("finished") and not (run.path / SUMMARY).exists():
                raise DeployError(f"run {run_id} ended as {status} ({details}) without a summary; its log: "
                                  f"FLWR_HOME={link.home} flwr log {run_id} {CONNECTION} --show")
        time.sleep(0.5)


def serve(
    cfg: RunConfig, out: str | Path, creds: Credentials, options: ServeOptions = ServeOptions(), resume: bool = False
) -> dict[str, Any]:
    """Run ``cfg`` on a fresh SuperLink: register the node keys, submit, follow, stop.
    ``resume``: continue the run in ``out`` from its last checkpoint (``resume_config``)."""
    out = Path(out).resolve()
    keys = check_inputs(creds, options)
    run = RunDir(out) if resume else RunDir(out).create(cfg)
    link = SuperLink(out / STATE_DIR, creds, options.address).start()
    try:
        for key in keys:
            link.register(key)
        run_id = link.submit(write_app(out / STATE_DIR / "app", cfg, out, resume))
        options.ready(f"fedtune: SuperLink on https://{options.address} (TLS, {len(keys)} registered node keys), "
                      f"run {run_id} waits for {cfg.partition.num_clients} SuperNodes (fedtune join ...)")
        return follow(link, run_id, run)
    finally:
        link.stop()


def check_inputs(creds: Credentials, options: ServeOptions) -> tuple[Path, ...]:
    """One-line errors before anything starts; the node public keys to register."""
    P.parse_address(options.address)
    check_server_files(creds)
    keys = tuple(dict.fromkeys(options.node_keys or creds.node_pubs()))
    if not keys:
        raise DeployError(f"no SuperNode public keys: none given and no node-*.pub in {creds.folder}")
    require_files(*keys)
    for key in keys:
        check_public_key(key)
    return keys
