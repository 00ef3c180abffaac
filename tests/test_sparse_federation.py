"""Sparse and compressed updates through the server: the decode screen, the mask-aware strategy,
and whole runs on Flower's simulation runtime (with export of a sparse run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune import wire
from fedtune.compression.codecs import Params
from fedtune.compression.sparse_wire import encode_update
from fedtune.config import build_config
from fedtune.profiles import DEFAULT, lookup
from fedtune.server.metered import Metered
from fedtune.server.nodes import Member
from fedtune.server.screen import build_screens
from fedtune.strategies import build_strategy
from fedtune.strategies.sparse import mask_aware_mean

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside a Flower runtime

NODES = {101: 0, 102: 1, 103: 2}
L1 = "base-delta/model.bert.encoder.layer.0.attention.self.query"
L2 = "base-delta/model.bert.encoder.layer.0.attention.self.value"
HEAD = "model.classifier.modules_to_save.default.weight"
CFG = build_config({"num-clients": 3, "adapter": "sparse", "min-train-nodes": 2, "lora-rank": 4})


class FakeGrid:
    def __init__(self, cfg):
        self.members = {n: Member(c, lookup(cfg, DEFAULT)) for n, c in NODES.items()}

    def get_node_ids(self):
        return list(NODES)


def global_state():
    g = torch.Generator().manual_seed(0)
    return {L1: torch.randn(4, 5, generator=g) * 0.1, L2: torch.zeros(4, 5), HEAD: torch.randn(3, 5, generator=g)}


def reply(to: Message, encoded: dict[str, torch.Tensor], cfg=CFG) -> Message:
    node = to.metadata.dst_node_id
    met = {wire.WEIGHT: 10 * node - 1000, wire.CLIENT_ID: NODES[node], wire.RANK: cfg.model.lora_rank,
           wire.ALPHA: cfg.model.lora_alpha, wire.SCALE: 1.0, wire.RSLORA: 0}
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in encoded.items()}),
                          wire.METRICS: MetricRecord(met), wire.ADAPTER: ConfigRecord({wire.PROFILE: DEFAULT})})
    return Message(content, reply_to=to)


T = torch.tensor
UPDATES = {  # node: ({key: (idx, values)}, head delta)
    101: ({L1: (T([0, 3, 7]), T([1.0, 2.0, 3.0])), L2: (T([1]), T([0.5]))}, 0.1),
    102: ({L1: (T([3, 8]), T([-2.0, 4.0])), L2: (T([1, 2]), T([1.5, 1.0]))}, 0.3),
    103: ({L1: (T([0]), T([9.0])), L2: (T([], dtype=torch.long), T([]))}, 0.2),
}


def test_decode_screen_and_mask_aware_strategy_end_to_end():
    """Three encoded replies, one with an index out of bounds: it is rejected with its reason;
    the global state is the mask-aware mean of the two good ones (sent + their sparse deltas)."""
    strategy = Metered(build_strategy(CFG), seed=0, screens=build_screens(CFG), min_replies=2)
    g = global_state()
    msgs = list(strategy.configure_train(1, wire.to_record(g), ConfigRecord(), FakeGrid(CFG)))
    replies = []
    for m in msgs:
        node = m.metadata.dst_node_id
        sparse, head = UPDATES[node]
        enc = encode_update({HEAD: torch.full((3, 5), head)}, sparse, "none", Params(), seeded=False)
        if node == 103:
            enc[L1 + "|idx"] = torch.tensor([20], dtype=torch.int32)  # out of bounds (numel 20)
        replies.append(reply(m, enc))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [r["reason"] for r in strategy.rounds[1].rejected] == [
        f"cannot decode the update: {L1}: index out of bounds [0, 20)"]
    states, masks, weights = [], [], []
    for node in (101, 102):
        sparse, head = UPDATES[node]
        s = {k: v.clone() for k, v in g.items()}
        s[HEAD] += head
        for k, (idx, vals) in sparse.items():
            s[k].view(-1)[idx] += vals
        states.append(s)
        masks.append({k: idx for k, (idx, _) in sparse.items()})
        weights.append(10 * node - 1000)
    expected = mask_aware_mean(states, masks, weights)
    out = wire.from_record(arrays)
    assert out.keys() == expected.keys()
    for k in out:
        assert torch.allclose(out[k], expected[k], atol=1e-6)
    # by hand, entry 3 of L1 (both clients, weights 10 and 20): g + (10 * 2 + 20 * -2) / 30
    assert torch.isclose(out[L1].flatten()[3], g[L1].flatten()[3] + (10 * 2.0 + 20 * -2.0) / 30)
    assert torch.isclose(out[L1].flatten()[8], g[L1].flatten()[8] + 4.0)  # only client 102
    assert torch.equal(out[L1].flatten()[[1, 2, 4]], g[L1].flatten()[[1, 2, 4]])  # nobody: unchanged


SMALL = {"num-clients": "2", "rounds": "2", "train-size": "300", "eval-size": "64", "local-steps": "2",
         "max-length": "24"}


@pytest.mark.slow
def test_sparse_run_through_flower_and_export(tmp_path):
    """adapter=sparse with random (seeded) masks and int8 values: every reply decodes, the global
    sparse delta is the union of the clients' masks, bytes up are a fraction of a dense update,
    and the exported model is the base with the delta merged in."""
    from safetensors.torch import load_file

    from fedtune.edge_export.export import ExportOptions, export_fp32
    from fedtune.modeling import build_model
    from fedtune.presets import resolve
    from fedtune.simulations.simulate import simulate
    from fedtune.sparse.select import num_entries, random_mask

    cfg = resolve("tiny", overrides={**SMALL, "adapter": "sparse", "sparse-selection": "random",
                                      "sparse-density": "0.05", "compression": "int8"})
    summary = simulate(cfg, tmp_path / "run", progress=lambda row: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == [] and r["failures"] == [] for r in rows)
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    deltas = load_file(str(tmp_path / "run" / "adapter" / "base_delta.safetensors"))
    assert len(deltas) == 4  # query and value of 2 layers
    for layer, d in deltas.items():
        mask = random_mask(cfg.federation.seed, layer, d.numel(), num_entries(0.05, d.numel()))
        changed = d.flatten().nonzero().flatten()
        assert set(changed.tolist()) <= set(mask.tolist()) and len(changed) > 0.8 * len(mask)
    dense_update = 4 * summary["trainable_parameters"] + 4 * sum(d.numel() for d in deltas.values())
    train_up = rows[1]["bytes_up"] - 0  # two train replies (+ small evaluate replies)
    assert train_up < 0.5 * 2 * dense_update
    dense_down = 4 * sum(d.numel() for d in deltas.values())  # one dense copy of the global sparse delta
    # round 1 sends a zero delta (indices/values empty): a dense downlink would carry >= 2 dense copies (2 train
    # messages, plus evaluation) on top of the same head and config strings
    assert rows[1]["bytes_down"] < 2 * dense_down

    report = export_fp32(tmp_path / "run", tmp_path / "edge", ExportOptions(examples=16, max_abs_diff=1e-2,
                                                                            latency_runs=1, warmup=0))
    assert report["verification"]["torch"]["max_abs_diff"] <= 1e-5  # merging changes nothing
    from fedtune.edge_export.merge import load_run, merge

    merged = merge(load_run(tmp_path / "run").model).model
    fresh = build_model(cfg.model, 20)
    for layer, d in deltas.items():
        name = layer.removeprefix("model.")
        w = merged.get_submodule(name).weight
        w0 = fresh.get_submodule(layer).base_layer.weight
        assert torch.allclose(w, w0 + d, atol=1e-7)


@pytest.mark.slow
def test_lora_with_dare_and_error_feedback_through_flower(tmp_path):
    from fedtune.presets import resolve
    from fedtune.simulations.simulate import simulate

    plain = resolve("tiny", overrides=SMALL)
    dare = plain.replace(**{"compression": "dare", "dare-p": "0.5", "error-feedback": "true"})
    a = simulate(plain, tmp_path / "plain", progress=lambda row: None)
    b = simulate(dare, tmp_path / "dare", progress=lambda row: None)
    rows = [json.loads(x) for x in (tmp_path / "dare" / "metrics.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == [] and r["clients"] == 2 for r in rows[1:])
    for r, p in zip(rows[1:], plain_rows[1:]):  # half the values, one seed per tensor
        assert r["bytes_up"] < p["bytes_up"]  # tiny model: npy headers and seeds weigh; MiniLM: bench/communication.py
    assert b["final_accuracy"] > 0 and a["final_accuracy"] > 0
