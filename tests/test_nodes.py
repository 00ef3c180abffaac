"""OrderedGrid's reply loop: Flower's push-then-pull on the grid's own API, at a short interval."""

from types import SimpleNamespace

import pytest

from fedtune.server import nodes
from fedtune.server.nodes import Member, OrderedGrid


class SlowGrid:
    """Replies to message i arrive on pull number ``arrive[i]``; records every pull."""

    def __init__(self, arrive: list[int]) -> None:
        self.arrive, self.pulls = arrive, 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, when in enumerate(self.arrive) if when == self.pulls and f"m{i}" in ids]

    def get_node_ids(self):
        return []


def test_polls_at_the_short_interval_until_every_reply(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(nodes.time, "sleep", sleeps.append)
    grid = SlowGrid([1, 3, 3])
    replies = OrderedGrid(grid, {}).send_and_receive(["a", "b", "c"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3 and sleeps == [0.1, 0.2]  # a reply on pull 1, none on 2; no sleep after the last
    assert nodes.PULL_INTERVAL < 3.0  # Flower's HTTP grid waits 3 s between pulls


def test_the_wait_doubles_while_no_reply_comes_and_starts_over_at_one(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(nodes.time, "sleep", sleeps.append)
    grid = SlowGrid([9, 10, 13])
    OrderedGrid(grid, {}).send_and_receive(["a", "b", "c"], timeout=None)
    assert sleeps == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.2, 0.4]
    assert max(sleeps) == nodes.PULL_MAX  # a reply is seen at most PULL_MAX after it arrives


def test_timeout_returns_what_arrived(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(nodes.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(nodes.time, "sleep", lambda s: None)
    grid = SlowGrid([1, 99])
    replies = OrderedGrid(grid, {}).send_and_receive(["a", "b"], timeout=3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert OrderedGrid(SlowGrid([1]), {}).send_and_receive(["a"], timeout=0) == []  # as Flower: no pull at all


def test_members_order_node_ids():
    from fedtune.profiles import Profile

    grid = SimpleNamespace(get_node_ids=lambda: [7, 5, 9])
    ordered = OrderedGrid(grid, {7: Member(1, Profile("p", 2)), 5: Member(0, Profile("p", 2))})
    assert list(ordered.get_node_ids()) == [5, 7, 9]
    with pytest.raises(AttributeError):
        ordered.no_such_method  # noqa: B018
