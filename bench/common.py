"""Shared by the benchmarks: quiet environment, and writing one section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery figure here is written by a script under `bench/`; rerun it to refresh its section.\n"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    """Replace the text between <!-- name:start --> and <!-- name:end --> (append if absent)."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = f"_Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}._\n\n"
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n\n{stamp}<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def table(header: list[str], rows: list[list[object]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


@contextmanager
def figure(png: Path, figsize: tuple[float, float] = (7, 4), **legend) -> Iterator:
    """``with figure(PNG) as ax: ax.plot(...)``: a headless matplotlib axes, then legend
    (``legend`` kwargs), grid, tight layout, saved to ``png`` at 110 dpi and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.legend(**{"fontsize": 7, **legend})
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    finally:
        plt.close(fig)
