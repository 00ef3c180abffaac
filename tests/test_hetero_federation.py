"""Every heterogeneous-rank strategy through Flower's simulation runtime, with mixed ranks.

One ``run_simulation`` (one Ray start, ~40 s here) runs the seven federations one after the
other from a single ServerApp, on the same two SuperNodes: a rank-8 all-layer client and a
rank-2 one-layer client. Running them back to back on the same actors also checks that a
cached client model serves one strategy after another (trainable set, base weights, FFA's A).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from safetensors.torch import load_file

from fedtune.presets import resolve
from fedtune.server.run_dir import RunDir

NAMES = ["fedavg", "hetlora", "flexlora", "flora", "ffa", "fedsa", "fedex"]
SMALL = {"num-clients": "2", "rounds": "2", "train-size": "200", "eval-size": "48", "local-steps": "2",
         "max-length": "24", "fraction-evaluate": "1.0", "profiles": "gpu-small,edge",
         "profile-defs": "edge lora-rank=2 layers=1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as client_app
    from fedtune.server.app import run_federation
    from fedtune.simulations.simulate import backend_config, preflight

    cfgs = {n: resolve("tiny", overrides={**SMALL, "strategy": n}) for n in NAMES}
    cfgs["fedsa"] = resolve("tiny", overrides={**SMALL, "strategy": "fedsa", "profile-eval-every": "0"})
    root = tmp_path_factory.mktemp("hetero")
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for name, cfg in cfgs.items():
            run_federation(grid, cfg, RunDir(root / name).create(cfg), progress=lambda row: None)

    first = cfgs[NAMES[0]]
    preflight(first)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                       backend_config=backend_config(first), verbose_logging=False)
    finally:
        flwr_logger.setLevel(level)
    return {n: RunDir(root / n) for n in NAMES}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_strategy_runs_with_mixed_ranks(runs, name: str) -> None:
    run = runs[name]
    assert (run.path / "summary.json").exists(), f"{name} did not finish"
    rows = run.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 2 and r["failures"] == []
        ranks = ("accuracy_rank_2", "accuracy_rank_8") if name != "fedsa" or r["round"] == 2 else ()
        for key in ("accuracy", *ranks, "train_loss", "client_accuracy"):
            assert math.isfinite(r[key]), (name, key)
    if name == "fedsa":  # profile-eval-every=0: each rank's own model at the last round only
        assert [r["round"] for r in rows if "accuracy_rank_2" in r] == [2]
    else:
        assert all("accuracy_rank_8" in r for r in rows[1:])  # round 0: the members' profiles are not known yet
        assert "lora-rank" not in r and r["bytes_up"] > 0 and r["bytes_down"] > 0


@pytest.mark.slow
def test_bytes_follow_what_each_strategy_sends(runs) -> None:
    up = {n: runs[n].metrics()[1]["bytes_up"] for n in NAMES}
    down = {n: [r["bytes_down"] for r in runs[n].metrics()] for n in NAMES}
    assert up["ffa"] < up["fedavg"]  # B only (A is frozen and shared)
    assert down["fedsa"][1] < down["fedavg"][1]  # A only (B stays on the client)
    # FLoRA: round 1 trains from the head alone (fresh adapters); afterwards every message
    # carries the dense cumulative base deltas, more than the adapters themselves
    assert down["flora"][1] < down["flora"][2] and down["fedavg"][2] < down["flora"][2]
    assert down["fedex"][2] > down["fedavg"][2]  # factors + residual base deltas


@pytest.mark.slow
def test_base_deltas_are_saved_beside_the_adapter(runs) -> None:
    for name in NAMES:
        path = runs[name].path / "adapter" / "base_delta.safetensors"
        assert path.exists() is (name in ("flora", "fedex", "flexlora")), name
        if path.exists():
            deltas = load_file(str(path))
            # FLoRA merges every layer; FedEx/FlexLoRA residuals vanish on a layer a single client trains
            nonzero = [v.abs().max() > 0 for v in deltas.values()]
            assert deltas and (all(nonzero) if name == "flora" else any(nonzero)), name
    cfg = json.loads((runs["flora"].path / "config.json").read_text())
    assert cfg["profiles"] == "gpu-small,edge" and cfg["strategy"] == "flora"
