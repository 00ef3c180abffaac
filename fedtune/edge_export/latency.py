"""p50/p95 latency of several engines on the same inputs, measured interleaved.

Each input is run by every engine in turn (rotating who goes first), so a noisy, shared
machine slows all engines alike and their ratio stays meaningful.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

Feed = dict[str, np.ndarray]


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def measure(engines: dict[str, Callable[[Feed], object]], feeds: Sequence[Feed], warmup: int) -> dict[str, dict]:
    """{engine: {p50_ms, p95_ms}} over ``feeds``, after ``warmup`` untimed runs each."""
    names = list(engines)
    for feed in list(feeds)[:warmup]:
        for name in names:
            engines[name](feed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, feed in enumerate(feeds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            engines[name](feed)
            times[name].append(time.perf_counter() - start)
    return {n: percentiles_ms(t) for n, t in times.items()}


def latency_feeds(encode: Callable[[list[str]], Feed], texts: Sequence[str], batch: int, runs: int) -> list[Feed]:
    """``runs`` batches of ``batch`` consecutive texts (cycling through ``texts``)."""
    return [encode([texts[(r * batch + j) % len(texts)] for j in range(batch)]) for r in range(runs)]
