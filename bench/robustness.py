"""What checkpoints, reply validation and robust aggregation cost per round, on the default
model (all-MiniLM-L6-v2, LoRA r=8 on query/value, 20-class head) with 10 clients.

    .venv/bin/python bench/robustness.py

Writes the ``robustness`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline environment first)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fedtune import wire  # noqa: E402
from fedtune.config import build_config  # noqa: E402
from fedtune.modeling import shared_model  # noqa: E402
from fedtune.profiles import DEFAULT  # noqa: E402
from fedtune.server import checkpoint  # noqa: E402
from fedtune.server.validate import Validator  # noqa: E402
from fedtune.strategies.aggregation import weighted_mean  # noqa: E402
from fedtune.strategies.fedavg import FedAdam  # noqa: E402
from fedtune.strategies.robust import clip_to_norm, coordinate_median, trimmed_mean, weighted_average  # noqa: E402

CLIENTS, REPEAT = 10, 5


def timed(fn) -> float:
    """Median seconds of REPEAT calls."""
    out = []
    for _ in range(REPEAT):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = build_config({"num-clients": CLIENTS})
    state = shared_model(cfg.model, 20, 0).initial  # adapter + head, float32
    n_params = sum(t.numel() for t in state.values())
    g = torch.Generator().manual_seed(0)
    replies_t = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(CLIENTS)]
    rows = []

    strategy = FedAdam(eta=0.01, eta_l=0.01)  # a checkpoint with server moments: 3x the adapter
    strategy.m_t = {k: v.numpy() for k, v in state.items()}
    strategy.v_t = {k: v.numpy() for k, v in state.items()}
    arrays = wire.to_record(state)
    with tempfile.TemporaryDirectory() as tmp:
        sec = timed(lambda: checkpoint.save(tmp, 1, arrays, strategy))
        size = sum(f.stat().st_size for f in (Path(tmp) / "checkpoint").rglob("*") if f.is_file())
        load = timed(lambda: checkpoint.latest(tmp))
    rows.append(["checkpoint write (fedadam: global + m_t + v_t)", sec * 1e3, f"{size / 1e6:.2f} MB"])
    rows.append(["checkpoint read", load * 1e3, ""])

    validator = Validator(cfg)
    members_grid = type("G", (), {"members": {}})()
    validator.begin_round(1, arrays, members_grid)
    stated = {wire.RANK: 8, wire.ALPHA: 16.0, wire.SCALE: 2.0, wire.RSLORA: 0}
    msgs = []
    for i, t in enumerate(replies_t):
        to = Message(RecordDict(), dst_node_id=100 + i, message_type="train")
        content = RecordDict({wire.ARRAYS: wire.to_record(t), wire.ADAPTER: ConfigRecord({wire.PROFILE: DEFAULT}),
                              wire.METRICS: MetricRecord({wire.WEIGHT: 100, wire.CLIENT_ID: i, **stated})})
        msgs.append(Message(content, reply_to=to))
    sent = {100 + i: state for i in range(CLIENTS)}
    kept, rejected = validator(1, msgs, sent)
    assert len(kept) == CLIENTS and not rejected, [r.reason for r in rejected]
    sec = timed(lambda: validator(1, msgs, sent))
    rows.append([f"validate {CLIENTS} replies (decode, checks, cohort norms)", sec * 1e3, ""])

    updates = [{k: r[k] - state[k] for k in state} for r in replies_t]
    weights = [1.0] * CLIENTS
    rows.append(["FedAvg weighted mean (reference)", timed(lambda: weighted_mean(replies_t, weights)) * 1e3, ""])
    sec = timed(lambda: weighted_average([clip_to_norm(u, 1.0) for u in updates], weights))
    rows.append(["robust=norm-bound", sec * 1e3, ""])
    rows.append(["robust=median", timed(lambda: coordinate_median(updates)) * 1e3, ""])
    rows.append(["robust=trimmed-mean (0.1)", timed(lambda: trimmed_mean(updates, 0.1)) * 1e3, ""])

    body = (f"Per-round server cost of checkpoints, validation and robust aggregation: default model "
            f"({n_params:,} trainable parameters), {CLIENTS} replies, median of {REPEAT} "
            f"(`bench/robustness.py`).\n\n" + common.table(["step", "ms", "size"], rows))
    print(body)
    common.write_section("robustness", body)


if __name__ == "__main__":
    np.random.seed(0)
    main()
