"""``fedtune report RUN_DIR``: PNG plots (accuracy, loss, bytes per round) and one HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.artifacts import METRICS, SUMMARY, RunDir

PLOTS = (("accuracy", "accuracy"), ("loss", "test loss"), ("bytes", "MB per round"))


def _plot(rows: list[dict], key: str, label: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    x = [r["round"] for r in rows]
    if key == "bytes":
        ax.plot(x, [r.get("bytes_up", 0) / 1e6 for r in rows], marker="o", label="up")
        ax.plot(x, [r.get("bytes_down", 0) / 1e6 for r in rows], marker="s", label="down")
        ax.legend()
    else:
        ax.plot(x, [r[key] for r in rows], marker="o", label="server (test)")
        ck = f"client_{key}"
        pts = [(r["round"], r[ck]) for r in rows if ck in r]
        if pts:
            ax.plot(*zip(*pts), marker="s", linestyle="--", label="clients (local val)")
            ax.legend()
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_privacy(rows: list[dict], out: Path) -> bool:
    """The accountant's epsilon per round and the audit's estimate (with its interval), if the run has them."""
    eps = [(r["round"], r["epsilon"]) for r in rows if isinstance(r.get("epsilon"), (int, float))]
    audit = [r for r in rows if isinstance(r.get("epsilon_audit"), (int, float))]
    if not eps and not audit:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    if eps:
        ax.plot(*zip(*eps), marker="o", label="accountant epsilon (all rounds' models)")
    if audit:
        x = [r["round"] for r in audit]
        y = [r["epsilon_audit"] for r in audit]
        err = [[v - r.get("epsilon_audit_low", v) for v, r in zip(y, audit)],
               [r.get("epsilon_audit_high", v) - v for v, r in zip(y, audit)]]
        ax.errorbar(x, y, yerr=err, fmt="s", capsize=4, label="epsilon_audit (final model, 95% CI)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def write_report(run_dir: Path) -> Path:
    run = RunDir(run_dir)
    if not (run.path / METRICS).is_file():
        raise FedtuneError(f"{run.path} is not a run directory (no {METRICS})")
    rows = run.metrics()
    if not rows:
        raise FedtuneError(f"{run.path / METRICS} is empty: the run recorded no round")
    summary = run.summary() if (run.path / SUMMARY).exists() else {}
    config = json.loads((run.path / "config.json").read_text())
    plots = [k for k, _ in PLOTS]
    for key, label in PLOTS:
        _plot(rows, key, label, run.path / f"{key}.png")
    if _plot_privacy(rows, run.path / "privacy.png"):  # dp=client-* / sample, or audit-canaries
        plots.append("privacy")
    cols = ["round", "accuracy", "loss", "client_accuracy", "train_loss", "bytes_up", "bytes_down", "seconds"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    table = "".join(
        "<tr>" + "".join(f"<td>{fmt(r[c]) if c in r else ''}</td>" for c in cols) + "</tr>" for r in rows
    )
    facts = "".join(f"<li><b>{html.escape(k)}</b>: {fmt(v)}</li>" for k, v in sorted(summary.items()))
    cfg = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in sorted(config.items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedtune run {html.escape(run.path.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}
img{{width:32%}}</style></head><body>
<h1>fedtune run: {html.escape(run.path.name)}</h1>
<p>{html.escape(config.get('strategy', ''))} on {html.escape(str(config.get('dataset', '')))}, model
{html.escape(str(config.get('model', '')))}, {config.get('num-clients', '')} clients, {len(rows) - 1} rounds.</p>
<div>{''.join(f'<img src="{k}.png" alt="{k}">' for k in plots)}</div>
<h2>Summary</h2><ul>{facts}</ul>
<h2>Rounds</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{table}</table>
<h2>Configuration</h2><table>{cfg}</table></body></html>"""
    out = run.path / "report.html"
    out.write_text(page)
    return out
