"""Edge export: merged adapter -> ONNX (fp32, int8), parity with torch, the torch-free runtime, CLI errors.

Fast tests use the tiny config-built model; @slow ones the bundled MiniLM (minutes on CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.cli import main
from fedtune.edge_export.demo_run import demo_model, perturb_adapter, save_demo_run, train_demo_run
from fedtune.edge_export.errors import ExportError, ParityError
from fedtune.edge_export.export import ExportOptions, export_fp32, export_fp32_int8
from fedtune.edge_export.layout import LABELS, MODEL_FP32, MODEL_INT8, REPORT, TOKENIZER
from fedtune.edge_export.runtime import EdgeClassifier
from fedtune.edge_export.verify import sample_texts
from fedtune.modeling import load_tokenizer
from fedtune.presets import resolve

FAST = ExportOptions(examples=48, latency_runs=3, warmup=1)


# -- fixtures: one tiny run and one tiny export per session ------------------------------------


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny run with random LoRA and head matrices: merging changes weights, predictions vary."""
    cfg = resolve("tiny", None, {"eval-size": 64})
    model = demo_model(cfg, steps=3)
    perturb_adapter(model, std=1.0)
    run = save_demo_run(cfg, model, tmp_path_factory.mktemp("tiny") / "run")
    return run.path, model.eval(), cfg


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-export") / "edge"
    return out, export_fp32_int8(tiny_run[0], out, FAST)


