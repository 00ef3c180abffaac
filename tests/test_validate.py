"""Bad updates: each kind of malformed reply is rejected with its reason, and the global model
is bit-identical to aggregating the good replies alone; the decoder survives random input."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune import wire
from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.profiles import DEFAULT, lookup
from fedtune.server.metered import Metered
from fedtune.server.nodes import Member
from fedtune.server.reply import Decoded, decode_update
from fedtune.server.screen import BadUpdate, build_screens
from fedtune.strategies import build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside a Flower runtime

LAYER = "base_model.model.bert.encoder.layer.0.attention.self.query"
A, B, HEAD = LAYER + ".lora_A.default.weight", LAYER + ".lora_B.default.weight", "base_model.model.classifier.weight"
NODES = {101: 0, 102: 1, 103: 2, 104: 3}  # node id -> client id
CFG = build_config({"num-clients": 4, "lora-rank": 4, "lora-alpha": 16, "min-train-nodes": 2})
SCALE = 16 / 4


class FakeGrid:
    def __init__(self, cfg=CFG):
        self.members = {n: Member(c, lookup(cfg, DEFAULT)) for n, c in NODES.items()}

    def get_node_ids(self):
        return list(NODES)


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(4, 6, generator=g), B: torch.zeros(6, 4), HEAD: torch.randn(3, 6, generator=g)}


def reply(to: Message, state: dict[str, torch.Tensor], *, rank: int = 4, client: int | None = None,
          profile: str = DEFAULT, scale: float = SCALE, weight: float | None = None) -> Message:
    node = to.metadata.dst_node_id
    met = {wire.WEIGHT: 10 + node if weight is None else weight, wire.CLIENT_ID: NODES[node] if client is None else client, wire.RANK: rank,
           wire.ALPHA: 16.0, wire.SCALE: scale, wire.RSLORA: 0}
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
                          wire.METRICS: MetricRecord(met), wire.ADAPTER: ConfigRecord({wire.PROFILE: profile})})
    return Message(content, reply_to=to)


def trained(to: Message, seed: int, size: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + size * torch.randn(v.shape, generator=g) for k, v in global_state().items()}


def run_round(cfg, bad: dict[int, Message | None] | None = None, caps=None):
    """(aggregate with the screens, the same strategy's aggregate of the good replies alone, Metered)."""
    strategy = Metered(build_strategy(cfg), seed=0, screens=build_screens(cfg, caps), min_replies=2)
    msgs = list(strategy.configure_train(1, wire.to_record(global_state()), ConfigRecord(), FakeGrid(cfg)))
    good = {m.metadata.dst_node_id: reply(m, trained(m, i)) for i, m in enumerate(msgs)}
    replies = {**good, **{n: fn(next(m for m in msgs if m.metadata.dst_node_id == n)) for n, fn in (bad or {}).items()}}
    arrays, _ = strategy.aggregate_train(1, list(replies.values()))
    alone = Metered(build_strategy(cfg), seed=0)
    list(alone.configure_train(1, wire.to_record(global_state()), ConfigRecord(), FakeGrid(cfg)))
    expected, _ = alone.aggregate_train(1, [r for n, r in good.items() if n not in (bad or {})])
    return arrays, expected, strategy


def _with(state, **changes):
    out = dict(state)
    for k, v in changes.items():
        key = {"A": A, "B": B, "HEAD": HEAD}.get(k, k)
        if v is None:
            del out[key]
        else:
            out[key] = v
    return out


BAD = {
    "missing keys": lambda m: reply(m, _with(trained(m, 7), HEAD=None)),
    "unexpected keys": lambda m: reply(m, {**trained(m, 7), "evil.weight": torch.zeros(2)}),
    "wrong shape": lambda m: reply(m, _with(trained(m, 7), A=torch.zeros(4, 7))),
    "rank 8 above the allowed maximum 4": lambda m: reply(
        m, _with(trained(m, 7), A=torch.zeros(8, 6), B=torch.zeros(6, 8)), rank=8, scale=2.0),
    "wrong dtype 'float64'": lambda m: reply(m, _with(trained(m, 7), B=torch.zeros(6, 4, dtype=torch.float64))),
    "NaN or Inf": lambda m: reply(m, _with(trained(m, 7), B=torch.full((6, 4), float("nan")))),
    "NaN or Inf ": lambda m: reply(m, _with(trained(m, 7), HEAD=torch.full((3, 6), float("inf")))),
    "update norm": lambda m: reply(m, trained(m, 7, size=50.0)),
    "states client 3; node": lambda m: reply(m, trained(m, 7), client=3),
    "unknown profile": lambda m: reply(m, trained(m, 7), profile="gpu-huge"),
    "states alpha 16, rslora False, scale 3": lambda m: reply(m, trained(m, 7), scale=3.0),
    "states 1e+09 examples, 8849557.5x the median 113 of the cohort (max-weight-ratio 10): rejected": lambda m: reply(
        m, trained(m, 7), weight=1e9),
}
REJECT = {  # the reasons only weight-bound=reject gives (clip keeps the reply)
    "states 1e+09 examples, 8849557.5x the median 113 of the cohort (max-weight-ratio 10): rejected"}


@pytest.mark.parametrize("reason", list(BAD))
def test_a_bad_reply_is_rejected_and_the_model_is_the_good_replies_alone(reason):
    cfg = CFG.replace(**{"weight-bound": "reject"}) if reason in REJECT else CFG
    arrays, expected, strategy = run_round(cfg, {102: BAD[reason]})
    rejected = strategy.rounds[1].rejected
    assert [(r["client"], r["node"]) for r in rejected] == [(1, 102)]
    assert reason.strip() in rejected[0]["reason"], rejected[0]["reason"]
    got, want = wire.from_record(arrays), wire.from_record(expected)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)  # bit-identical


