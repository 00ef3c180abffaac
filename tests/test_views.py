"""Run files are the contract between training and export: the model views the server writes
(``RUN/views``: one per profile, one per personal client, and ``index.json``) and what
``fedtune export --client/--profile`` makes of them, plus the atomic folder publish.

The runs here are whole federations (``run_federation``: discovery, rounds, checkpoints,
adapter, views) of the tiny model on an in-process grid: each node's ClientApp is called
directly with its own persistent Context, no Ray, a few seconds each.
"""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from safetensors import safe_open

from fedtune.artifacts import VIEWS_DIR, RunDir, client_view_file, profile_view_file, staged_folder
from fedtune.cli import main
from fedtune.edge_export.errors import ExportError
from fedtune.edge_export.export import ExportOptions, export_fp32
from fedtune.edge_export.layout import REPORT
from fedtune.edge_export.merge import load_client, load_profile
from fedtune.presets import resolve
from fedtune.simulations.simulate import with_client_state_dir

FAST = ExportOptions(examples=16, latency_runs=1, warmup=1)
SMALL = {"num-clients": "3", "rounds": "2", "train-size": "120", "eval-size": "32", "local-steps": "2",
         "max-length": "16", "fraction-evaluate": "1.0", "lr": "0.05", "head-init": "random",
         "profiles": "gpu-small,edge", "profile-defs": "edge lora-rank=2 layers=1"}


class InProcessGrid:
    """A Flower Grid whose nodes are ClientApp calls in this process (node id = 100 + client)."""

    def __init__(self, cfg) -> None:
        from fedtune.client.app import app

        self.app = app
        self.contexts = {100 + c: Context(run_id=1, node_id=100 + c, node_config={"partition-id": c},
                                          state=RecordDict(), run_config={})
                         for c in range(cfg.partition.num_clients)}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids do
            self.replies[m.metadata.message_id] = self.app(m, self.contexts[m.metadata.dst_node_id])
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def federate(root, strategy: str, **extra):
    from fedtune.server.app import run_federation

    cfg = with_client_state_dir(resolve("tiny", overrides={**SMALL, "strategy": strategy, **extra}), root)
    run = RunDir(root).create(cfg)
    torch.set_num_threads(1)
    run_federation(InProcessGrid(cfg), cfg, run, progress=lambda row: None)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from flwr.supercore.task_identity import TaskIdentity

    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        root = tmp_path_factory.mktemp("views")
        return {name: federate(root / name, name) for name in ("flexlora", "fedsa")}
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _test_logits(model, cfg) -> torch.Tensor:
    from fedtune.evaluation import test_encoding
    from fedtune.modeling import load_tokenizer
    from fedtune.training import collate

    enc, pad = test_encoding(cfg), load_tokenizer(cfg.model.model).pad_token_id or 0
    with torch.inference_mode():
        return torch.cat([model(**{k: v for k, v in collate(enc, np.arange(s, min(s + 16, len(enc))), pad).items()
                                   if k != "labels"}).logits for s in range(0, len(enc), 16)])


# -- what the server writes --------------------------------------------------------------------


def test_a_rank_aware_run_writes_one_view_per_profile(runs):
    run = runs["flexlora"]
    index = json.loads((run.path / VIEWS_DIR / "index.json").read_text())
    assert index == {"strategy": "flexlora", "round": 2, "personal": False, "clients": {}, "skipped": {},
                     "profiles": {"edge": {"file": "profile-edge.safetensors", "lora_rank": 2, "layers": 1},
                                  "gpu-small": {"file": "profile-gpu-small.safetensors", "lora_rank": 8, "layers": 0}}}
    assert sorted(p.name for p in (run.path / VIEWS_DIR).iterdir()) == \
        ["index.json", "profile-edge.safetensors", "profile-gpu-small.safetensors"]  # no temporary folder
    with safe_open(str(profile_view_file(run.path, "edge")), framework="pt") as fh:
        keys = list(fh.keys())
        assert fh.metadata() == {"kind": "profile", "profile": "edge", "strategy": "flexlora", "round": "2"}
        A = [fh.get_tensor(k) for k in keys if k.endswith("lora_A.default.weight")]
    assert len(A) == 2 and all(a.shape == (2, 32) for a in A)  # rank 2, query and value of the last layer only
    assert not any(k.startswith("base-delta/") for k in keys)  # FlexLoRA's residual stays on the server


