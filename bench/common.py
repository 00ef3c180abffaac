"""Shared by the benchmarks: quiet environment, and writing one section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
# tokenized splits, reused across runs and seeds (fedtune/data/token_cache.py)
os.environ.setdefault("FEDTUNE_TOKEN_CACHE", str(Path(__file__).resolve().parent.parent / "runs" / "token-cache"))

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery figure here is written by a script under `bench/`; rerun it to refresh its section.\n"


def machine() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {os.cpu_count()} cores{gpu}, Python {platform.python_version()}"


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


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided Student-t confidence interval at ``level``) over
    seeds; the half-width is nan for a single value."""
    import statistics

    from scipy.stats import t

    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if n == 1:
        return mean, float("nan")
    return mean, float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) / n ** 0.5


def fmt_ci(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """'0.684 ± 0.012' (mean ± 95% CI half-width over seeds), or '0.684' for one seed."""
    mean, half = mean_ci([scale * v for v in values])
    return f"{mean:.{digits}f}" if half != half else f"{mean:.{digits}f} ± {half:.{digits}f}"


def seed_overrides(base: dict, i: int) -> dict:
    """``base`` for the ``i``-th seed: run seed = ``--set seed`` (default 0) + i. The seed sets
    the partition, the adapter's init and the client sampling; the test slice stays fixed."""
    return {**base, "seed": str(int(base.get("seed", 0)) + i)}


def precision(model_cfg) -> str:
    """One phrase on what the frozen base computed in on this machine's clients, as
    ``fedtune.device`` decides it (cpu-autocast falls back to fp32 on a CPU without bf16)."""
    from fedtune.device import autocast_dtype, resolve

    dtype = autocast_dtype(resolve(model_cfg.device), model_cfg.base_dtype, model_cfg.cpu_autocast)
    if dtype is None:
        return "the frozen base in float32"
    knob = "`cpu-autocast=auto`; " if model_cfg.base_dtype == "float32" else ""
    return (f"the frozen base's forward in {str(dtype).removeprefix('torch.')} autocast ({knob}adapters, head and "
            "optimizer state fp32, the same for every run of the table)")


def paired(runs: dict[int, float], ref: dict[int, float]) -> list[float]:
    """``runs`` minus ``ref`` (seed -> accuracy) over the seeds both finished, in points."""
    return [100 * (runs[s] - ref[s]) for s in sorted(set(runs) & set(ref))]


def on_accelerator(base: dict, share: str = "0.25") -> dict:
    """``base`` plus ``client-gpus`` = ``share`` (1/share virtual clients train at once on the GPU)
    where this machine has a CUDA device and ``base`` does not set it: a benchmark then runs its
    clients on the GPU path, and the server evaluates there (``server-device=auto``). On a CPU
    machine ``base`` is returned unchanged, so its stored results still match."""
    import torch

    if "client-gpus" in base or not torch.cuda.is_available():
        return base
    return {**base, "client-gpus": share}


def defaults_mark() -> str:
    """A short hash of the default preset's whole config: what a stored run's "defaults" meant."""
    import hashlib

    from fedtune.presets import resolve

    return hashlib.sha1(resolve("default").to_json().encode()).hexdigest()[:12]


class Results:
    """Finished runs of a benchmark, one JSON line each in ``runs/bench/NAME.jsonl``: a rerun
    with the same settings reads them back instead of training again, so a benchmark that
    stops (Ctrl-C, a crash, the machine) loses only the run it was in. The settings include
    :func:`defaults_mark`: after a default changes (a new local loss, say) runs stored before it
    are not read back as runs of the new defaults.

        done = Results("accuracy", settings)      # settings: what makes a run comparable
        if (hit := done.get(key)) is None: hit = done.put(key, {"curve": [...]})
    """

    def __init__(self, name: str, settings: dict, folder: Path | None = None) -> None:
        import json

        self.settings = json.loads(json.dumps({**settings, "defaults": defaults_mark()}, sort_keys=True, default=str))
        self.path = (folder or DOC.parent.parent / "runs" / "bench") / f"{name}.jsonl"
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut off by a stop mid-write, or blank
                    continue
                if row.get("settings") == self.settings:
                    self.rows[row["key"]] = row["value"]
        if self.rows:
            print(f"bench: {len(self.rows)} finished run(s) read back from {self.path}", flush=True)

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, value: dict) -> dict:
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.exists() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size > 0
        with self.path.open("a") as f:  # one line per finished run: a crash mid-write loses only that run
            f.write(("\n" if torn else "") + json.dumps({"key": key, "settings": self.settings, "value": value}) + "\n")
        self.rows[key] = value
        return value
