"""The heterogeneous-rank strategies as Flower strategies: per-node messages, stated ranks,
exact aggregation through constructed reply Messages, scaling against peft, FedSA's local B."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import wire
from fedtune.adapters import A_SUFFIX, B_SUFFIX, join, scalings, set_trainable, split
from fedtune.config import build_config
from fedtune.profiles import Profile, apply, lookup
from fedtune.server.nodes import Member, OrderedGrid
from fedtune.strategies import STRATEGIES
from fedtune.strategies import lora as L
from fedtune.strategies.rank_aware import GlobalState

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside a Flower runtime

D, R = 6, 4
LAYERS = [f"base_model.model.bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
HEAD = "base_model.model.classifier.modules_to_save.default.weight"
DEFS = ["big lora-rank=4", "small lora-rank=2 layers=1"]
NODES = {101: 0, 202: 1, 303: 2}  # node -> client; profiles round-robin: big, small, big


class FakeGrid:
    def __init__(self, nodes=tuple(NODES)) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def run_cfg(strategy: str, rslora: bool = False, **extra):
    return build_config({"num-clients": len(NODES), "profiles": "big,small", "profile-defs": DEFS, "strategy": strategy,
                         "lora-alpha": 8, "use-rslora": rslora, "fraction-evaluate": 1.0, **extra})


def grid_for(cfg) -> OrderedGrid:
    profiles = {0: "big", 1: "small", 2: "big"}
    return OrderedGrid(FakeGrid(), {n: Member(c, lookup(cfg, profiles[c])) for n, c in NODES.items()})


def initial_global(seed: int = 0) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    layers = {l: {"A": torch.randn(R, D, generator=g), "B": torch.randn(D, R, generator=g)} for l in LAYERS}
    return GlobalState(join(layers, {HEAD: torch.randn(3, D, generator=g)}), {})


def scale_of(cfg, rank: int) -> float:
    m = cfg.model
    return L.rslora_scale(m.lora_alpha, rank) if m.use_rslora else L.lora_scale(m.lora_alpha, rank)


def reply(msg: Message, cfg, profile: Profile, seed: int, weight: int, metrics: dict | None = None,
          stated: str | None = None) -> Message:
    """A trained client's reply: fresh random factors of its rank for its layers, stated adapter."""
    g = torch.Generator().manual_seed(seed)
    r = profile.lora_rank
    layers = split(wire.from_record(msg.content[wire.ARRAYS]))[0] or {l: {} for l in LAYERS[2 - (profile.layers or 2):]}
    sent = {l: {"A": torch.randn(r, D, generator=g) / 3, "B": torch.randn(D, r, generator=g)} for l in layers}
    if cfg.federation.strategy == "ffa":  # A is frozen on the client: not sent
        sent = {l: {"B": p["B"]} for l, p in sent.items()}
    client = NODES[msg.metadata.dst_node_id]
    met = {wire.WEIGHT: weight, wire.CLIENT_ID: client, wire.RANK: r, wire.ALPHA: cfg.model.lora_alpha,
               wire.SCALE: scale_of(cfg, r), wire.RSLORA: int(cfg.model.use_rslora), **(metrics or {})}
    content = RecordDict({wire.ARRAYS: wire.to_record(join(sent, {HEAD: torch.randn(3, D, generator=g)})),
                          wire.METRICS: MetricRecord(met),
                          wire.ADAPTER: ConfigRecord({wire.PROFILE: stated or profile.name})})
    return Message(content, reply_to=msg)


