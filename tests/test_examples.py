"""Every script in examples/ runs, at a tiny setting, as a user runs it (so they never rot); the
Python API gives the CLI's run exactly; a generated Flower App runs with ``flwr run`` against a
local SuperLink and two SuperNodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# the quick preset on the tiny model, 2 clients: seconds of training, the rest is Ray and imports
TINY = ["model=tiny", "num-clients=2", "rounds=2", "train-size=200", "eval-size=50", "local-steps=2"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def _run(args: list[str], cwd: Path, timeout: float = 600) -> str:
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("quickstart")
    out = _run([str(EXAMPLES / "quickstart.py"), *TINY], cwd)
    assert "round 2: accuracy" in out and "final accuracy:" in out
    return cwd / out.split("run directory: ")[1].splitlines()[0]  # relative to the script's working directory


@pytest.mark.slow
def test_the_api_gives_the_cli_run_exactly(quickstart_run, tmp_path):
    """examples/quickstart.py (``fedtune.simulate(preset="quick", ...)``) and ``fedtune simulate
    --preset quick --set ...`` with the same keys: the same config and the same metrics."""
    cli = tmp_path / "cli"
    _run(["-m", "fedtune", "simulate", "--preset", "quick", *[a for k in TINY for a in ("--set", k)],
          "--out", str(cli)], tmp_path)
    assert json.loads((cli / "config.json").read_text()) == json.loads((quickstart_run / "config.json").read_text())
    api_rows, cli_rows = _rows(quickstart_run), _rows(cli)
    assert [r["round"] for r in api_rows] == [0, 1, 2] and api_rows[2]["clients"] == 2
    assert _timeless(api_rows) == _timeless(cli_rows)  # accuracy, loss, bytes, train metrics: all equal


@pytest.mark.slow
def test_serve_on_device_example_exports_and_classifies(quickstart_run, tmp_path):
    out = _run([str(EXAMPLES / "serve_on_device.py"), str(quickstart_run)], tmp_path)
    assert "int8 accuracy" in out
    labels = json.loads((quickstart_run / "adapter" / "labels.json").read_text())
    predictions = [line.split()[0] for line in out.splitlines()[-2:]]
    assert all(p in labels for p in predictions), out
    assert (quickstart_run / "edge" / "model.int8.onnx").is_file()


@pytest.mark.slow
def test_own_csv_example(tmp_path):
    out = _run([str(EXAMPLES / "own_csv.py"), "model=tiny", "num-clients=2", "rounds=1", "local-steps=2"], tmp_path)
    assert out.startswith("demo_posts.csv: accuracy") and '["food", "sport", "tech"]' in out
    assert (tmp_path / "demo_posts.csv").read_text().startswith("text,label\n")


@pytest.mark.slow
def test_plugin_strategy_example_mixed_ranks_through_flower(tmp_path):
    """examples/my_strategy.py's holder-avg over rank-2 and rank-8 clients on Flower's simulation
    runtime: the Ray actors import the plugin too; the run's config.json names it."""
    out = _run([str(EXAMPLES / "plugin_strategy.py"), *TINY], tmp_path)
    assert "strategy: holder-avg plugins: ['my_strategy'] profiles: phone,laptop" in out
    run = next((tmp_path / "runs").iterdir())
    config = json.loads((run / "config.json").read_text())
    assert (config["strategy"], config["plugins"]) == ("holder-avg", ["my_strategy"])
    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 2 and not r["failures"] and not r["rejected"]
        assert "accuracy_rank_2" in r and "accuracy_rank_8" in r  # each rank group's model evaluated
        assert sorted(d["profile"] for d in r["client_devices"]) == ["laptop", "phone"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.slow
def test_llm_example_with_a_local_model_folder(tmp_path):
    from fedtune.bases import base_causal_lm, load_tokenizer

    folder = tmp_path / "my-llama"
    base_causal_lm("tiny-llama").save_pretrained(str(folder))  # a local folder: config, weights, tokenizer
    load_tokenizer("tiny-llama").save_pretrained(str(folder))
    out = _run([str(EXAMPLES / "llm_local_folder.py"), str(folder), "num-clients=2", "rounds=1", "eval-size=16",
                "local-steps=2", "batch-size=4", "max-length=64"], tmp_path)
    assert "round 1: perplexity" in out
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "config.json").read_text())["model"] == str(folder)


@pytest.mark.slow
def test_flwr_run_on_a_generated_app_against_a_local_superlink(tmp_path):
    """``fedtune app`` then ``flwr run APP CONNECTION``: a SuperLink (no TLS) and two plain
    SuperNodes started as a Flower user would, their partition ids from --node-config. The run
    uses examples/my_strategy.py over clients of ranks 2 and 8: the app carries the plugin file,
    and the ServerApp and ClientApp processes import it from the installed app (examples/ is
    not on their path)."""
    from fedtune.deploy import processes as P

    app, run = tmp_path / "app", tmp_path / "run"
    _run(["-m", "fedtune", "app", str(app), "--preset", "tiny", "--set", "num-clients=2", "--set", "rounds=2",
          "--set", "head-init=random", "--set", "fraction-evaluate=0", "--set", "local-steps=2",
          "--set", "round-timeout=240", "--set", "plugins=my_strategy", "--set", "strategy=holder-avg",
          "--set", "profile-defs=phone lora-rank=2,laptop lora-rank=8", "--set", "profiles=phone,laptop",
          "--out", str(run)], EXAMPLES)  # python -m: my_strategy is importable from the working directory
    assert (app / "my_strategy.py").is_file()
    port = P.free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = P.flower_env(home, {"PYTHONPATH": str(ROOT)})
    procs = []
    try:
        link = P.start([P.executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                        "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "link.db")],
                       env, tmp_path / "superlink.log")
        procs.append(link)
        P.wait_listening("127.0.0.1", port, link, tmp_path / "superlink.log")
        for i in range(2):
            procs.append(P.start([P.executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                  "--node-config", f"partition-id={i} num-partitions=2", "--port", str(P.free_port())],
                                 P.flower_env(tmp_path / f"node{i}", {"PYTHONPATH": str(ROOT)}),
                                 tmp_path / f"node{i}.log"))
        res = subprocess.run([P.executable("flwr"), "run", str(app), "test", "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and json.loads(res.stdout[res.stdout.find("{"):])["success"], res.stdout + res.stderr
        deadline = time.monotonic() + 420
        while not (run / "summary.json").exists() and time.monotonic() < deadline:
            assert link.poll() is None, P.tail(tmp_path / "superlink.log", 30)
            time.sleep(1)
    finally:
        for proc in reversed(procs):
            P.stop_tree(proc, grace=3)
    assert (run / "summary.json").exists(), P.tail(tmp_path / "superlink.log", 30) + P.tail(tmp_path / "node0.log")
    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["bytes_up"] > 0 and not r["failures"] for r in rows[1:])
    assert sorted(d["client"] for d in rows[1]["client_devices"]) == [0, 1]  # the partition ids from --node-config
    assert sorted(d["profile"] for d in rows[1]["client_devices"]) == ["laptop", "phone"]
    assert "accuracy_rank_2" in rows[2] and "accuracy_rank_8" in rows[2]
    config = json.loads((run / "config.json").read_text())
    assert (config["rounds"], config["strategy"], config["plugins"]) == (2, "holder-avg", ["my_strategy"])
