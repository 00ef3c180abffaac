"""The benchmarks' confidence intervals (bench/common.py): mean ± 95% Student-t half-width."""

import importlib.util
import math
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).parent.parent / "bench" / "common.py")
common = importlib.util.module_from_spec(_spec)
_env = dict(os.environ)
_spec.loader.exec_module(common)  # it sets the benchmarks' environment (token cache, ...): not for the tests
os.environ.clear()
os.environ.update(_env)


def test_mean_ci_hand_computed():
    # [1, 2, 3]: mean 2, sample sd 1, t(0.975, df=2) = 4.302653 -> half-width 4.302653 / sqrt(3)
    mean, half = common.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    # [0.70, 0.74]: sd 0.028284, t(0.975, df=1) = 12.7062 -> 12.7062 * 0.028284 / sqrt(2) = 0.254124
    assert common.mean_ci([0.70, 0.74])[1] == pytest.approx(0.254124, rel=1e-5)
    assert math.isnan(common.mean_ci([0.5])[1]) and common.mean_ci([0.5])[0] == 0.5


def test_fmt_ci_and_seed_overrides():
    assert common.fmt_ci([0.5]) == "0.500"
    assert common.fmt_ci([1.0, 2.0, 3.0], 2) == "2.00 ± 2.48"
    assert common.fmt_ci([0.01, 0.03], 1, scale=100) == "2.0 ± 12.7"
    assert common.seed_overrides({"rounds": "4"}, 2) == {"rounds": "4", "seed": "2"}
    assert common.seed_overrides({"seed": "10"}, 1)["seed"] == "11"


def test_results_are_read_back_only_for_the_same_settings(tmp_path):
    done = common.Results("acc", {"rounds": "8", "eval-size": "800"}, folder=tmp_path)
    assert done.get("natural/0/fedtune") is None
    done.put("natural/0/fedtune", {"accuracy": [0.7, 0.72], "spr": 101.5})
    again = common.Results("acc", {"eval-size": "800", "rounds": "8"}, folder=tmp_path)  # key order does not matter
    assert again.get("natural/0/fedtune") == {"accuracy": [0.7, 0.72], "spr": 101.5}
    other = common.Results("acc", {"rounds": "4", "eval-size": "800"}, folder=tmp_path)  # another benchmark's runs
    assert other.get("natural/0/fedtune") is None
    with (tmp_path / "acc.jsonl").open("a") as f:
        f.write('{"key": "cut off mid-wr')  # a stop while writing loses only that line
    after = common.Results("acc", {"rounds": "8", "eval-size": "800"}, folder=tmp_path)
    assert after.get("natural/0/fedtune")
    after.put("natural/1/fedtune", {"accuracy": [0.6], "spr": None})  # appended on a line of its own
    assert common.Results("acc", {"rounds": "8", "eval-size": "800"}, folder=tmp_path).get("natural/1/fedtune")


def test_stored_runs_of_older_defaults_are_not_read_back(tmp_path, monkeypatch):
    """A run stored under "fedtune defaults" before a default changed is not the new defaults' run."""
    common.Results("acc", {"rounds": "8"}, folder=tmp_path).put("natural/0/fedtune defaults", {"accuracy": [0.7]})
    assert common.Results("acc", {"rounds": "8"}, folder=tmp_path).get("natural/0/fedtune defaults")
    monkeypatch.setattr(common, "defaults_mark", lambda: "another")  # e.g. local-loss ce -> logit-adjusted
    assert common.Results("acc", {"rounds": "8"}, folder=tmp_path).get("natural/0/fedtune defaults") is None