def one_round(name: str, rslora: bool = False):
    cfg = run_cfg(name, rslora)
    strategy, grid = STRATEGIES.get(name)(cfg), grid_for(cfg)
    msgs = list(strategy.configure_train(1, initial_global().encode(), ConfigRecord(), grid))
    members = grid.members
    replies = [reply(m, cfg, members[m.metadata.dst_node_id].profile, seed=i, weight=10 + 7 * i) for i, m in enumerate(msgs)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return cfg, strategy, grid, msgs, replies, GlobalState.decode(arrays), metrics


def exact_target(cfg, replies, layer: str) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i over the clients that hold ``layer`` (w normalised among them)."""
    terms = []
    for m in replies:
        parts = split(wire.from_record(m.content[wire.ARRAYS]))[0].get(layer)
        if parts:
            met = m.content[wire.METRICS]
            terms.append((met[wire.WEIGHT], met[wire.SCALE] * parts["B"].double() @ parts["A"].double()))
    total = sum(w for w, _ in terms)
    return sum(w / total * t for w, t in terms)


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * (1 + want.double().abs().max().item()), err


def global_delta(cfg, state: GlobalState, layer: str) -> torch.Tensor:
    parts = split(state.trainable)[0][layer]
    return state.base.get(layer, torch.zeros(D, D)).double() + scale_of(cfg, R) * parts["B"].double() @ parts["A"].double()


# --- per-node messages -----------------------------------------------------------------------


@pytest.mark.parametrize("name, parts", [("fedavg", {"A", "B"}), ("hetlora", {"A", "B"}), ("flexlora", {"A", "B"}),
                                         ("fedex", {"A", "B"}), ("ffa", {"B"}), ("fedsa", {"A"}), ("flora", set())])
def test_each_node_gets_its_own_rank_layers_and_scale(name: str, parts: set[str]) -> None:
    cfg = run_cfg(name)
    strategy, grid = STRATEGIES.get(name)(cfg), grid_for(cfg)
    g = initial_global()
    msgs = list(strategy.configure_train(1, g.encode(), ConfigRecord({"x": 1}), grid))
    assert [m.metadata.dst_node_id for m in sorted(msgs, key=lambda m: m.metadata.dst_node_id)] == list(NODES)
    for m in msgs:
        profile = grid.members[m.metadata.dst_node_id].profile
        layers, head = split(wire.from_record(m.content[wire.ARRAYS]))
        assert torch.equal(head[HEAD], g.trainable[HEAD]) and m.content[wire.CONFIG]["server-round"] == 1
        want_layers = LAYERS if profile.layers == 0 else LAYERS[-profile.layers:]
        assert sorted(layers) == (sorted(want_layers) if parts else [])
        for layer, got in layers.items():
            assert set(got) == parts
            full = split(g.trainable)[0][layer]
            r, s = profile.lora_rank, scale_of(cfg, profile.lora_rank)
            if "A" in got:
                assert got["A"].shape == (r, D) and torch.equal(got["A"], full["A"][:r])
            if "B" in got:  # rescaled so that s_r B_r A_r == s_R B[:, :r] A[:r]
                assert got["B"].shape == (D, r)
                close(got["B"] * s, full["B"][:, :r] * scale_of(cfg, R))


def test_fedavg_without_profiles_is_the_plain_strategy() -> None:
    from fedtune.strategies.fedavg import FedAvg
    from fedtune.strategies.rank_aware import RankAware

    plain = STRATEGIES.get("fedavg")(build_config({"num-clients": 2}))
    assert type(plain) is FedAvg and not isinstance(plain, RankAware)


# --- exactness through the Flower strategy classes ------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name", ["flora", "fedex", "flexlora"])
def test_exact_strategies_reproduce_the_weighted_sum_of_updates(name: str, rslora: bool) -> None:
    cfg, strategy, grid, msgs, replies, new, _ = one_round(name, rslora)
    for layer in LAYERS:
        close(global_delta(cfg, new, layer), exact_target(cfg, replies, layer))
    if name == "flora":  # merged into the base; clients restart from fresh adapters (B = 0)
        assert all(split(new.trainable)[0][l]["B"].abs().max() == 0 for l in LAYERS)
    if name == "flexlora":  # each client: the best rank-r approximation of the exact update
        small = lookup(cfg, "small")
        got = split(strategy.view(new, small))[0][LAYERS[1]]
        want = L.flexlora_redistribute(exact_target(cfg, replies, LAYERS[1]), 2, scale_of(cfg, 2))
        close(scale_of(cfg, 2) * got["B"].double() @ got["A"].double(), want.delta())


def test_base_deltas_reach_clients_for_flora_and_fedex_only() -> None:
    for name, shared in (("flora", True), ("fedex", True), ("flexlora", False), ("fedavg", False)):
        cfg, strategy, grid, *_, new, _ = one_round(name)
        msgs = list(strategy.configure_train(2, new.encode(), ConfigRecord(), grid))
        for m in msgs:
            base, _ = wire.split_base(wire.from_record(m.content[wire.ARRAYS]))
            assert (sorted(base) == sorted(LAYERS)) is shared, name
            if shared:  # the cumulative delta: the same absolute value in every node's message
                assert all(torch.equal(base[l], new.base[l]) for l in LAYERS)


def test_naive_fedavg_is_not_exact_and_ffa_keeps_the_shared_A() -> None:
    cfg, _, _, _, replies, new, _ = one_round("fedavg")
    err = (global_delta(cfg, new, LAYERS[1]) - exact_target(cfg, replies, LAYERS[1])).abs().max()
    assert err > 1e-3
    cfg, _, _, _, replies, new, _ = one_round("ffa")
    A0 = split(initial_global().trainable)[0]
    for layer in LAYERS:
        assert torch.equal(split(new.trainable)[0][layer]["A"], A0[layer]["A"])  # frozen, never zero-padded
        close(global_delta(cfg, new, layer), exact_target(cfg, [_with_A(m, A0[layer]["A"]) for m in replies], layer))


def _with_A(m: Message, A: torch.Tensor) -> Message:
    """An FFA reply with the shared A it trained against put back in (for the reference sum)."""
    layers, head = split(wire.from_record(m.content[wire.ARRAYS]))
    r = int(m.content[wire.METRICS][wire.RANK])
    full = {l: {**p, "A": A[:r]} for l, p in layers.items()}
    content = RecordDict({wire.ARRAYS: wire.to_record(join(full, head)), wire.METRICS: m.content[wire.METRICS]})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))


def test_head_is_the_example_weighted_mean_and_groups_are_reported() -> None:
    _, strategy, _, _, replies, new, metrics = one_round("hetlora")
    heads = [wire.from_record(m.content[wire.ARRAYS])[HEAD].double() for m in replies]
    weights = [m.content[wire.METRICS][wire.WEIGHT] for m in replies]
    close(new.trainable[HEAD], sum(w * h for w, h in zip(weights, heads)) / sum(weights))
    assert wire.RANK in metrics  # aggregated like any metric; the server app leaves it out of the row
    states = strategy.model_states(new.encode())
    assert list(states) == ["rank_2", "rank_4", ""]
    small = split(states["rank_2"][1])[0]
    assert small[LAYERS[0]]["B"].abs().max() == 0  # the small profile has no adapter on layer 0
    assert small[LAYERS[1]]["B"][:, 2:].abs().max() == 0  # and rank 2: zero-padded to the server's 4


@pytest.mark.parametrize("bad, match", [
    ({"metrics": {wire.RANK: 4}}, "client 1 states rank 4; profile 'small' has rank 2"),
    ({"stated": "big"}, "client 1 states profile 'big'; the node joined as 'small'"),
    ({"metrics": {wire.SCALE: 1.0}}, "scale 1; the run has alpha 8, rslora False, scale 4 at rank 2"),
    ({"metrics": {wire.ALPHA: 16.0}}, "states alpha 16, rslora False"),
])
def test_stated_adapter_is_checked(bad: dict, match: str) -> None:
    cfg = run_cfg("flora")
    strategy, grid = STRATEGIES.get("flora")(cfg), grid_for(cfg)
    msgs = list(strategy.configure_train(1, initial_global().encode(), ConfigRecord(), grid))
    replies = [reply(m, cfg, grid.members[m.metadata.dst_node_id].profile, seed=i, weight=5,
                     **(bad if grid.members[m.metadata.dst_node_id].profile.name == "small" else {}))
               for i, m in enumerate(msgs)]
    with pytest.raises(ValueError, match=match):
        strategy.aggregate_train(1, replies)


def test_stated_rank_must_match_the_shapes() -> None:
    cfg = run_cfg("fedex")
    strategy, grid = STRATEGIES.get("fedex")(cfg), grid_for(cfg)
    msgs = list(strategy.configure_train(1, initial_global().encode(), ConfigRecord(), grid))
    big = lookup(cfg, "big")
    liar = Profile("small", 4, layers=1)  # sends rank-4 tensors for layer 1, states rank 2
    replies = [reply(m, cfg, liar if grid.members[m.metadata.dst_node_id].profile.name == "small" else big, seed=i,
                     weight=5, metrics={wire.RANK: 2, wire.SCALE: scale_of(cfg, 2)}
                     if grid.members[m.metadata.dst_node_id].profile.name == "small" else {})
               for i, m in enumerate(msgs)]
    with pytest.raises(ValueError, match="states rank 2 but sends"):
        strategy.aggregate_train(1, replies)


# --- scaling against peft, end to end ---------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_matches_peft_across_ranks(rslora: bool) -> None:
    """Client models of rank 8 and 2 (tiny BERT): what the server computes from their stated
    scale equals peft's own delta weights, both ways (server -> client slice, client -> server)."""
    from fedtune.modeling import build_model, trainable_state
    from fedtune.profiles import server_model

    cfg = build_config({"model": "tiny", "num-clients": 2, "profiles": "gpu-small,edge", "lora-alpha": 8,
                        "profile-defs": "edge lora-rank=2 layers=1", "use-rslora": rslora, "strategy": "flora"})
    profiles = [lookup(cfg, "gpu-small"), lookup(cfg, "edge")]
    models = [build_model(apply(cfg, p).model, 20) for p in profiles]
    server = build_model(server_model(cfg), 20)
    torch.manual_seed(0)
    for m in [*models, server]:
        for n, p in m.named_parameters():
            if n.endswith(B_SUFFIX):
                p.data.normal_()
    # server -> client: a client's delta weight (peft) is the first r components of the global
    fedavg = STRATEGIES.get("fedavg")(cfg)
    g = GlobalState(trainable_state(server), {})
    layer = "base_model.model.bert.encoder.layer.1.attention.self.value"
    want = {}
    for p, m in zip(profiles, models):
        state = {k: v for k, v in fedavg.view(g, p).items()}
        set_trainable(m, state)
        m.load_state_dict(state, strict=False)
        got = m.get_submodule(layer).get_delta_weight("default").double()
        s_R = scalings(server)[layer]
        sA, sB = trainable_state(server)[layer + A_SUFFIX], trainable_state(server)[layer + B_SUFFIX]
        close(got, s_R * sB[:, : p.lora_rank].double() @ sA[: p.lora_rank].double())
        want[p.name] = got
    assert scalings(models[0])[layer] == scale_of(cfg, 8) and scalings(models[1])[layer] == scale_of(cfg, 2)
    # client -> server: FLoRA's merged delta is the weighted sum of the peft delta weights
    flora = STRATEGIES.get("flora")(cfg)
    grid = OrderedGrid(FakeGrid([101, 202]), {101: Member(0, profiles[0]), 202: Member(1, profiles[1])})
    msgs = sorted(flora.configure_train(1, g.encode(), ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id)
    replies = []
    for i, (msg, p, m) in enumerate(zip(msgs, profiles, models)):
        met = {wire.WEIGHT: 3 + i, wire.CLIENT_ID: i, wire.RANK: p.lora_rank, wire.ALPHA: 8.0,
               wire.SCALE: scalings(m)[layer], wire.RSLORA: int(rslora)}
        replies.append(Message(RecordDict({wire.ARRAYS: wire.to_record(trainable_state(m)), wire.METRICS: MetricRecord(met),
                                           wire.ADAPTER: ConfigRecord({wire.PROFILE: p.name})}), reply_to=msg))
    new = GlobalState.decode(flora.aggregate_train(1, replies)[0])
    close(new.base[layer], (3 * want["gpu-small"] + 4 * want["edge"]) / 7)
    assert math.isclose(flora.scale_of(2), scale_of(cfg, 2))


# --- the client: FedSA keeps B local, FFA freezes A -------------------------------------------


def _client_msg(cfg, arrays, server_round: int) -> Message:
    config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), "server-round": server_round})
    return Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), message_type="train", dst_node_id=101)