def test_a_profile_view_is_the_model_the_server_evaluated_for_that_profile(runs):
    """metrics.jsonl's loss_rank_2 is the server's own evaluation of the rank-2 profile's model
    (lifted to its rank): the exported view scores the same on the same test slice."""
    from fedtune.evaluation import TestEvaluator

    run = runs["flexlora"]
    cfg, final = run.config(), run.metrics()[-1]
    for profile, key in (("edge", "loss_rank_2"), ("gpu-small", "loss_rank_8")):
        loaded = load_profile(run.path, profile)
        assert loaded.source == {"model": "profile", "profile": profile, "strategy": "flexlora", "round": 2,
                                 "lora_rank": 2 if profile == "edge" else 8, "layers": 1 if profile == "edge" else 0}
        assert abs(TestEvaluator(cfg)(loaded.model)["loss"] - final[key]) <= 1e-5 * max(1.0, final[key])
    with pytest.raises(ExportError, match="no view of that profile; its profiles' views: edge, gpu-small"):
        load_profile(run.path, "cpu-edge")


def test_a_personal_strategy_writes_one_view_per_client(runs):
    run = runs["fedsa"]
    index = json.loads((run.path / VIEWS_DIR / "index.json").read_text())
    assert index["personal"] is True and index["skipped"] == {}
    assert sorted(index["clients"]) == ["0", "1", "2"] and sorted(index["profiles"]) == ["edge", "gpu-small"]
    for client, profile in ((0, "gpu-small"), (1, "edge"), (2, "gpu-small")):
        entry = index["clients"][str(client)]
        assert (entry["profile"], entry["round"]) == (profile, 2)
        assert entry["state_file"] == str(run.path.resolve() / "clients" / f"client-{client}.safetensors")
        with safe_open(str(client_view_file(run.path, client)), framework="pt") as fh:
            assert fh.metadata()["client"] == str(client)
            view = {k: fh.get_tensor(k) for k in fh.keys()}
        with safe_open(entry["state_file"], framework="pt") as fh:  # its own B, exactly
            assert all(torch.equal(view[k], fh.get_tensor(k)) for k in fh.keys())


def _main_load_client(run_path, client: int):
    """``load_client`` as it was before views (commit 9a97e99): the global adapter rebuilt
    through the live strategy, the client's file, the client's recipe."""
    from safetensors.torch import load_file

    from fedtune.adapters import set_base
    from fedtune.edge_export.merge import _load_global, for_export
    from fedtune.modeling import build_model, load_trainable_state, trainable_state
    from fedtune.profiles import apply, lookup
    from fedtune.strategies import STRATEGIES
    from fedtune.strategies.rank_aware import GlobalState, rank_aware_of
    from fedtune.strategies.recipes import recipe_for

    run, deltas = _load_global(run_path)
    cfg = run.cfg
    personal = load_file(str(run_path / "clients" / f"client-{client}.safetensors"))
    with safe_open(str(run_path / "clients" / f"client-{client}.safetensors"), framework="pt") as fh:
        profile = lookup(cfg, fh.metadata()["profile"])
    recipe, rank_aware = recipe_for("fedsa"), rank_aware_of(STRATEGIES.get("fedsa")(cfg))
    model = build_model(for_export(apply(cfg, profile).model), len(run.labels), seed=cfg.federation.seed)
    initial = trainable_state(model)
    recipe.prepare(model, initial, cfg.federation.seed)
    g = GlobalState(trainable_state(run.model), deltas)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    set_base(model, rank_aware.shared_base(g))
    load_trainable_state(model, {**{n: initial[n] for n in names}, **personal, **rank_aware.view(g, profile)})
    return model.eval()


def test_client_views_give_the_logits_the_old_loader_gave(runs):
    run = runs["fedsa"]
    cfg = run.config()
    for client in (0, 1):
        new = load_client(run.path, client)
        assert new.source["profile"] == ("gpu-small", "edge")[client] and new.source["round"] == 2
        assert torch.equal(_test_logits(new.model, cfg), _test_logits(_main_load_client(run.path, client), cfg))


