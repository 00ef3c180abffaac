"""The head before round 1: FedNCM against the closed-form ridge (shrinkage-LDA) head.

Extracts, once, the features the frozen MiniLM feeds its classification head for every
training row of every client of the default federation (10 Dirichlet(0.5) clients) and for a
fixed test slice, and caches them under runs/bench-head/. Then builds each head from the
first K rows per client exactly as the clients' ``head_init`` query and the server would
(``fedtune.head_init``), and reports test accuracy and loss: FedNCM at several logit scales,
the ridge head with OAS and fixed shrinkage, and the loss of the ridge head at several logit
scales (the fitted LDA's log posterior is over-confident). Writes the section "head" of
docs/benchmarks.md.

    .venv/bin/python bench/head.py [--eval-size 2000] [--examples 256,512,0] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import common

from fedtune.config import parse_set
from fedtune.presets import resolve

CACHE = Path(__file__).resolve().parent.parent / "runs" / "bench-head"


def features(cfg):
    """{'clients': [(x [n, d] float64, y [n])] in client order, 'test': (x, y)}, cached."""
    import torch

    from fedtune.client.worker import get_worker
    from fedtune.evaluation import test_encoding
    from fedtune.head_init import head_features

    key = hashlib.sha256(repr((cfg.data, cfg.partition, cfg.model, cfg.federation.seed)).encode()).hexdigest()[:16]
    path = CACHE / f"features-{key}.pt"
    if path.is_file():
        return torch.load(path)
    out = {"clients": []}
    for c in range(cfg.partition.num_clients):
        w = get_worker(cfg, c)
        out["clients"].append(head_features(w.model, w.data.train, cfg.train.eval_batch_size, w.pad_id))
        print(f"client {c}: {len(w.data.train)} rows", flush=True)
    out["test"] = head_features(w.model, test_encoding(cfg), cfg.train.eval_batch_size, w.pad_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="2000")
    ap.add_argument("--examples", default="256,512,0", help="rows per client for the statistics (0 = all)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = resolve("default", overrides={"eval-size": args.eval_size, **parse_set(args.set)})
    import torch

    from fedtune.head_init import feature_moments, ncm_head, ridge_head

    feats = features(cfg)
    xt, yt = feats["test"]
    num_labels = int(max(int(y.max()) for _, y in feats["clients"] if len(y)) + 1)
    num_labels = max(num_labels, int(yt.max()) + 1)

    def score(w, b) -> tuple[float, float]:
        logits = xt @ w.double().T + b.double()
        return float((logits.argmax(1) == yt).double().mean()), float(torch.nn.functional.cross_entropy(logits, yt))

    rows = []
    for k in (int(v) for v in args.examples.split(",")):
        parts = [(x[:k], y[:k]) if k else (x, y) for x, y in feats["clients"]]
        n = sum(len(y) for _, y in parts)
        label = f"{k or 'all'} ({n})"
        ncm_stats = []
        for x, y in parts:
            sums = torch.zeros(num_labels, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
            counts = torch.bincount(y, minlength=num_labels).double()
            means = sums / counts.clamp(min=1)[:, None]
            ss = torch.zeros(num_labels, dtype=torch.float64).index_add_(0, y, ((x - means[y]) ** 2).sum(1))
            ncm_stats.append((sums, counts, ss))
        for scale in (4.0, 16.0):
            acc, loss = score(*ncm_head(*zip(*ncm_stats), logit_scale=scale))
            rows.append([label, f"ncm, logit scale {scale:g}", f"{acc:.3f}", f"{loss:.3f}"])
        moments = [feature_moments(x, y, num_labels) for x, y in parts]
        for g in (None, 0.1, 0.4):
            w, b, got = ridge_head(*zip(*moments), shrinkage=g)
            acc, _ = score(w, b)
            losses = " / ".join(f"{score(t * w, t * b)[1]:.3f}" for t in (0.2, 0.3, 0.5, 1.0))
            rows.append([label, f"ridge, shrinkage {'OAS ' if g is None else ''}{got:.3f}", f"{acc:.3f}",
                         f"{losses} (scale 0.2 / 0.3 / 0.5 / 1)"])
    body = "\n".join([
        "## The head before round 1 (`bench/head.py`)",
        "",
        f"Frozen all-MiniLM-L6-v2 features (max-length {cfg.data.max_length}) of the default federation: "
        f"{cfg.partition.num_clients} Dirichlet({cfg.partition.dirichlet_alpha}) clients; each head is built from "
        "the first K rows per client exactly as the clients' `head_init` query and the server build it "
        f"(`fedtune/head_init.py`); accuracy and loss on a fixed {cfg.data.eval_size}-example test slice. "
        "The ridge head's accuracy does not depend on its logit scale; its loss does.",
        "",
        common.table(["K per client (rows)", "head", "accuracy", "loss"], rows),
        "",
        f"Command: `.venv/bin/python bench/head.py --eval-size {args.eval_size} --examples {args.examples}`",
    ])
    if not args.no_write:
        common.write_section("head", body)
    print(body)


if __name__ == "__main__":
    main()