def _torch_logits(model, cfg, texts: list[str]) -> np.ndarray:
    """The in-memory (unmerged) model on the transformers tokenizer: the independent reference."""
    tok = load_tokenizer(cfg.model.model)
    enc = tok(texts, truncation=True, max_length=cfg.data.max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedtune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# -- export and verification --------------------------------------------------------------------


def test_tiny_fp32_parity_within_1e4(tiny_export):
    _, report = tiny_export
    ver = report["verification"]
    assert ver["examples"] == 48
    assert ver["fp32"]["max_abs_diff"] <= 1e-4
    assert ver["fp32"]["argmax_agreement"] == 1.0
    assert ver["torch"]["max_abs_diff"] <= 1e-5  # merging the adapter changes (almost) nothing
    assert ver["fp32"]["accuracy"] == ver["reference_accuracy"]
    assert ver["int8"]["argmax_agreement"] >= 0.9


def test_report_has_sizes_and_latencies(tiny_export):
    out, report = tiny_export
    assert json.loads((out / REPORT).read_text()) == report
    assert report["opset"] == 18 and report["files"] == {"fp32": MODEL_FP32, "int8": MODEL_INT8}
    assert report["sizes_bytes"]["fp32"] == (out / MODEL_FP32).stat().st_size
    assert report["sizes_bytes"]["int8"] < 0.5 * report["sizes_bytes"]["fp32"]
    for batch in ("batch_1", "batch_8"):
        for engine in ("torch", "fp32", "int8"):
            t = report["latency"][batch][engine]
            assert 0 < t["p50_ms"] <= t["p95_ms"]
    assert report["ratios"]["fp32_vs_torch_p50_batch_1"] > 0


def test_report_versions_from_a_source_tree(tmp_path, monkeypatch):
    """Run as ``python -m fedtune`` from a checkout (the GPU machine does): fedtune has no
    installed metadata, and the report names its source version instead of failing the export."""
    import importlib.metadata as md

    import fedtune
    from fedtune import version as fedtune_version
    from fedtune.edge_export.report import metadata

    real = md.version

    def version(package: str) -> str:
        if package in ("fedtune", "onnxruntime"):
            raise md.PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(fedtune_version, "version", version)
    got = metadata(tmp_path, resolve("tiny"), ["a", "b"], 18)["versions"]
    assert got["fedtune"] == fedtune.__version__ and got["onnxruntime"] == "not installed"
    assert got["torch"] == real("torch")
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == fedtune.__version__


def test_export_folder_is_self_contained_and_clean(tiny_export):
    out, _ = tiny_export
    names = {p.name for p in out.iterdir()}
    assert {MODEL_FP32, MODEL_INT8, TOKENIZER, LABELS, REPORT} <= names
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging folder left behind


def test_onnx_axes_are_dynamic(tiny_export):
    import onnx

    model = onnx.load(str(tiny_export[0] / MODEL_FP32), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert all(d.dim_param and not d.dim_value for d in dims), inp
    clf = EdgeClassifier(tiny_export[0])
    for batch, seq in ((1, 3), (3, 7), (8, 32)):
        feed = {"input_ids": np.full((batch, seq), 1000, np.int64), "attention_mask": np.ones((batch, seq), np.int64)}
        assert clf.run(feed).shape == (batch, 20)


def test_runtime_predictions_equal_the_torch_model(tiny_run, tiny_export):
    run_dir, model, cfg = tiny_run
    texts = sample_texts(cfg, 40)[0]
    ref = _torch_logits(model, cfg, texts)
    clf = EdgeClassifier(tiny_export[0])
    ids = load_tokenizer(cfg.model.model)(texts, truncation=True, max_length=cfg.data.max_length)["input_ids"]
    edge_ids = clf.encode(texts)
    assert [list(r[m == 1]) for r, m in zip(edge_ids["input_ids"], edge_ids["attention_mask"])] == ids
    np.testing.assert_allclose(clf.logits(texts, batch_size=7), ref, atol=1e-4)
    labels = json.loads((run_dir / "adapter" / "labels.json").read_text())
    preds = clf.predict(texts)
    assert [p[0] for p in preds] == [labels[k] for k in ref.argmax(-1)]
    assert len({p[0] for p in preds}) > 1  # the perturbed model does not predict one constant class
    probs = np.exp(ref - ref.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose([p[1] for p in preds], probs.max(-1), atol=1e-5)
    int8 = EdgeClassifier.int8(tiny_export[0]).predict(texts)
    assert np.mean([a[0] == b[0] for a, b in zip(int8, preds)]) >= 0.9


def test_edge_runtime_and_infer_import_no_torch(tiny_export):
    code = textwrap.dedent(f"""
        import sys
        from fedtune.edge_export.runtime import EdgeClassifier
        EdgeClassifier({str(tiny_export[0])!r}).predict(["a text about space"])
        from fedtune.cli import main
        assert main(["infer", {str(tiny_export[0])!r}, "hello", "world"]) == 0
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "flwr"))
        print("HEAVY", heavy)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout
    assert len([line for line in res.stdout.splitlines() if line.count("\t") == 2]) == 2


def test_failed_parity_leaves_nothing(tiny_run, tmp_path):
    out = tmp_path / "edge"
    with pytest.raises(ParityError, match=r"differ from torch by up to .* nothing was written"):
        export_fp32(tiny_run[0], out, ExportOptions(examples=16, max_abs_diff=1e-12, latency_runs=1, warmup=0))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_folder_that_is_not_an_export(tiny_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export folder"):
        export_fp32(tiny_run[0], tmp_path, FAST)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_export_replaces_a_previous_export(tiny_run, tmp_path, capsys):
    out = tmp_path / "edge"
    out.mkdir()
    (out / REPORT).write_text("{}")
    (out / "stale.bin").write_text("old")
    assert main(["export", str(tiny_run[0]), "--out", str(out), "--examples", "16", "--latency-runs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "onnx fp32" in printed and "onnx int8" not in printed
    expected = [MODEL_FP32, TOKENIZER, "tokenizer_config.json", LABELS, REPORT]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert [p.name for p in tmp_path.iterdir()] == ["edge"]


# -- one-line errors ----------------------------------------------------------------------------


def _broken_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize(
    "breakage, args, message",
    [
        ("corrupt-model", ["some text"], "cannot load the model"),
        ("truncated-model", ["some text"], "cannot load the model"),
        ("missing-int8", ["--int8", "some text"], "no model.int8.onnx"),
        ("missing-tokenizer", ["some text"], "no tokenizer.json"),
        ("corrupt-tokenizer", ["some text"], "cannot load the tokenizer"),
        ("none", [], "no input text given"),
        ("none", ["  "], "input text 1 is empty"),
    ],
)
def test_infer_errors_are_one_line(tiny_export, tmp_path, breakage, args, message):
    folder = _broken_copy(tiny_export[0], tmp_path / "edge")
    model = folder / MODEL_FP32
    if breakage == "corrupt-model":
        model.write_bytes(b"this is not a protobuf")
    elif breakage == "truncated-model":
        model.write_bytes(model.read_bytes()[:5000])
    elif breakage == "missing-int8":
        (folder / MODEL_INT8).unlink()
    elif breakage == "missing-tokenizer":
        (folder / TOKENIZER).unlink()
    elif breakage == "corrupt-tokenizer":
        (folder / TOKENIZER).write_text("{")
    flags = [a for a in args if a.startswith("--")]
    res = _cli("infer", *flags, str(folder), *[a for a in args if not a.startswith("--")])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: ") and message in lines[0], res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("args", [["--examples", "0"], []])
def test_export_user_errors_are_one_line(tmp_path, capsys, args):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "edge"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedtune: error: ") and len(err) == 1 + (not args)  # + the "exporting" notice
    assert ("must be positive" if args else "run directory not found") in err[-1]
    assert list(tmp_path.iterdir()) == []


# -- the real model (minutes) -------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """MiniLM + LoRA trained 60 centralized steps (about 55% test accuracy: enough for the
    int8 comparison to mean something), exported and verified on 1000 test examples (1 point = 10 examples)."""
    root = tmp_path_factory.mktemp("minilm")
    run = train_demo_run(resolve("default", None, {"eval-size": 200}), root / "run", steps=60)
    return export_fp32_int8(run.path, root / "edge", ExportOptions(examples=1000, latency_runs=5))


@pytest.mark.slow
def test_default_fp32_parity_within_1e4(default_export):
    assert default_export["verification"]["fp32"]["max_abs_diff"] <= 1e-4
    assert default_export["verification"]["fp32"]["argmax_agreement"] == 1.0


@pytest.mark.slow
def test_default_int8_accuracy_drop_at_most_one_point(default_export):
    ver = default_export["verification"]
    assert ver["reference_accuracy"] >= 0.4  # a model that has learned something
    assert ver["reference_accuracy"] - ver["int8"]["accuracy"] <= 0.01
    assert default_export["ratios"]["int8_vs_fp32_size"] <= 0.30


# -- the parity gate is relative to the logits' size ---------------------------------------------


def test_parity_tolerance_is_relative_to_the_largest_logit():
    from fedtune.edge_export.verify import logit_scale, within_tolerance

    ref = np.array([[800.0, -3.0], [12.0, 0.5]])
    assert logit_scale(ref) == 800.0 and logit_scale(ref / 1000) == 1.0  # never below 1
    assert within_tolerance(3.05e-4, logit_scale(ref), 1e-4)  # the FedNCM head of issue 14: passes now
    assert not within_tolerance(3.05e-4, logit_scale(ref / 1000), 1e-4)  # small logits: still 1e-4 absolute
    assert not within_tolerance(0.1, 800.0, 1e-4) and not within_tolerance(float("nan"), 800.0, 1e-4)


def test_large_logit_head_exports_and_a_wrong_export_still_fails(tmp_path, monkeypatch):
    """A head with logits in the hundreds exports (the gate scales with them); the same run
    with one base weight changed in the exported model is refused."""
    from torch import nn

    from fedtune.edge_export import export as export_mod
    from fedtune.head_init import head_module

    cfg = resolve("tiny", None, {"eval-size": 32})
    model = demo_model(cfg, steps=1, train_examples=64)
    with torch.no_grad():
        head_module(model).weight.mul_(1e4)  # |logits| ~ hundreds, as a FedNCM head on a tiny base
    run = save_demo_run(cfg, model, tmp_path / "run")
    opts = ExportOptions(examples=16, latency_runs=1, warmup=0)
    fp32 = export_fp32(run.path, tmp_path / "ok", opts)["verification"]["fp32"]
    assert fp32["logit_scale"] > 200 and fp32["argmax_agreement"] == 1.0
    assert fp32["max_abs_diff"] <= 1e-4 * fp32["logit_scale"]

    real_merge = export_mod.merge

    def wrong_merge(m, *kind):  # a broken export: one base matrix 1% off
        merged = real_merge(m, *kind)
        dense = [x for x in merged.modules() if isinstance(x, nn.Linear)][-2]  # the last one before the head
        with torch.no_grad():
            dense.weight.add_(0.01 * dense.weight.std() * torch.randn(dense.weight.shape, generator=torch.Generator().manual_seed(0)))
        return merged

    monkeypatch.setattr(export_mod, "merge", wrong_merge)
    with pytest.raises(ParityError, match=r"the largest \|logit\|\) on 16 test examples; nothing was written"):
        export_fp32(run.path, tmp_path / "bad", opts)
    assert not (tmp_path / "bad").exists()