def test_fedsa_client_keeps_its_B_in_context_state_across_rounds() -> None:
    from fedtune.client.adapter import LOCAL, prepare
    from fedtune.client.app import train
    from fedtune.modeling import build_model, trainable_state
    from fedtune.presets import resolve
    from fedtune.profiles import server_model

    small = {"num-clients": "2", "train-size": "200", "max-length": "24", "local-steps": "2",
             "profiles": "edge", "profile-defs": "edge lora-rank=2 layers=1"}
    cfg = resolve("tiny", overrides={**small, "strategy": "fedsa"})
    strategy = STRATEGIES.get("fedsa")(cfg)
    g = GlobalState(trainable_state(build_model(server_model(cfg), 20)), {})
    edge = lookup(cfg, "edge")
    ctx = Context(run_id=1, node_id=101, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    out = train(_client_msg(cfg, strategy.node_arrays(g.encode(), edge), 1), ctx)
    sent = wire.from_record(out.content[wire.ARRAYS])
    kept = wire.from_record(ctx.state[LOCAL])
    assert kept and all(k.endswith(B_SUFFIX) for k in kept)
    assert all(torch.equal(kept[k], sent[k]) and kept[k].abs().max() > 0 for k in kept)  # trained, non-zero
    assert out.content[wire.METRICS][wire.RANK] == 2 and out.content[wire.ADAPTER][wire.PROFILE] == "edge"
    # round 2: a new global A arrives; B is this node's own, not the server's
    layers, head = split(g.trainable)
    g2 = GlobalState(join({l: {"A": p["A"] + 1.0, "B": p["B"] + 5.0} for l, p in layers.items()}, head), {})
    worker = prepare(_client_msg(cfg, strategy.node_arrays(g2.encode(), edge), 2), ctx).worker
    now = trainable_state(worker.model)
    assert all(torch.equal(now[k], kept[k]) for k in kept)
    assert all(torch.equal(now[k], layers[k[: -len(A_SUFFIX)]]["A"][:2] + 1.0) for k in now if k.endswith(A_SUFFIX))
    # another node (empty state) starts from B = 0, as built
    other = Context(run_id=1, node_id=202, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    worker = prepare(_client_msg(cfg, strategy.node_arrays(g2.encode(), edge), 2), other).worker
    assert all(v.abs().max() == 0 for k, v in trainable_state(worker.model).items() if k.endswith(B_SUFFIX))


def test_ffa_client_freezes_the_shared_A_and_sends_only_B() -> None:
    from fedtune.client.adapter import prepare
    from fedtune.client.app import train
    from fedtune.modeling import build_model, trainable_state
    from fedtune.presets import resolve
    from fedtune.profiles import server_model
    from fedtune.strategies.recipes import recipe_for, shared_A

    cfg = resolve("tiny", overrides={"num-clients": "2", "train-size": "200", "max-length": "24", "local-steps": "2",
                                      "profiles": "edge", "profile-defs": "edge lora-rank=2", "strategy": "ffa"})
    server = build_model(server_model(cfg), 20)
    recipe_for("ffa").initialize(server, cfg.federation.seed)
    g = GlobalState(trainable_state(server), {})
    msg = _client_msg(cfg, STRATEGIES.get("ffa")(cfg).node_arrays(g.encode(), lookup(cfg, "edge")), 1)
    ctx = Context(run_id=1, node_id=101, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    worker = prepare(msg, ctx).worker
    A = {n: p for n, p in worker.model.named_parameters() if n.endswith(A_SUFFIX)}
    assert A and all(not p.requires_grad for p in A.values())
    for n, p in A.items():
        layer = n[: -len(A_SUFFIX)]
        assert torch.equal(p.detach(), shared_A(0, layer, 2, p.shape[1]))
        assert torch.equal(p.detach(), g.trainable[n][:2])  # the first rows of the server's rank-4 shared A
    out = train(msg, ctx)
    assert not any(k.endswith(A_SUFFIX) for k in wire.from_record(out.content[wire.ARRAYS]))
    assert all(torch.equal(p.detach(), shared_A(0, n[: -len(A_SUFFIX)], 2, p.shape[1])) for n, p in A.items())
