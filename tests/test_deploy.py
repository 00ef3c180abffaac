"""Deployment on Flower's deployment engine, real processes on loopback: ``fedtune serve`` (a
SuperLink with TLS and node authentication) and ``fedtune join`` (SuperNodes), plus the
credentials, app folder and node-config pieces they are made of."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtune.deploy.certs import make_credentials
from fedtune.deploy.errors import DeployError
from fedtune.errors import ConfigError
from fedtune.deploy.processes import free_port, parse_address, stop_tree

FEDTUNE = [sys.executable, "-m", "fedtune"]
QUICK = ["--preset", "tiny", "--set", "num-clients=3", "--set", "head-init=random", "--set", "fraction-evaluate=0",
         "--set", "round-timeout=90", "--set", "local-steps=2", "--set", "rounds=3"]


def test_credentials_verify_and_match(tmp_path):
    creds = make_credentials(tmp_path, nodes=2, hosts=["10.0.0.5", "link.example"])
    ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
    srv = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "link.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_ssh_private_key(creds.node_key(1).read_bytes(), None)
    pub = load_ssh_public_key(creds.node_pub(1).read_bytes())
    assert key.public_key().public_numbers() == pub.public_numbers()  # a matching pair
    assert key.curve.name == "secp384r1"  # the NIST curve Flower's node auth requires
    assert oct(creds.node_key(0).stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in creds.node_pubs()] == ["node-0.pub", "node-1.pub"]
    before = creds.ca.read_bytes()
    with pytest.raises(DeployError, match="already holds credentials"):  # never overwrite a live CA
        make_credentials(tmp_path, nodes=1)
    assert creds.ca.read_bytes() == before


def test_addresses_and_user_errors(tmp_path, capsys):
    assert parse_address("127.0.0.1:9093") == ("127.0.0.1", 9093)
    assert parse_address("[::1]:9093") == ("::1", 9093)
    for bad in ("localhost", "host:99999", ":9093", "host:port"):
        with pytest.raises(DeployError, match="bad address"):
            parse_address(bad)
    make_credentials(tmp_path / "c", nodes=1)
    make_credentials(tmp_path / "mix", nodes=1)
    (tmp_path / "mix/server.key").write_bytes((tmp_path / "c/server.key").read_bytes())  # not server.pem's key
    cases = [
        (["serve", "--certs", str(tmp_path / "mix")], "is not the key of"),
        (["serve", "--certs", str(tmp_path / "nope")], "credential file not found"),
        (["serve", "--certs", str(tmp_path / "c"), "--address", "nowhere"], "bad address"),
        (["serve", "--certs", str(tmp_path / "c"), "--node-key", str(tmp_path / "c/ca.pem")], "bad node public key"),
        (["join", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "c/ca.pem"), "--key",
          str(tmp_path / "c/node-0.key"), "--partition-id", "0", "--profile", "gpu-huge"],
         "unknown profile 'gpu-huge'"),
        (["join", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "c/ca.pem"), "--key",
          str(tmp_path / "c/missing.key"), "--partition-id", "0"], "credential file not found"),
        (["join", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "c/ca.pem"), "--key",
          str(tmp_path / "c/node-0.key"), "--partition-id", "0", "--data", "gone.csv"], "data file not found"),
        (["join", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "c/ca.pem"), "--key",
          str(tmp_path / "c/ca.key"), "--partition-id", "0"], "bad node private key"),
    ]
    from fedtune.cli import main

    for args, message in cases:  # in-process: the CLI's own error handling, before anything starts
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_app_folder_round_trips_the_config(tmp_path, quick_cfg):
    from fedtune.deploy.app_dir import write_app
    from fedtune.server.deployed import config_from_run

    cfg = quick_cfg.replace(**{"target-modules": "query,key,value", "rounds": 3})
    folder = write_app(tmp_path / "app", cfg, tmp_path / "run")
    assert [p.name for p in folder.iterdir()] == ["pyproject.toml"]  # a FAB of one small file
    doc = tomllib.loads((folder / "pyproject.toml").read_text())
    assert doc["project"]["dependencies"] == []  # nothing for Flower to sync into a fresh environment
    assert doc["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedtune.server.deployed:app"
    back, run_dir, resume = config_from_run(doc["tool"]["flwr"]["app"]["config"])
    assert back == cfg and run_dir == (tmp_path / "run").resolve() and resume is False
    resumed = write_app(tmp_path / "app2", cfg, tmp_path / "run", resume=True) / "pyproject.toml"
    again = tomllib.loads(resumed.read_text())
    assert config_from_run(again["tool"]["flwr"]["app"]["config"])[2] is True
    with pytest.raises(ConfigError, match="unknown run config key"):
        config_from_run({**doc["tool"]["flwr"]["app"]["config"], "roundz": 2})


def test_join_writes_a_node_config_flower_parses(tmp_path):
    from flwr.common.config import parse_config_args

    from fedtune.deploy.join import JoinOptions, command, node_config

    creds = make_credentials(tmp_path, nodes=1)
    opts = JoinOptions(superlink="10.0.0.5:9093", ca=creds.ca, key=creds.node_key(0), partition_id=4,
                       profile="cpu-edge", data="/data/my posts.csv", runtime_port=9200)
    parsed = parse_config_args([node_config(opts)])
    assert parsed == {"partition-id": 4, "profile": "cpu-edge", "dataset": "/data/my posts.csv",
                      "threads": len(os.sched_getaffinity(0))}  # a device trains on its cores by default
    assert parse_config_args([node_config(replace(opts, threads=3))])["threads"] == 3
    cmd = command(opts)
    assert cmd[cmd.index("--superlink") + 1] == "10.0.0.5:9093" and "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(creds.ca.resolve())
    assert cmd[cmd.index("--port") + 1] == "9200"


def test_node_config_declares_profile_and_data(quick_cfg):
    from flwr.app import Context, RecordDict

    from fedtune.client.node import local_data, profile_of

    def ctx(**node):
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    auto = quick_cfg.replace(profiles="auto")
    assert profile_of(auto, ctx(**{"partition-id": 0, "profile": "gpu-small"})).lora_rank == 8
    assert profile_of(auto, ctx(**{"partition-id": 0, "profile": "cpu-edge"})).layers == 3
    listed = quick_cfg.replace(profiles="gpu-large,cpu-edge")  # the run assigns: a declaration does not override
    assert profile_of(listed, ctx(**{"partition-id": 1, "profile": "gpu-large"})).name == "cpu-edge"
    own, client = local_data(quick_cfg, 2, ctx(**{"partition-id": 2, "dataset": "/data/mine.csv"}))
    assert (own.data.dataset, own.partition.num_clients, client) == ("/data/mine.csv", 1, 0)  # all of its own file
    assert own.model == quick_cfg.model and own.train == quick_cfg.train
    assert local_data(quick_cfg, 2, ctx(**{"partition-id": 2})) == (quick_cfg, 2)  # the run's partition


def test_a_node_trains_with_the_threads_it_states_not_the_simulation_share(quick_cfg):
    from flwr.app import Context, RecordDict

    from fedtune.client.node import node_threads
    from fedtune.deploy.join import JoinOptions, check

    def ctx(**node):
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    cfg = quick_cfg.replace(**{"client-cpus": 1})
    assert node_threads(cfg, ctx(threads=6)).federation.client_cpus == 6  # fedtune join --threads 6
    assert node_threads(cfg, ctx()) is cfg  # a SuperNode started by hand keeps the run's client-cpus
    assert node_threads(cfg, ctx(threads=6)).model == cfg.model  # nothing else changes
    with pytest.raises(DeployError, match="bad --threads -2"):
        check(JoinOptions(superlink="127.0.0.1:9093", ca=Path("x"), key=Path("y"), partition_id=0, threads=-2))


# -- the real thing: SuperLink + 3 SuperNodes on loopback --------------------------------------


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _check_tls(address: str, ca: Path, other_ca: Path) -> None:
    """The SuperLink speaks TLS with a certificate our CA signed, and only that."""
    import socket
    import ssl

    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=10) as raw:
        with ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection((host, port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context(cafile=str(other_ca)).wrap_socket(raw, server_hostname=host)


def _rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


@pytest.mark.slow
def test_superlink_three_supernodes_tls_auth_and_a_killed_node(tmp_path, secagg_deployment):
    """3 rounds over TLS with node auth; an unregistered node is refused; one SuperNode is
    SIGKILLed as round 2 starts and rounds 2 and 3 complete with the other two. Each node's
    long-lived worker builds its model once and serves every round from one process.
    The SecAgg+ deployment (test_secagg_plus_over_the_deployment_engine) starts beside it after
    round 1: from there this run mostly waits (for Flower's 30 s node heartbeat to drop the node)."""
    creds = make_credentials(tmp_path / "creds", nodes=4)  # node-3's key is never registered
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    procs: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(FEDTUNE + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((name, proc))
        return proc

    def join(i: int) -> subprocess.Popen:
        return start(f"node{i}", ["join", "--superlink", address, "--ca", str(creds.ca), "--key",
                                  str(creds.node_key(i)), "--partition-id", str(i % 3), "--threads", "1",
                                  "--state-dir", str(tmp_path / f"home{i}")])

    try:
        node_keys = [a for i in range(3) for a in ("--node-key", str(creds.node_pub(i)))]
        server = start("serve", ["serve", *QUICK, "--certs", str(creds.folder), "--address", address,
                                 "--out", str(run), *node_keys])
        serve_log = tmp_path / "serve.log"
        _wait(lambda: "waits for 3 SuperNodes" in serve_log.read_text(), 180, "the SuperLink", [("serve", server)])
        _check_tls(address, creds.ca, make_credentials(tmp_path / "other", nodes=0).ca)
        nodes = [join(i) for i in range(3)]
        rogue = join(3)
        assert rogue.wait(timeout=120) != 0  # refused: its key was never registered
        assert "Failed to activate SuperNode" in (tmp_path / "node3.log").read_text()
        _wait(lambda: len(_rows(run)) >= 2, 300, "round 1", [("serve", server)] + procs[1:4])
        os.kill(nodes[2].pid, signal.SIGKILL)  # `fedtune join` exec'ed into the SuperNode: this kills it
        secagg_deployment.start()
        assert server.wait(timeout=300) == 0, serve_log.read_text()[-3000:]
    finally:
        for _, proc in reversed(procs):
            stop_tree(proc, grace=3)

    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["clients"] == 3 and rows[1]["bytes_up"] > 0
    assert rows[2]["clients"] == 2 and rows[2]["missing"] == [2]  # the killed node, recorded
    assert rows[3]["clients"] == 2  # the SuperLink has dropped the dead node: no longer sampled
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3
    for i in (0, 1):  # one worker process per node, one model build and one data load for all rounds
        served = [json.loads(x) for x in (tmp_path / f"home{i}" / "worker" / "worker.jsonl").read_text().splitlines()]
        trained = [r for r in served if r["message_type"] == "train"]
        assert len(trained) == 3 and all(r["ok"] for r in served)
        assert {r["pid"] for r in served} == {served[0]["pid"]}
        assert served[-1]["model_builds"] == 1 and served[-1]["data_loads"] == 1
    from safetensors.torch import load_file

    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in saved.items() if "lora_B" in k]
    assert b and all(float(v.abs().sum()) > 0 for v in b)  # peft starts B at zero: it trained
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4  # the quick preset's rank
    assert (run / "superlink" / "app" / "pyproject.toml").exists()
    assert "https://" in (run / "superlink" / "superlink.log").read_text()  # TLS on


def test_a_node_with_its_own_file_trains_on_all_of_it(tmp_path, quick_cfg):
    from flwr.app import Context, RecordDict

    from fedtune.client.node import local_data
    from fedtune.client.worker import get_worker

    rows = ["text,label,split"] + [f"post number {i} about topic {i % 3},t{i % 3},train" for i in range(60)]
    rows += [f"held out {i},t{i % 3},test" for i in range(6)]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 3, "dataset": str(tmp_path / "mine.csv")},
                  state=RecordDict(), run_config={})
    worker = get_worker(*local_data(quick_cfg, 3, ctx))
    assert len(worker.data.train) + len(worker.data.val) == 60  # every training row of the node's file, no other


