"""Checkpoint and resume: the strategy state round-trips; a killed run resumes to the same adapter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from fedtune import wire
from fedtune.server import checkpoint
from fedtune.server.resume import Offset, ResumeError, resume_config, truncate_metrics
from fedtune.strategies.fedavg import FedAdam, FedAvgM

REPO = Path(__file__).resolve().parents[1]


def test_fedadam_moments_round_trip(tmp_path):
    s = FedAdam(eta=0.1, eta_l=0.1)
    s.m_t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    s.v_t = {"w": np.full((2, 3), 0.25, dtype=np.float64)}
    arrays = wire.to_record({"w": torch.ones(2, 3), "b": torch.zeros(3)})
    checkpoint.save(tmp_path, 2, arrays, s)
    fresh = FedAdam(eta=0.1, eta_l=0.1)
    ckpt = checkpoint.latest(tmp_path)
    checkpoint.restore_strategy(fresh, ckpt.tensors, ckpt.meta)
    assert ckpt.round == 2 and list(ckpt.arrays.keys()) == ["w", "b"]  # the order Flower zips by
    assert np.array_equal(fresh.m_t["w"], s.m_t["w"]) and fresh.m_t["w"].dtype == np.float32
    assert np.array_equal(fresh.v_t["w"], s.v_t["w"]) and fresh.v_t["w"].dtype == np.float64
    assert torch.equal(wire.from_record(ckpt.arrays)["w"], torch.ones(2, 3))


def test_fedavgm_momentum_and_nested_state_round_trip(tmp_path):
    class Wrapper:  # a wrapper chain (Metered -> DP -> strategy) is walked through .inner / .strategy
        def __init__(self, inner):
            self.inner = inner
            self.group_B = {"gpu": {"layer.0": torch.tensor([[1.0, 2.0]])}}
            self.clipping_norm = 0.7

    s = FedAvgM(server_momentum=0.9)
    s.momentum_vector = [np.array([1.0, -2.0], dtype=np.float32), np.array([[3.0]], dtype=np.float32)]
    checkpoint.save(tmp_path, 1, ArrayRecord(), Wrapper(s))
    fresh = Wrapper(FedAvgM(server_momentum=0.9))
    fresh.group_B, fresh.clipping_norm = {}, 1.0
    ckpt = checkpoint.latest(tmp_path)
    checkpoint.restore_strategy(fresh, ckpt.tensors, ckpt.meta)
    assert [v.tolist() for v in fresh.inner.momentum_vector] == [[1.0, -2.0], [[3.0]]]
    assert torch.equal(fresh.group_B["gpu"]["layer.0"], torch.tensor([[1.0, 2.0]]))
    assert fresh.clipping_norm == 0.7


def test_client_level_accountant_round_trip(tmp_path):
    from fedtune.privacy.accountant import PrivacyAccountant

    class DP:
        def __init__(self):
            self.accountant = PrivacyAccountant("rdp")

    s = DP()
    for _ in range(3):
        s.accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    checkpoint.save(tmp_path, 3, ArrayRecord(), s)
    fresh = DP()
    ckpt = checkpoint.latest(tmp_path)
    checkpoint.restore_strategy(fresh, ckpt.tensors, ckpt.meta)
    assert fresh.accountant.steps == 3
    assert fresh.accountant.epsilon(1e-5) == pytest.approx(s.accountant.epsilon(1e-5), rel=1e-12)


def test_only_the_latest_complete_round_is_kept(tmp_path):
    for r in (0, 1, 2):
        checkpoint.save(tmp_path, r, ArrayRecord(), object())
    (tmp_path / "checkpoint" / ".round-0003.123.tmp").mkdir()  # a write cut short: ignored
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("round-*")) == ["round-0002"]
    assert checkpoint.latest(tmp_path).round == 2


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    rows = [json.dumps({"round": r}) for r in range(4)] + ['{"round": 4, "acc']  # the last one cut short
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    assert truncate_metrics(tmp_path, 2) == 2
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_offset_shifts_every_round_number():
    seen = []

    class Spy:
        def configure_train(self, r, *a):
            seen.append(("ct", r))
            return []

        def aggregate_train(self, r, replies):
            seen.append(("at", r))
            return None, None

        def configure_evaluate(self, r, *a):
            seen.append(("ce", r))
            return []

        def aggregate_evaluate(self, r, replies):
            seen.append(("ae", r))

        def summary(self):
            pass

    off = Offset(Spy(), 2)
    off.configure_train(1, None, None, None)
    off.aggregate_train(1, [])
    off.configure_evaluate(1, None, None, None)
    off.aggregate_evaluate(1, [])
    evaluated = []
    fn = off.evaluate_fn(lambda r, a: evaluated.append(r))
    fn(0, None)  # the resumed model: recorded before the interruption, not again
    fn(1, None)
    assert seen == [("ct", 3), ("at", 3), ("ce", 3), ("ae", 3)] and evaluated == [3]


def test_resume_refuses_changes_and_runs_without_checkpoint(tmp_path):
    from fedtune.presets import resolve
    from fedtune.server.run_dir import RunDir

    RunDir(tmp_path).create(resolve("tiny"))
    with pytest.raises(ResumeError, match="no checkpoint"):
        resume_config(tmp_path, None, [], None)
    with pytest.raises(ResumeError, match="drop --config, --set"):
        resume_config(tmp_path, None, ["rounds=9"], None)
    with pytest.raises(ResumeError, match="not a run directory"):
        resume_config(tmp_path / "nope", None, [], None)


# -- the acceptance test: a run cut mid-round, resumed, against the uninterrupted run ----------

STRATEGIES = ("fedavg", "fedadam")


def _simulate(out: Path, strategy: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedtune", "simulate", *extra]
    if "--resume" not in extra:
        cmd += ["--preset", "tiny", "--set", "rounds=3", "--set", "local-steps=20",
                "--set", f"strategy={strategy}", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(out.parent / f"{out.name}.log", "a"))


def _cut(p: subprocess.Popen, run: Path, cut: Path) -> None:
    """``cut``: ``run`` as a SIGKILL of its server process would leave it now. The process that
    writes the run directory (the ServerApp runs in the driver) is frozen (SIGSTOP) while the
    folder is copied, then goes on: the same run is the uninterrupted reference."""
    os.kill(p.pid, signal.SIGSTOP)
    try:
        shutil.copytree(run, cut)
    finally:
        os.kill(p.pid, signal.SIGCONT)


def _kill_session(p: subprocess.Popen) -> None:
    """SIGKILL the process group and every process left in its session (Ray's own groups)."""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == p.pid:  # field 6 of stat: the session id
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """For each strategy, side by side (start-up dominates): an uninterrupted run ``<s>-ref``,
    cut (``_cut``) once round 2 is checkpointed into ``<s>-cut``, and ``<s>-cut`` resumed."""
    root = tmp_path_factory.mktemp("resume")
    runs = {s: _simulate(root / f"{s}-ref", s) for s in STRATEGIES}
    resumes: list[subprocess.Popen] = []
    deadline = time.monotonic() + 600
    pending = set(STRATEGIES)
    try:
        while pending:
            for s in sorted(pending):
                if (root / f"{s}-ref" / "checkpoint" / "round-0002").exists():
                    _cut(runs[s], root / f"{s}-ref", root / f"{s}-cut")
                    pending.discard(s)
                else:
                    assert runs[s].poll() is None, f"{s}: the run ended before round 2 was checkpointed"
            assert time.monotonic() < deadline, f"{sorted(pending)}: round 2 was not checkpointed in 600 s"
            time.sleep(0.02)
        for s in STRATEGIES:
            cut = root / f"{s}-cut"
            assert checkpoint.latest(cut).round == 2 and not (cut / "summary.json").exists()  # cut mid-run
        resumes = [_simulate(root / f"{s}-cut", s, "--resume", str(root / f"{s}-cut")) for s in STRATEGIES]
        for p in resumes + list(runs.values()):
            assert p.wait(timeout=600) == 0
    finally:
        for p in [*runs.values(), *resumes]:
            if p.poll() is None:  # only on failure
                _kill_session(p)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_killed_run_resumes_to_the_uninterrupted_adapter(resumed, strategy):
    ref, cut = resumed / f"{strategy}-ref", resumed / f"{strategy}-cut"
    a, b = _adapter(ref), _adapter(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # no row lost, none twice
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-6)


def test_a_restarted_fedsa_client_takes_its_B_from_an_earlier_round_only(tmp_path):
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from fedtune.client.adapter import save_personal
    from fedtune.client.restore import saved_personal
    from fedtune.presets import resolve
    from fedtune.profiles import DEFAULT, lookup

    cfg = resolve("tiny", overrides={"strategy": "fedsa", "client-state-dir": str(tmp_path / "clients")})
    B = {"layer.lora_B.default.weight": torch.arange(6.0).reshape(3, 2)}
    save_personal(cfg, 2, lookup(cfg, DEFAULT), B, server_round=2)

    def at(r):
        return SimpleNamespace(content=RecordDict({wire.CONFIG: ConfigRecord({"server-round": r})}))

    assert torch.equal(saved_personal(cfg, 2, at(3))["layer.lora_B.default.weight"], B["layer.lora_B.default.weight"])
    assert saved_personal(cfg, 2, at(2)) == {}  # written in this round: an interrupted round's, ignored
    assert saved_personal(cfg, 1, at(3)) == {}  # no file
    assert saved_personal(cfg.replace(**{"lora-rank": 8}), 2, at(3)) == {}  # another rank: not ours

    # the checkpoint keeps a copy; resuming puts it back over a later (interrupted) write
    ckpt_dir = checkpoint.save(tmp_path / "run", 2, ArrayRecord(), object(), tmp_path / "clients")
    save_personal(cfg, 2, lookup(cfg, DEFAULT), {"layer.lora_B.default.weight": torch.zeros(3, 2)}, server_round=3)
    assert checkpoint.restore_clients(checkpoint.latest(tmp_path / "run"), tmp_path / "clients") == 1
    assert (ckpt_dir / "clients" / "client-2.safetensors").is_file()
    assert torch.equal(saved_personal(cfg, 2, at(3))["layer.lora_B.default.weight"], B["layer.lora_B.default.weight"])


def test_cli_resume_errors_are_one_line_exit_2(tmp_path, capsys):
    from fedtune.cli import main

    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a run directory" in err
