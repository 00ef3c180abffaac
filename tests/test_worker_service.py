"""A deployed node's long-lived worker (fedtune/client/service.py) and the per-message
ClientApp that hands it its messages (fedtune/client/proxy.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune import wire
from fedtune.client import service
from fedtune.deploy.processes import stop_tree


def test_proxy_registers_what_the_client_app_does():
    from fedtune.client.app import app
    from fedtune.client.proxy import HANDLERS, app as proxy

    assert sorted(HANDLERS) == sorted(app._registered_funcs) == sorted(proxy._registered_funcs)


def test_the_proxy_imports_no_torch():
    import subprocess

    code = "import sys, fedtune.client.proxy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _rows(folder):
    f = folder / service.LOG
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def test_one_worker_keeps_the_model_and_the_node_state_across_rounds(tmp_path, monkeypatch, task_identity):
    """Two fedsa rounds through the proxy: one model build, the node's own B kept in its
    context; a wrong token is refused; a killed worker is replaced at the next message."""
    from fedtune.client.adapter import LOCAL
    from fedtune.client.proxy import app as proxy
    from fedtune.modeling import build_model, trainable_state
    from fedtune.presets import resolve
    from fedtune.profiles import lookup, server_model
    from fedtune.strategies import STRATEGIES
    from fedtune.strategies.rank_aware import GlobalState

    folder = service.prepare(tmp_path / "w")
    assert oct(os.stat(folder / service.TOKEN).st_mode & 0o777) == "0o600"
    monkeypatch.setenv(service.ENV, str(folder))
    monkeypatch.setenv(service.NODE_PID_ENV, str(os.getpid()))
    cfg = resolve("tiny", overrides={"num-clients": "2", "train-size": "200", "max-length": "16",
                                     "local-steps": "1", "strategy": "fedsa", "profiles": "edge",
                                     "profile-defs": "edge lora-rank=2 layers=1"})
    strategy = STRATEGIES.get("fedsa")(cfg)
    g = GlobalState(trainable_state(build_model(server_model(cfg), 20)), {})
    arrays = strategy.node_arrays(g.encode(), lookup(cfg, "edge"))
    ctx = Context(run_id=1, node_id=101, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    def msg(server_round: int) -> Message:
        config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), "server-round": server_round})
        return Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), message_type="train", dst_node_id=101)

    first = service.spawn(folder, os.getpid())
    pids = [first.pid]
    try:
        service.connect(folder).close()  # up and listening
        with pytest.raises(AuthenticationError):  # refused; the worker goes on
            Client((folder / service.ADDRESS).read_text(), family="AF_UNIX", authkey=b"not the token")
        for r in (1, 2):
            reply = proxy(msg(r), ctx)
            assert reply.content[wire.METRICS][wire.CLIENT_ID] == 0
            assert LOCAL in ctx.state  # the worker's context change came back to the node
        rows = _rows(folder)
        assert [(r["pid"], r["model_builds"], r["data_loads"], r["ok"]) for r in rows] == [(first.pid, 1, 1, True)] * 2
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        proxy(msg(3), ctx)  # a new worker: one more build, in a new process
        last = _rows(folder)[-1]
        pids.append(last["pid"])
        assert last["pid"] != first.pid and last["model_builds"] == 1 and last["ok"]
    finally:
        for pid in pids:
            stop_tree(pid, grace=3)