def test_good_replies_pass_untouched():
    arrays, expected, strategy = run_round(CFG)
    assert strategy.rounds[1].rejected == [] and strategy.rounds[1].aggregated
    got, want = wire.from_record(arrays), wire.from_record(expected)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_too_few_good_replies_keep_the_global_model():
    bad = {n: BAD["NaN or Inf"] for n in (101, 102, 103)}
    arrays, _, strategy = run_round(CFG, bad)
    stats = strategy.rounds[1]
    assert arrays is None and not stats.aggregated and "1 good replies of 2 required" in stats.note
    assert sorted(r["client"] for r in stats.rejected) == [0, 1, 2] and stats.missing == [0, 1, 2]


def test_the_norm_ratio_is_configurable():
    lax = CFG.replace(**{"max-norm-ratio": "inf"})
    _, _, strategy = run_round(lax, {102: BAD["update norm"]})
    assert strategy.rounds[1].rejected == []


# -- lying about the example count -------------------------------------------------------------


def _liar_share(cfg, caps=None, stated=1e9):
    """(the liar's share s of the aggregate, the round's stats): with the others' mean M and
    the liar's tensors L, the aggregate is exactly M + s (L - M)."""
    liar = {}
    arrays, alone, strategy = run_round(
        cfg, {102: lambda m: reply(m, liar.setdefault("t", trained(m, 7)), weight=stated)}, caps)
    got, mean = wire.from_record(arrays), wire.from_record(alone)  # alone: the others' weighted mean (111, 113, 114)
    moved = torch.cat([(got[k].double() - mean[k].double()).flatten() for k in got])
    towards = torch.cat([(liar["t"][k].double() - mean[k].double()).flatten() for k in got])
    share = float(moved @ towards / (towards @ towards))  # least squares: the tensors are float32
    assert torch.allclose(moved, share * towards, atol=1e-6)  # the aggregate is on the line M -> L
    return share, strategy.rounds[1]


def test_an_absurd_weight_is_clipped_to_the_cohort_bound():
    """1e9 stated examples; the others state 111, 113, 114: the median of the others is 113, the bound
    2 x 113 = 226, so the liar's share is 226 / (226 + 338) = 0.40071 -- not ~1."""
    share, stats = _liar_share(CFG.replace(**{"max-weight-ratio": 2}))
    assert share == pytest.approx(226 / 564, abs=1e-5)
    assert stats.rejected == [] and [(a["client"], a["node"]) for a in stats.adjusted] == [(1, 102)]
    assert stats.adjusted[0]["reason"] == ("states 1e+09 examples, 8849557.5x the median 113 of the cohort "
                                           "(max-weight-ratio 2): clipped to 226")


