from fedtune.presets import resolve
from fedtune.simulations.sequential import sequential


def test_plain_loop_is_repeatable_in_one_process():
    """The reference loop reuses the process's cached model: a second run must start from a
    fresh adapter, not from the first run's result."""
    cfg = resolve("tiny", overrides={"num-clients": "2", "rounds": "2", "train-size": "200", "eval-size": "32",
                                      "local-steps": "2", "max-length": "16", "head-init": "random", "lr": "0.05"})
    a = sequential(cfg, progress=lambda s: None)
    b = sequential(cfg, progress=lambda s: None)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert a[-1]["loss"] != a[0]["loss"]  # training moved the global adapter