def test_export_of_a_client_reads_its_view_only(runs, tmp_path, capsys):
    run = runs["fedsa"]
    clients = run.path / "clients"
    moved = shutil.move(str(clients), str(tmp_path / "elsewhere"))  # export needs the views only
    try:
        assert main(["export", str(run.path), "--out", str(tmp_path / "c1"), "--client", "1", "--examples", "16",
                     "--latency-runs", "1"]) == 0
    finally:
        shutil.move(moved, str(clients))
    assert "(client 1)" in capsys.readouterr().err
    report = json.loads((tmp_path / "c1" / REPORT).read_text())
    assert report["exported"]["profile"] == "edge" and report["verification"]["fp32"]["max_abs_diff"] <= 1e-4
    assert main(["export", str(run.path), "--out", str(tmp_path / "p"), "--profile", "edge", "--client", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fedtune: error: --client and --profile: give one of them"


# -- runs without views, and errors ------------------------------------------------------------------


def test_a_run_without_views_is_a_one_line_error_naming_the_file(runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(runs["fedsa"].path, old)
    shutil.rmtree(old / VIEWS_DIR)  # as a run made before views existed
    assert main(["export", str(old), "--out", str(tmp_path / "edge"), "--client", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"fedtune: error: --client 0: {old / VIEWS_DIR / 'index.json'} is missing (the server writes "
                   "the model views at the end of a run; runs made before views existed have none): resume the run "
                   f"to write them (fedtune simulate --resume {old}), or rerun it")
    assert not (tmp_path / "edge").exists()
    (old / VIEWS_DIR).mkdir()
    shutil.copy(runs["fedsa"].path / VIEWS_DIR / "index.json", old / VIEWS_DIR)  # the index, not the file
    with pytest.raises(ExportError, match=r"client-2.safetensors is missing: resume the run"):
        load_client(old, 2)
    index = json.loads((old / VIEWS_DIR / "index.json").read_text())
    index["clients"].pop("1")
    index["skipped"]["1"] = "no readable personal file in the client-state-dir"  # as the server says it
    (old / VIEWS_DIR / "index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match=r"no view of client 1 in .*views \(no readable personal file in the "
                                          r"client-state-dir\): the server writes it at the end of the run"):
        load_client(old, 1)


def test_client_export_of_a_strategy_without_personal_tensors_is_refused(runs):
    with pytest.raises(ExportError, match="'flexlora' keeps no personal tensors"):
        load_client(runs["flexlora"].path, 0)
    with pytest.raises(ExportError, match="--client 3: the run has clients 0 to 2"):
        load_client(runs["fedsa"].path, 3)


def test_resuming_a_finished_run_writes_its_views(runs, tmp_path):
    """What the error above tells the user to do: ``--resume`` on a finished run runs no round,
    and writes the adapter and the views from the last checkpoint."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.server.app import run_federation

    old = tmp_path / "old"
    shutil.copytree(runs["fedsa"].path, old)
    shutil.rmtree(old / VIEWS_DIR)
    run = RunDir(old)
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        cfg = run.config().replace(**{"client-state-dir": str(old / "clients")})
        run_federation(InProcessGrid(cfg), cfg, run, progress=lambda row: None, resume=True)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    assert len(run.metrics()) == 3  # rounds 0, 1, 2: nothing run again
    for client in (0, 2):
        a = load_client(old, client).model.state_dict()
        b = load_client(runs["fedsa"].path, client).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)


# -- the atomic folder publish -------------------------------------------------------------------


def test_a_staged_folder_is_published_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "adapter"
    with staged_folder(dest) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (dest / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="cut short"):
        with staged_folder(dest) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("cut short")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (dest / "a.txt").read_text() == "one"
    with staged_folder(dest) as tmp:
        (tmp / "b.txt").write_text("three")
    assert [p.name for p in dest.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_failed_export_leaves_the_previous_export_and_no_partial_folder(runs, tmp_path, monkeypatch):
    import fedtune.edge_export.export as export

    out = tmp_path / "edge"
    first = export_fp32(runs["fedsa"].path, out, FAST, client=0)
    before = sorted(p.name for p in out.iterdir())

    def broken(merged, folder, variants):
        (folder / "model.onnx").write_bytes(b"half an onnx file")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_models", broken)
    with pytest.raises(OSError, match="disk full"):
        export_fp32(runs["fedsa"].path, out, FAST, client=1)
    assert [p.name for p in tmp_path.iterdir()] == ["edge"]  # no staging folder left
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / REPORT).read_text())["exported"] == first["exported"]  # still client 0's


def test_the_adapter_folder_is_published_atomically(runs, tmp_path, monkeypatch):
    """A crash while saving the adapter leaves the previous adapter folder, whole."""
    from fedtune.modeling import build_model

    run = RunDir(tmp_path / "run")
    cfg = resolve("tiny")
    model = build_model(cfg.model, 20)
    run.save_adapter(model, ("a",) * 20)
    before = {p.name: p.read_bytes() for p in (run.path / "adapter").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError, match="no space left"):
        run.save_adapter(model, ("b",) * 20, {"x": torch.zeros(2)})
    assert [p.name for p in run.path.iterdir()] == ["adapter"]
    assert {p.name: p.read_bytes() for p in (run.path / "adapter").iterdir()} == before


def test_a_failure_writing_the_views_loses_none_of_the_runs_results(tmp_path, monkeypatch, capsys, task_identity):
    import fedtune.server.app as server_app

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(server_app, "save_views", broken)
    run = federate(tmp_path / "run", "hetlora", rounds="1", **{"num-clients": "2"})
    assert run.summary()["rounds"] == 1 and (run.path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run.path / VIEWS_DIR).exists()
    assert "fedtune: warning: the model views were not written (OSError: disk full)" in capsys.readouterr().err