def test_the_partition_size_caps_a_stated_weight_in_simulation():
    """Client 1's partition holds 150 examples: 1e9 is clipped to 150 (below the cohort bound 1130),
    share 150 / (150 + 338) = 0.30738."""
    share, stats = _liar_share(CFG, caps=(400, 150, 400, 400))
    assert share == pytest.approx(150 / 488, abs=1e-5)
    assert [a["reason"] for a in stats.adjusted] == ["states 1e+09 examples; client 1's partition holds 150: "
                                                     "clipped to 150"]
    share, stats = _liar_share(CFG, caps=(400, 150, 400, 400), stated=150)  # the truth passes untouched
    assert stats.adjusted == [] and share == pytest.approx(150 / 488, abs=1e-5)


def test_weight_bound_reject_drops_the_liar_at_the_cap():
    arrays, expected, strategy = run_round(CFG.replace(**{"weight-bound": "reject"}),
                                           {102: lambda m: reply(m, trained(m, 7), weight=151)}, caps=(400, 150, 400, 400))
    assert [r["reason"] for r in strategy.rounds[1].rejected] == [
        "states 151 examples; client 1's partition holds 150: rejected (weight-bound=reject)"]
    got, want = wire.from_record(arrays), wire.from_record(expected)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_the_weight_ratio_is_configurable():
    share, stats = _liar_share(CFG.replace(**{"max-weight-ratio": "inf"}))
    assert stats.adjusted == [] and share == pytest.approx(1e9 / (1e9 + 338), abs=1e-5)
    with pytest.raises(ConfigError, match="weight-bound"):
        CFG.replace(**{"weight-bound": "ignore"})
    with pytest.raises(ConfigError, match="max-weight-ratio"):
        CFG.replace(**{"max-weight-ratio": 1})


# -- the decoder: hand-made cases and fuzzing ---------------------------------------------------

SHAPES = {"w": (2, 3), "b": (3,)}


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _content(arrays: dict[str, Array]) -> RecordDict:
    met = MetricRecord({wire.CLIENT_ID: 0, wire.WEIGHT: 5, wire.RANK: 4, wire.ALPHA: 16.0, wire.SCALE: 4.0,
                        wire.RSLORA: 0})
    return RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.METRICS: met,
                       wire.ADAPTER: ConfigRecord({wire.PROFILE: DEFAULT})})


def test_decode_update_returns_the_tensors():
    w, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, dtype=np.float32)
    dec = decode_update(_content({"w": Array(w), "b": Array(b)}), lambda s: SHAPES)
    assert isinstance(dec, Decoded) and dec.stated.client == 0 and dec.stated.rank == 4
    assert torch.equal(dec.tensors["w"], torch.from_numpy(w))


def test_a_header_that_disagrees_with_the_array_is_refused_before_reading():
    huge = _npy(np.zeros(3, dtype=np.float32)).replace(b"(3,)", b"(99999999999,)")
    with pytest.raises(BadUpdate, match="data holds|cannot be decoded"):
        decode_update(_content({"w": Array(np.zeros((2, 3), np.float32)),
                                "b": Array("float32", (3,), "numpy.ndarray", huge)}), lambda s: SHAPES)
    with pytest.raises(BadUpdate, match="cannot be decoded"):
        decode_update(_content({"w": Array(np.zeros((2, 3), np.float32)),
                                "b": Array("float32", (3,), "numpy.ndarray", b"\x80\x04pickle")}), lambda s: SHAPES)


_names = st.sampled_from(["w", "b", "x", ""]) | st.text(max_size=8)
_dtypes = st.sampled_from(["float32", "float64", "int8", "bool", "<f4", "object", "V3", ""]) | st.text(max_size=6)
_shapes = st.lists(st.integers(-2, 5), max_size=3).map(tuple) | st.sampled_from([(2, 3), (3,)])