class SecAggDeployment:
    """`fedtune serve --set secure-aggregation=secagg+` and 3 `fedtune join` SuperNodes, started
    once (:meth:`start`, from whichever test comes first) and followed to the end (:meth:`wait`)."""

    def __init__(self, root: Path) -> None:
        self.root, self.run = root, root / "run"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.error: BaseException | None = None  # a failed start, raised by wait()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(FEDTUNE + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self) -> None:
        if self.procs or self.error:
            return
        try:
            self._launch()
        except Exception as exc:  # noqa: BLE001 - reported by wait(), in the test it belongs to
            self.error = exc

    def _launch(self) -> None:
        creds = make_credentials(self.root / "creds", nodes=3)
        address = f"127.0.0.1:{free_port()}"
        node_keys = [a for i in range(3) for a in ("--node-key", str(creds.node_pub(i)))]
        server = self._start("serve", ["serve", *QUICK, "--set", "rounds=1", "--set", "secure-aggregation=secagg+",
                                       "--certs", str(creds.folder), "--address", address, "--out", str(self.run),
                                       *node_keys])
        serve_log = self.root / "serve.log"
        _wait(lambda: "waits for 3 SuperNodes" in serve_log.read_text(), 180, "the SuperLink", [("serve", server)])
        for i in range(3):
            self._start(f"node{i}", ["join", "--superlink", address, "--ca", str(creds.ca), "--key",
                                     str(creds.node_key(i)), "--partition-id", str(i), "--threads", "1",
                                     "--state-dir", str(self.root / f"home{i}")])

    def wait(self) -> None:
        self.start()
        if self.error:
            raise self.error
        server = self.procs[0][1]
        assert server.wait(timeout=400) == 0, (self.root / "serve.log").read_text()[-3000:]

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            stop_tree(proc, grace=3)


@pytest.fixture(scope="module")
def secagg_deployment(tmp_path_factory):
    deployment = SecAggDeployment(tmp_path_factory.mktemp("secagg-deploy"))
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.mark.slow
def test_secagg_plus_over_the_deployment_engine(secagg_deployment):
    """`fedtune serve --set secure-aggregation=secagg+` and 3 `fedtune join` SuperNodes: one round runs
    Flower's SecAgg+ over gRPC (TLS, node auth) and aggregates all three clients."""
    try:
        secagg_deployment.wait()
    finally:
        secagg_deployment.stop()
    rows = _rows(secagg_deployment.run)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["aggregated"] and rows[1]["clients"] == 3 and rows[1]["bytes_up"] > 0, rows[1]
