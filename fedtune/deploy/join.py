"""``fedtune join``: this machine's SuperNode, with its partition, device profile and data.

What the node holds goes into Flower's node config, which the ClientApp reads
(fedtune/client/node.py): ``partition-id`` (its client id in the run), ``profile`` (its
device profile, used by runs with ``profiles=auto``), ``dataset`` (a bundled dataset name
or a CSV/TSV path on this machine, replacing the run's ``dataset`` on this node only) and
``threads`` (torch threads: the machine's cores by default, not the run's ``client-cpus``,
which sizes simulated clients).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from fedtune.deploy import processes as P
from fedtune.deploy.checks import check_private_key, require_files
from fedtune.deploy.errors import DeployError
from fedtune.profiles import AUTO, BUILTIN


@dataclass(frozen=True)
class JoinOptions:
    superlink: str  # HOST:PORT of the SuperLink
    ca: Path  # the CA certificate that signed the SuperLink's
    key: Path  # this node's private key (its public key registered with the SuperLink)
    partition_id: int
    profile: str = AUTO  # a built-in profile name, or auto (from this machine's hardware)
    data: str = ""  # a bundled dataset name or a local CSV/TSV; "" = the run's dataset
    device: str = ""  # auto | cpu | cuda | cuda:N: where this node trains; "" = the run's (fedtune/device.py)
    state_dir: Path | None = None  # this node's Flower home (installed app bundles); default ~/.fedtune/node-<id>
    runtime_port: int = 0  # the SuperNode's local Runtime API port; 0 = a free one
    threads: int = 0  # torch threads of this node's training; 0 = the cores this process may use


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; a container's CPU set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _quote(value: str) -> str:
    if '"' in value:
        raise DeployError(f"bad value {value!r}: a node config value cannot contain a double quote")
    return f'"{value}"'


def node_config(opts: JoinOptions) -> str:
    """Flower's ``--node-config`` string: space-separated key=value, strings quoted."""
    items = [f"partition-id={opts.partition_id}", f"profile={_quote(opts.profile)}",
             f"threads={opts.threads or usable_cores()}"]
    if opts.data:
        items.append(f"dataset={_quote(opts.data)}")
    if opts.device:
        items.append(f"device={_quote(opts.device)}")
    return " ".join(items)


def check(opts: JoinOptions) -> None:
    """One-line errors for what would otherwise fail later, on the node or on the server."""
    P.parse_address(opts.superlink)
    if opts.partition_id < 0:
        raise DeployError(f"bad --partition-id {opts.partition_id}: must be >= 0")
    if opts.threads < 0:
        raise DeployError(f"bad --threads {opts.threads}: must be >= 1 (or 0 = this machine's {usable_cores()} cores)")
    require_files(opts.ca, opts.key)
    check_private_key(opts.key)
    if opts.profile != AUTO and opts.profile not in BUILTIN:
        raise DeployError(f"unknown profile {opts.profile!r}; valid: {AUTO}, {', '.join(BUILTIN)}")
    if opts.device:
        from fedtune.device import resolve

        resolve(opts.device, "--device")  # this machine must have it: one line now, not a failed round later
    if opts.data:
        from fedtune.data.sources import SOURCES

        is_file = Path(opts.data).suffix.lower() in (".csv", ".tsv", ".tab")
        if is_file and not Path(opts.data).is_file():
            raise DeployError(f"data file not found: {opts.data}")
        if not is_file and opts.data not in SOURCES:
            valid = ", ".join(SOURCES.names())
            raise DeployError(f"unknown dataset {opts.data!r}: use one of {valid} or a .csv/.tsv path")


def command(opts: JoinOptions) -> list[str]:
    port = opts.runtime_port or P.free_port()
    return [P.executable("flower-supernode"), "--superlink", opts.superlink,
            "--root-certificates", str(Path(opts.ca).resolve()),
            "--auth-supernode-private-key", str(Path(opts.key).resolve()),
            "--node-config", node_config(opts), "--port", str(port)]


def state_dir(opts: JoinOptions) -> Path:
    return opts.state_dir or Path.home() / ".fedtune" / f"node-{opts.partition_id}"


def join(opts: JoinOptions) -> None:
    """Validate, start the node's long-lived worker (fedtune/client/service.py: it keeps the
    model, data and DP state across rounds), then become the SuperNode (exec: signals reach
    Flower's process directly; the worker ends with it)."""
    if opts.data and Path(opts.data).is_file():
        opts = replace(opts, data=str(Path(opts.data).resolve()))
    check(opts)
    cmd = command(opts)
    home = state_dir(opts)
    home.mkdir(parents=True, exist_ok=True)
    from fedtune.client import service

    folder = service.prepare(home / "worker")
    service.spawn(folder, os.getpid(), follow_parent=True)  # this pid stays the SuperNode's after exec
    env = {service.ENV: str(folder), service.NODE_PID_ENV: str(os.getpid()),
           # SuperExec asks the SuperNode for new tasks every second by default: half of that
           # takes ~0.25 s off each message; at 0.1 s the polls cost SuperExec and the SuperNode
           # ~9 CPU-s per 2-minute round, taken from training (bench/deployed.py)
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")}
    os.execve(cmd[0], cmd, P.flower_env(home, env))
