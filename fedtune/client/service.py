"""A deployed node's long-lived worker: the process that keeps the model, the tokenized data
and the DP state across rounds (docs/deploying.md, "One process per node").

Flower 1.41 runs every message of a deployed SuperNode in a fresh ``flwr-clientapp`` process
(SuperExec's subprocess executor, ``--token``: one task, then exit; ``--isolation process``
only moves SuperExec out of the SuperNode, it still starts a process per task). A fresh
process re-imports torch, rebuilds the model and re-reads the data every round. So
``fedtune join`` starts this worker next to the SuperNode, and the ClientApp that Flower
starts per message (``fedtune.client.proxy``, which never imports torch) hands its message
and context to it over a Unix socket in the node's state folder, authenticated with a
random token only the node's user can read (``multiprocessing.connection``: HMAC challenge).
The worker runs fedtune's real ClientApp (``fedtune.client.app``) on them, with its
per-process caches (``fedtune.client.worker.get_worker``), as a simulation actor does.

One request at a time; each is logged as a JSON line in ``worker.jsonl`` (seconds, and how
many models and data partitions this process has built so far). The worker ends with the
SuperNode (PR_SET_PDEATHSIG from ``fedtune join``, and a watchdog on the node's pid).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

ENV = "FEDTUNE_NODE_WORKER"  # the SuperNode's environment: this node's worker folder
NODE_PID_ENV = "FEDTUNE_NODE_PID"  # the SuperNode's pid: the worker ends when it does
TOKEN, ADDRESS, PID, LOG = "worker.token", "worker.address", "worker.pid", "worker.jsonl"
MAX_UNIX_PATH = 100  # sockaddr_un holds 108 bytes


def prepare(folder: str | Path) -> Path:
    """A private folder with a fresh token; a previous worker's files are replaced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for name in (ADDRESS, PID):
        (folder / name).unlink(missing_ok=True)
    fd = os.open(folder / TOKEN, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return folder


def _token(folder: Path) -> bytes:
    return (folder / TOKEN).read_text().strip().encode()


def _socket_path(folder: Path) -> str:
    path = folder / "worker.sock"
    if len(str(path)) > MAX_UNIX_PATH:  # a deep state folder: the socket goes to a short private one
        path = Path(tempfile.mkdtemp(prefix="fedtune-")) / "worker.sock"
    path.unlink(missing_ok=True)
    return str(path)


def _watch(node_pid: int) -> None:
    """Exit when the SuperNode is gone (a backstop to PR_SET_PDEATHSIG)."""
    def loop() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(node_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=loop, daemon=True).start()


def _set_identity(identity: tuple[int | None, int | None, int | None]) -> None:
    """The task identity of the flwr-clientapp process that sent the request."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity


def _builds() -> dict[str, int]:
    from fedtune.client.worker import _data
    from fedtune.modeling import shared_model

    return {"model_builds": shared_model.cache_info().misses, "data_loads": _data.cache_info().misses}


def _handle(conn: Connection, app, log: Path) -> None:
    identity, message, context = conn.recv()
    start = time.perf_counter()
    _set_identity(identity)
    kind = message.metadata.message_type
    try:
        reply = app(message, context)
        answer: tuple[Any, ...] = ("ok", reply, context.state)
    except Exception as exc:  # noqa: BLE001 - the node reports it as this ClientApp's error
        answer = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    row = {"at": round(time.time() - (time.perf_counter() - start), 3), "pid": os.getpid(), "message_type": kind,
           "ok": answer[0] == "ok",
           "seconds": round(time.perf_counter() - start, 3), **_builds()}
    with log.open("a") as fh:  # before the reply: whoever reads the log after it sees this request
        fh.write(json.dumps(row) + "\n")
    conn.send(answer)


def serve(folder: str | Path, node_pid: int | None = None) -> None:
    """Listen on this node's socket and run each request through fedtune's ClientApp."""
    folder = Path(folder)
    if node_pid:
        _watch(node_pid)
    import torch  # noqa: F401 - the imports a fresh process would pay every round, paid once

    from fedtune.client.app import app

    address = _socket_path(folder)
    with Listener(address, family="AF_UNIX", authkey=_token(folder)) as listener:
        os.chmod(address, 0o600)
        (folder / PID).write_text(str(os.getpid()))
        (folder / ADDRESS).write_text(address)  # last: a proxy that reads it can connect
        print(f"fedtune worker {os.getpid()}: listening on {address}", flush=True)
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as exc:  # a bad token, or a client gone mid-handshake
                print(f"fedtune worker: refused a connection ({type(exc).__name__}: {exc})", flush=True)
                continue
            with conn:
                try:
                    _handle(conn, app, folder / LOG)
                except (EOFError, OSError) as exc:  # the flwr-clientapp process went away
                    print(f"fedtune worker: lost a request ({type(exc).__name__}: {exc})", flush=True)


def spawn(folder: str | Path, node_pid: int | None, log: Path | None = None, follow_parent: bool = False):
    """Start a worker for ``folder`` (its token must exist: :func:`prepare`), detached in its
    own session, its output appended to ``log``. ``follow_parent``: it also gets SIGTERM when
    the calling process dies (Linux; ``fedtune join``, which then execs into the SuperNode)."""
    import subprocess

    folder = Path(folder)
    for name in (ADDRESS, PID):
        (folder / name).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fedtune.client.service", "--dir", str(folder)]
    if node_pid:
        cmd += ["--node-pid", str(node_pid)]
    out = (log or folder / "worker.log").open("ab")
    with out:
        if follow_parent:
            from fedtune.deploy.processes import _detach_and_follow_parent as pre
        else:
            pre = os.setsid
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=pre)
    (folder / PID).write_text(str(proc.pid))  # starting: a proxy waits for it rather than start another
    return proc


def _alive(folder: Path) -> bool:
    try:
        os.kill(int((folder / PID).read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def connect(folder: str | Path, wait: float = 120.0) -> Connection:
    """A connection to this node's worker; a worker that is gone (killed) is started again
    (one at a time: a lock in the folder), and a starting one is waited for."""
    import fcntl

    folder = Path(folder)
    deadline = time.monotonic() + wait
    while True:
        try:
            return Client((folder / ADDRESS).read_text(), family="AF_UNIX", authkey=_token(folder))
        except (OSError, EOFError):
            pass
        with (folder / "spawn.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _alive(folder):  # killed, or never started: start one
                spawn(folder, int(os.environ.get(NODE_PID_ENV, "0")) or None)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node's fedtune worker in {folder} did not answer within {wait:.0f} s")
        time.sleep(0.2)


def call(folder: str | Path, message, context):
    """Run ``message`` in the node's worker: (reply, the context's new state)."""
    from flwr.supercore.task_identity import TaskIdentity

    identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    with connect(folder) as conn:
        conn.send((identity, message, context))
        try:
            answer = conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the node's fedtune worker died during this message ({type(exc).__name__})") from None
    if answer[0] != "ok":
        raise RuntimeError(f"{answer[1]} (in the node's fedtune worker)\n{answer[2]}")
    return answer[1], answer[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.client.service", description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="the node's worker folder (token, socket address, log)")
    p.add_argument("--node-pid", type=int, default=None, help="exit when this process (the SuperNode) is gone")
    args = p.parse_args(argv)
    serve(args.dir, args.node_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