@st.composite
def _arrays(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:  # random bytes under random metadata
        return Array(draw(_dtypes), draw(_shapes), draw(st.sampled_from(["numpy.ndarray", "torch", "x"])),
                     draw(st.binary(max_size=200)))
    shape = draw(st.sampled_from([(2, 3), (3,), (1,), ()]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.bool_]))
    values = np.array(draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                    min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))), dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN to int: whatever bytes come out
        data = _npy(values.reshape(shape).astype(dtype))
    if kind == 2:  # flip some bytes of a valid .npy
        pos = draw(st.lists(st.integers(0, len(data) - 1), max_size=6))
        data = bytes(b ^ 0x5A if i in pos else b for i, b in enumerate(data))
    if kind == 3:  # truncate it
        data = data[: draw(st.integers(0, len(data)))]
    claimed = draw(st.sampled_from([shape, (2, 3), (3,)]))
    return Array(draw(st.sampled_from([np.dtype(dtype).name, "float32"])), claimed, "numpy.ndarray", data)


_numbers = (st.integers(-3, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
            | st.lists(st.integers(), max_size=2))


@st.composite
def _contents(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([None, 3, "text", b"bytes", ArrayRecord(), MetricRecord(), [1, 2]]))
    records = {}
    if draw(st.booleans()):
        arrays = draw(st.dictionaries(_names, _arrays(), max_size=4))
        records[draw(st.sampled_from([wire.ARRAYS, wire.METRICS, wire.ADAPTER]))] = ArrayRecord(arrays)
    if draw(st.integers(0, 4)):
        keys = draw(st.lists(st.sampled_from([wire.CLIENT_ID, wire.WEIGHT, *wire.ADAPTER_KEYS, "other"]), max_size=7))
        met = MetricRecord({k: draw(_numbers) for k in keys})
        records[draw(st.sampled_from([wire.METRICS, wire.METRICS, wire.ARRAYS]))] = met
    if draw(st.integers(0, 4)):
        records[wire.ADAPTER] = ConfigRecord({wire.PROFILE: draw(st.sampled_from([DEFAULT, "x", 3, b"b"]))})
    return RecordDict(records)


def _decodes_or_fails_with_bad_update(content) -> None:
    try:
        out = decode_update(content, lambda s: SHAPES)
    except BadUpdate as err:
        assert str(err)  # a reason to record
        return
    assert set(out.tensors) == set(SHAPES)
    assert all(tuple(t.shape) == SHAPES[k] and t.dtype == torch.float32 and torch.isfinite(t).all()
               for k, t in out.tensors.items())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_contents())
def test_the_decoder_fails_only_with_bad_update(content):
    _decodes_or_fails_with_bad_update(content)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_contents())
def test_the_decoder_fails_only_with_bad_update_10000_inputs(content):
    _decodes_or_fails_with_bad_update(content)


@pytest.mark.parametrize("name", ["fedavg", "hetlora", "flexlora", "flora", "ffa", "fedsa", "fedex"])
def test_rank_aware_replies_pass_and_a_rank_above_the_maximum_does_not(name):
    from test_rank_strategies import grid_for, initial_global, run_cfg
    from test_rank_strategies import reply as rank_reply

    cfg = run_cfg(name)
    grid = grid_for(cfg)
    strategy = Metered(build_strategy(cfg), seed=0, screens=build_screens(cfg), min_replies=1)
    msgs = list(strategy.configure_train(1, initial_global().encode(), ConfigRecord(), grid))
    replies = [rank_reply(m, cfg, grid.members[m.metadata.dst_node_id].profile, seed=i, weight=5 + i)
               for i, m in enumerate(msgs)]
    too_big = dataclasses.replace(lookup(cfg, "big"), lora_rank=8)  # states rank 8; the run's maximum is 4
    replies[0] = rank_reply(msgs[0], cfg, too_big, seed=9, weight=5)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [r["reason"] for r in strategy.rounds[1].rejected] == ["rank 8 above the allowed maximum 4"]


def test_the_dtype_of_what_was_sent_is_accepted_too():
    """A decoded (compressed) update is sent + delta: float64 when the global is (FedAdam's)."""
    w, b = np.zeros((2, 3), np.float64), np.zeros(3, np.float64)
    content = _content({"w": Array(w), "b": Array(b)})
    with pytest.raises(BadUpdate, match="wrong dtype 'float64', expected float32"):
        decode_update(content, lambda s: SHAPES)
    assert decode_update(content, lambda s: SHAPES, ("float32", "float64")).tensors["w"].dtype == torch.float64
