"""``fedtune export`` of federated runs: the global model of a strategy with base-weight deltas
(FLoRA) and one client's personalised model (FedSA, ``--client``).

The slow tests share one ``run_simulation`` (one Ray start) that runs a ``flora`` and a
``fedsa`` federation from a single ServerApp on two SuperNodes of different profiles
(rank 8 on every layer, rank 2 on the last layer). Each export is checked against what the
run itself measured: the server's final ``loss`` (the global model on its test slice) and the
clients' final ``client_loss`` (each client's own model on its own validation rows).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from safetensors import safe_open
from safetensors.torch import load_file

from fedtune import wire
from fedtune.cli import main
from fedtune.edge_export.errors import ExportError
from fedtune.edge_export.export import ExportOptions, export_fp32
from fedtune.edge_export.layout import REPORT
from fedtune.edge_export.runtime import EdgeClassifier
from fedtune.presets import resolve
from fedtune.server.run_dir import RunDir
from fedtune.simulations.simulate import with_client_state_dir

FAST = ExportOptions(examples=32, latency_runs=2, warmup=1)
# head-init=random: the FedNCM head of the untrained tiny model has weights ~1e3, which lift float32
# rounding (ONNX vs torch) past the 1e-4 parity gate; lr 0.03: FLoRA's merged deltas move the logits by ~5e-3
SMALL = {"num-clients": "2", "rounds": "2", "train-size": "200", "eval-size": "48", "local-steps": "3",
         "max-length": "24", "fraction-evaluate": "1.0", "lr": "0.03", "head-init": "random",
         "profiles": "gpu-small,edge", "profile-defs": "edge lora-rank=2 layers=1"}
NAMES = ("flora", "fedsa")


def _batches(enc, pad_id: int) -> list[dict]:
    from fedtune.training import collate

    return [collate(enc, np.arange(s, min(s + 16, len(enc))), pad_id) for s in range(0, len(enc), 16)]


def _onnx_logits(folder, enc, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], labels [N]) of the exported ONNX model on encoded examples."""
    clf, batches = EdgeClassifier(folder), _batches(enc, pad_id)
    logits = [clf.run({"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()})
              for b in batches]
    return torch.from_numpy(np.concatenate(logits)), torch.cat([b["labels"] for b in batches])


def _torch_logits(model, enc, pad_id: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                          for b in _batches(enc, pad_id)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as client_app
    from fedtune.server.app import run_federation
    from fedtune.simulations.simulate import backend_config, preflight

    root = tmp_path_factory.mktemp("fedexport")
    cfgs = {n: with_client_state_dir(resolve("tiny", overrides={**SMALL, "strategy": n}), root / n) for n in NAMES}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        for name, cfg in cfgs.items():
            run_federation(grid, cfg, RunDir(root / name).create(cfg), progress=lambda row: None)

    preflight(cfgs["flora"])
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                       backend_config=backend_config(cfgs["flora"]), verbose_logging=False)
    finally:
        flwr_logger.setLevel(level)
    for name in NAMES:
        assert (root / name / "summary.json").exists(), f"{name} did not finish"
    return {n: RunDir(root / n) for n in NAMES}


# -- the global model: base deltas (FLoRA) ------------------------------------------------------


@pytest.mark.slow
def test_flora_export_is_the_servers_final_model(runs, tmp_path):
    from peft import PeftModel

    from fedtune.adapters import set_base
    from fedtune.evaluation import TestEvaluator, test_encoding
    from fedtune.modeling import _base_model, load_tokenizer

    run = runs["flora"]
    cfg, final = run.config(), run.metrics()[-1]
    report = export_fp32(run.path, tmp_path / "edge", FAST)
    assert report["exported"]["base_deltas"] > 0 and report["exported"]["lora_rank"] == 8  # the server's rank
    assert report["verification"]["fp32"]["max_abs_diff"] <= 1e-4
    # the ONNX model scores exactly what the server measured for its final global model
    enc, pad = test_encoding(cfg), load_tokenizer(cfg.model.model).pad_token_id or 0
    onnx, labels = _onnx_logits(tmp_path / "edge", enc, pad)
    loss = torch.nn.functional.cross_entropy(onnx, labels).item()
    assert len(labels) == 48 and abs(loss - final["loss"]) <= 1e-4 * max(1.0, final["loss"]), (loss, final["loss"])
    # an independent torch reconstruction (peft's own loader, then W0 + delta) is that model; without the delta
    # it is not (so the checks mean something)
    model = PeftModel.from_pretrained(_base_model("tiny", 20), str(run.path / "adapter")).eval()
    without = _torch_logits(model, enc, pad)
    set_base(model, load_file(str(run.path / "adapter" / "base_delta.safetensors")))
    assert abs(TestEvaluator(cfg)(model)["loss"] - final["loss"]) <= 1e-5 * max(1.0, final["loss"])
    assert (_torch_logits(model, enc, pad) - onnx).abs().max() <= 1e-4
    assert (without - onnx).abs().max() > 1e-3, (without - onnx).abs().max()


@pytest.mark.slow
def test_client_export_is_refused_without_a_personal_part(runs, tmp_path, capsys):
    with pytest.raises(ExportError, match="'flora' keeps no personal tensors"):
        export_fp32(runs["flora"].path, tmp_path / "edge", FAST, client=0)
    argv = ["export", str(runs["fedsa"].path), "--out", str(tmp_path / "edge"), "--client", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "fedtune: error: --client 2: the run has clients 0 to 1"
    assert list(tmp_path.iterdir()) == []


# -- one client's personalised model (FedSA) -------------------------------------------------------


@pytest.mark.slow
def test_fedsa_clients_persist_their_own_B(runs):
    cfg = runs["fedsa"].config()
    assert cfg.federation.client_state_dir == str(runs["fedsa"].path.resolve() / "clients")
    for client, (profile, rank, layers) in enumerate((("gpu-small", 8, 2), ("edge", 2, 1))):
        path = runs["fedsa"].path / "clients" / f"client-{client}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        assert meta == {"client": str(client), "profile": profile, "lora-rank": str(rank), "strategy": "fedsa",
                        "round": "2"}
        assert len(tensors) == 2 * layers and all(".lora_B." in k for k in tensors)  # query and value per layer
        assert all(t.shape == (32, rank) and t.abs().max() > 0 for t in tensors.values())
    names = sorted(p.name for p in (runs["fedsa"].path / "clients").iterdir())
    assert names == ["client-0.safetensors", "client-1.safetensors"]  # no temporary files left
    assert not (runs["flora"].path / "clients").exists()  # no personal part, nothing written


@pytest.mark.slow
def test_fedsa_client_exports_are_each_clients_own_model(runs, tmp_path, capsys):
    """The clients' final evaluation ran each client's own model (global A, its B) on its own
    validation rows: the two exports reproduce the run's client_loss (their weighted mean)."""
    import json

    from fedtune.data import client_data
    from fedtune.modeling import load_tokenizer
    from fedtune.training import encode

    run = runs["fedsa"]
    cfg, final = run.config(), run.metrics()[-1]
    tok = load_tokenizer(cfg.model.model)
    out0 = tmp_path / "client0"
    report0 = export_fp32(run.path, out0, FAST, client=0)
    assert main(["export", str(run.path), "--out", str(tmp_path / "client1"), "--client", "1",
                 "--examples", "32", "--latency-runs", "2"]) == 0
    assert "(client 1)" in capsys.readouterr().err
    report1 = json.loads((tmp_path / "client1" / REPORT).read_text())
    assert report0["exported"] | {"state_file": None} == {
        "model": "client", "client": 0, "strategy": "fedsa", "profile": "gpu-small", "lora_rank": 8, "layers": 0,
        "round": 2, "state_file": None}
    assert (report1["exported"]["profile"], report1["exported"]["lora_rank"], report1["exported"]["layers"]) == \
        ("edge", 2, 1)
    for r in (report0, report1):
        assert r["verification"]["fp32"]["max_abs_diff"] <= 1e-4
    total, count = 0.0, 0
    for client, folder in ((0, out0), (1, tmp_path / "client1")):
        val = client_data(cfg.data, cfg.partition, cfg.federation.seed, client).val
        logits, labels = _onnx_logits(folder, encode(tok, val, cfg.data.max_length), tok.pad_token_id or 0)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        total, count = total + loss, count + len(labels)
    assert count > 0 and abs(total / count - final["client_loss"]) <= 1e-4, (total / count, final["client_loss"])
    # the two clients' models differ from each other (their own B), and from the global one
    texts = ["the shuttle launch was delayed", "my scsi drive is not detected", "the goalie saved it"]
    logits0, logits1 = EdgeClassifier(out0).logits(texts), EdgeClassifier(tmp_path / "client1").logits(texts)
    assert np.abs(logits0 - logits1).max() > 1e-3


# -- fast: where the client state goes -----------------------------------------------------------


def test_simulate_gives_fedsa_clients_a_state_dir_in_the_run(tmp_path):
    fedsa = resolve("tiny", overrides={"strategy": "fedsa"})
    assert with_client_state_dir(fedsa, tmp_path / "run").federation.client_state_dir == \
        str((tmp_path / "run" / "clients").resolve())
    mine = fedsa.replace(**{"client-state-dir": str(tmp_path / "mine")})
    assert with_client_state_dir(mine, tmp_path / "run") == mine
    fedavg = resolve("tiny")
    assert with_client_state_dir(fedavg, tmp_path / "run") == fedavg  # no personal part: unchanged


def test_fedsa_client_writes_its_B_after_training(task_identity, tmp_path):
    from fedtune.client.adapter import LOCAL
    from fedtune.client.app import train
    from fedtune.modeling import build_model, trainable_state
    from fedtune.profiles import lookup, server_model
    from fedtune.strategies import STRATEGIES
    from fedtune.strategies.rank_aware import GlobalState

    over = {"num-clients": "2", "train-size": "200", "max-length": "24", "local-steps": "2", "strategy": "fedsa",
            "profiles": "edge", "profile-defs": "edge lora-rank=2 layers=1", "client-state-dir": str(tmp_path / "s")}
    cfg = resolve("tiny", overrides=over)
    g = GlobalState(trainable_state(build_model(server_model(cfg), 20)), {})
    arrays = STRATEGIES.get("fedsa")(cfg).node_arrays(g.encode(), lookup(cfg, "edge"))
    config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), "server-round": 3})
    msg = Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), message_type="train", dst_node_id=101)
    ctx = Context(run_id=1, node_id=101, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    train(msg, ctx)
    kept = wire.from_record(ctx.state[LOCAL])
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["client-1.safetensors"]  # no temporary file left
    with safe_open(str(tmp_path / "s" / "client-1.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"client": "1", "profile": "edge", "lora-rank": "2", "strategy": "fedsa",
                                 "round": "3"}
        saved = {k: fh.get_tensor(k) for k in fh.keys()}
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in kept)