def test_benchmarks_take_the_gpu_path_only_where_there_is_one(monkeypatch):
    import torch

    base = {"eval-size": "2000"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.on_accelerator(base) is base  # CPU: the stored results' settings are unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.on_accelerator(base) == {"eval-size": "2000", "client-gpus": "0.25"}
    assert common.on_accelerator({"client-gpus": "0.5"}) == {"client-gpus": "0.5"}  # the user's share wins


def _bench_script(name: str, tmp_path, monkeypatch):
    """bench/NAME.py imported as a module, writing its section and runs under ``tmp_path``, on a
    machine without CUDA, with the environment bench/common.py sets undone."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "bench"))
    env = dict(os.environ)
    module = importlib.import_module(name)
    os.environ.clear()
    os.environ.update(env)
    monkeypatch.setattr(module.common, "DOC", tmp_path / "docs" / "benchmarks.md")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    return module


def test_strategies_stored_reports_each_row_over_its_finished_seeds(tmp_path, monkeypatch, capsys):
    """``bench/strategies.py --stored`` trains nothing: each row is the mean ± CI over the seeds
    finished so far, with the count in a seeds column; runs not yet trained are left out."""
    import sys

    strategies = _bench_script("strategies", tmp_path, monkeypatch)
    base = {"num-clients": "10", "partition": "dirichlet", "dirichlet-alpha": "0.5", "eval-size": "50", "model": "tiny"}
    done = strategies.common.Results("strategies", base)
    last = {f"accuracy_rank_{r}": 0.7 for r in (16, 8, 4, 2)}
    summary = {"best_accuracy": 0.72, "bytes_up_total": 2e6, "bytes_down_total": 4e6, "seconds_per_round": 10.0}
    for key, curve in (("0/fedavg", [0.70, 0.68, 0.72]), ("1/fedavg", [0.71, 0.72, 0.73]), ("0/ffa", [0.70, 0.69, 0.71])):
        done.put(key, {"metrics": [{"accuracy": a} for a in curve[:-1]] + [{"accuracy": curve[-1], **last}],
                       "summary": summary})
    done.put("0/centralized", {"final_accuracy": 0.74})
    monkeypatch.setattr(sys, "argv", ["strategies.py", "--stored", "--no-write", "--seeds", "2", "--strategies",
                                      "fedavg,ffa", "--eval-size", "50", "--set", "model=tiny"])
    strategies.main()
    out = capsys.readouterr().out
    tables = [block for block in out.split("\n\n") if block.startswith("| run |")]
    rows, pairs = ({line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in t.splitlines()
                    if not line.startswith("|---")} for t in tables)
    assert set(rows) == {"run", "fedavg", "ffa", "centralized r16 (ceiling)"}  # homogeneous runs: not trained yet
    # worst round after 0 minus round 0, in points: fedavg -2 and +1 -> -0.5 ± 12.706 * 2.1213 / sqrt(2)
    assert rows["fedavg"][4] == "-0.5 ± 19.1" and rows["fedavg"][-1] == "2 |"
    assert rows["ffa"][4] == "-1.0" and rows["ffa"][-1] == "1 |"
    assert rows["centralized r16 (ceiling)"][2] == "0.740" and rows["centralized r16 (ceiling)"][-1] == "1 |"
    # final minus fedavg's and minus the ceiling's, paired by seed over the seeds both finished
    assert pairs["fedavg"][1:] == ["-", "-2.0 (1) |"]  # seed 0 only has a ceiling: 0.72 - 0.74
    assert pairs["ffa"][1:] == ["-1.0 (1)", "-3.0 (1) |"]  # 0.71 - 0.72, 0.71 - 0.74
    assert not (tmp_path / "docs" / "benchmarks.md").exists()


def test_accuracy_stored_pairs_each_recipe_with_the_centralized_runs(tmp_path, monkeypatch, capsys):
    """``bench/accuracy.py --recipe ... --loop plain --stored``: each recipe is a row of its own,
    and fed - central is paired by seed for every federated row."""
    import sys

    accuracy = _bench_script("accuracy", tmp_path, monkeypatch)
    done = accuracy.common.Results("accuracy", {"eval-size": "50", "model": "tiny", "rounds": "2", "loop": "plain"})
    for seed, (fed, adj, cen) in enumerate((([0.70, 0.71, 0.72], [0.70, 0.72, 0.74], [0.70, 0.73, 0.73]),
                                             ([0.60, 0.62, 0.60], [0.60, 0.63, 0.63], [0.60, 0.64, 0.62]))):
        done.put(f"dirichlet-0.5/{seed}/fedtune defaults", {"accuracy": fed, "spr": 10.0})
        done.put(f"dirichlet-0.5/{seed}/fedtune, local-loss=logit-adjusted", {"accuracy": adj, "spr": 12.0})
        done.put(f"dirichlet-0.5/{seed}/centralized, same steps", {"accuracy": cen, "spr": None})
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--stored", "--no-write", "--seeds", "2", "--rounds", "2",
                                      "--partitions", "dirichlet-0.5", "--eval-size", "50", "--set", "model=tiny",
                                      "--recipe", "local-loss=logit-adjusted", "--loop", "plain"])
    accuracy.main()
    out = capsys.readouterr().out
    gaps = {tuple(c.strip() for c in line.split("|")[1:4]): line.split("|")[5].strip()
            for line in out.splitlines() if line.startswith("| dirichlet-0.5 |") and line.count("|") == 6}
    # defaults: 0.72 - 0.73 and 0.60 - 0.62 -> -1.5 ± 12.706 * 0.7071 / sqrt(2) = -1.5 ± 6.4 points
    assert gaps[("dirichlet-0.5", "fedtune defaults", "2")] == "-1.5 ± 6.4"
    # adjusted: 0.74 - 0.73 and 0.63 - 0.62 -> +1.0 ± 0
    assert gaps[("dirichlet-0.5", "fedtune, local-loss=logit-adjusted", "2")] == "1.0 ± 0.0"
    assert "the in-process plain loop" in out and "--loop plain" in out
    assert not (tmp_path / "docs" / "benchmarks.md").exists()
