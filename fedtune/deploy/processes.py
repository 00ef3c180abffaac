"""Starting and stopping Flower's processes (SuperLink, SuperNode, the ``flwr`` CLI) from the
current environment, and parsing the addresses they listen on or dial."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from fedtune.deploy.errors import DeployError


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); a one-line error otherwise."""
    host, sep, port = address.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or " " in host:
        raise DeployError(f"bad address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9093 or [::1]:9093")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dial_host(host: str) -> str:
    """The host a local client dials for a server bound to ``host`` (0.0.0.0 -> 127.0.0.1)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_free(host: str, port: int) -> None:
    """A one-line error if ``host:port`` cannot be bound (in use, or not this machine's)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as exc:
        raise DeployError(f"cannot listen on {format_address(host, port)}: {exc.strerror or exc}") from None


def flower_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment for a Flower process: its own FLWR_HOME, no telemetry, offline, and
    this interpreter's bin/ first on PATH (SuperLink and SuperNode start ``flower-superexec``,
    ``flwr-serverapp`` and ``flwr-clientapp`` by name)."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PATH": bin_dir + os.pathsep + env.get("PATH", "")})
    env.update(extra or {})
    return env


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeployError(f"{name} not found next to {sys.executable}: install fedtune with the 'train' extra")
    return str(path)


def _detach_and_follow_parent() -> None:  # runs in the child, before exec
    """Own session (a Ctrl-C aimed at us is ours to pass on), and on Linux SIGTERM when the
    parent dies, even by SIGKILL: no orphaned SuperLink keeps running a federation."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def start(cmd: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """A background process in its own session, its output appended to ``log``; it ends
    when this process does."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(list(cmd), env=dict(env), stdout=fh, stderr=subprocess.STDOUT,
                                preexec_fn=_detach_and_follow_parent)


def wait_listening(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Until something accepts TCP connections on host:port; a dead ``proc`` is an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = tail(log, 1).strip()
            raise DeployError(f"the SuperLink exited with code {proc.returncode} ({last}); see {log}")
        try:
            with socket.create_connection((dial_host(host), port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing listens on {format_address(host, port)} after {timeout:.0f} s; see {log}")


def tail(log: Path, lines: int = 8) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_tree(proc: subprocess.Popen | int, grace: float = 5.0) -> None:
    """SIGTERM a process and everything it started (Flower's helpers run in their own
    sessions, so a process group is not enough), then SIGKILL what is left."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    if not isinstance(proc, int):
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
