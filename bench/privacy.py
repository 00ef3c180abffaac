"""Accuracy under sample-level DP: epsilon in {1, 3, 8, inf}, LoRA and FFA-LoRA, and the cost of a DP step.

Every run uses the same data, clients, rounds, local steps and seed; only ``dp`` and
``target-epsilon`` change: inf is the ``default`` preset (no DP), every epsilon the ``private``
preset (``dp=sample``, half the learning rates) at that ``target-epsilon``. Every run starts from a
closed-form head: the default one at inf (``head-init=ridge`` since issue 18; FedNCM before), the
private FedNCM head under DP (noisy unit-feature class sums, accounted in the same budget:
docs/privacy.md). FFA-LoRA (``strategy=ffa``) freezes A and
trains only B and the head, so DP-SGD noises fewer coordinates. Step time: one client's
``train_local`` against ``train_local_dp`` (per-example gradients, clipping, noise) on the same
model and data, in this process, after one warm-up run each.
Writes a table to docs/benchmarks.md (section "privacy") and docs/bench-privacy.png.

    .venv/bin/python bench/privacy.py [--eval-size 500] [--epsilons 1,3,8,inf] [--set key=value ...]
    .venv/bin/python bench/privacy.py --set model=tiny --set rounds=1 --set train-size=400   # plumbing check
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import common

from fedtune.config import parse_set
from fedtune.presets import resolve

METHODS = {"LoRA (fedavg)": "fedavg", "FFA-LoRA (ffa)": "ffa"}
PNG = common.DOC.parent / "bench-privacy.png"


def plot(results: dict[str, dict[float, float]]) -> None:
    with common.figure(PNG, (6, 3.8), fontsize=8) as ax:
        for name, by_eps in results.items():
            eps = sorted(by_eps)
            ax.plot(range(len(eps)), [by_eps[e] for e in eps], marker="o", label=name)
            ax.set_xticks(range(len(eps)), [("inf (no DP)" if math.isinf(e) else f"{e:g}") for e in eps])
        ax.set_xlabel("target epsilon per client (delta 1e-5, all rounds)")
        ax.set_ylabel("final test accuracy")


def step_times(cfg, steps: int = 8) -> tuple[float, float]:
    """(seconds per non-private step, seconds per DP-SGD step) for client 0, LoRA."""
    import dataclasses

    import torch

    from fedtune.data import client_data, load_dataset
    from fedtune.modeling import build_model, load_tokenizer
    from fedtune.privacy import PrivacyAccountant, train_local_dp
    from fedtune.training import encode, train_local

    torch.set_num_threads(cfg.federation.client_cpus)
    tok = load_tokenizer(cfg.model.model)
    enc = encode(tok, client_data(cfg.data, cfg.partition, cfg.federation.seed, 0).train, cfg.data.max_length)
    model = build_model(cfg.model, load_dataset(cfg.data).num_labels, cfg.federation.seed)
    train = dataclasses.replace(cfg.train, local_steps=steps, local_epochs=0.0)
    dp = dataclasses.replace(cfg.privacy, dp="sample", target_epsilon=None, noise_multiplier=1.0).sample_dp()
    pad = tok.pad_token_id or 0

    def plain() -> None:
        train_local(model, enc, train, 0, pad)

    def private() -> None:
        train_local_dp(model, enc, train, dp, PrivacyAccountant(dp.accountant), 0, pad)

    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # opacus' hooks: expected
    out = []
    for fn in (plain, private):
        fn()  # warm-up
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) / steps)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="500")
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--methods", default=",".join(METHODS.values()))
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    base = {"eval-size": args.eval_size, **parse_set(args.set)}
    epsilons = [float(e) for e in args.epsilons.split(",")]
    wanted = args.methods.split(",")

    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate
    from fedtune.strategies import STRATEGIES

    methods = {name: s for name, s in METHODS.items() if s in wanted and s in STRATEGIES.names()}
    missing = [s for s in wanted if s not in STRATEGIES.names()]
    accuracy: dict[str, dict[float, float]] = {}
    rows = []
    for name, strategy in methods.items():
        accuracy[name] = {}
        for eps in epsilons:
            preset, dp = ("default", {}) if math.isinf(eps) else ("private", {"target-epsilon": str(eps)})
            cfg = resolve(preset, overrides={**base, "strategy": strategy, **dp})
            out = tempfile.mkdtemp(prefix="fedtune-privacy-")
            print(f"== {name}, epsilon {eps:g}", flush=True)
            summary = simulate(cfg, out)
            last = RunDir(out).metrics()[-1]
            accuracy[name][eps] = summary["final_accuracy"]
            spent = last.get("epsilon", math.inf)
            head = RunDir(out).metrics()[0]
            rows.append([name, "inf (no DP)" if math.isinf(eps) else f"{eps:g}",
                         f"{spent:.3g}" if math.isfinite(spent) else "-",
                         f"{head['accuracy']:.3f}" + (f" ({head['epsilon']:.2g})" if "epsilon" in head else ""),
                         f"{summary['final_accuracy']:.3f}",
                         f"{summary['best_accuracy']:.3f}", f"{summary['seconds_per_round']:.1f}"])
    plot(accuracy)

    cfg = resolve("default", overrides=base)
    pcfg = resolve("private", overrides=base)
    print("== step time", flush=True)
    plain, private = step_times(cfg)

    fed, tr = cfg.federation, cfg.train
    note = ("" if not missing else
            f" Not run: {', '.join(missing)} (not in the strategy registry).")
    body = "\n".join([
        "## Accuracy under sample-level DP (`bench/privacy.py`)",
        "",
        f"Model `{cfg.model.model}` + LoRA r={cfg.model.lora_rank}, 20 Newsgroups, {cfg.partition.num_clients} "
        f"{cfg.partition.partition} clients, {fed.rounds} rounds. At inf (`--preset default`): {tr.local_steps} "
        f"local steps of batch {tr.batch_size}, lr {tr.lr} / head {tr.head_lr}. Under DP (`--preset private`): "
        f"{pcfg.train.local_steps} local steps of expected (Poisson) batch {pcfg.train.batch_size}, lr "
        f"{pcfg.train.lr} / head {pcfg.train.head_lr}. Head before round 1: at inf `head-init={tr.head_init}` "
        f"({tr.head_init_examples} rows per client), under DP the private FedNCM head (noisy unit-feature class "
        "sums of all rows, "
        f"spending `dp-head-share` = {pcfg.privacy.dp_head_share} of the target alone). DP-SGD per client "
        f"(`dp=sample`, delta {cfg.privacy.delta}, max-grad-norm {cfg.privacy.max_grad_norm}, {cfg.privacy.accountant} "
        f"accountant), sigma calibrated per client so that the head release and all {fed.rounds} rounds together "
        f"spend `target-epsilon`. Accuracy "
        f"on a fixed {cfg.data.eval_size}-example test slice; `spent` = the largest client epsilon after the last "
        f"round.{note}",
        "",
        common.table(["method", "target epsilon", "spent", "round 0: head (its epsilon)", "final acc", "best acc",
                      "s/round"], rows),
        "",
        "Points lost at epsilon 8 against no DP (final accuracy; goal: at most 3): " + ", ".join(
            f"{name} {100 * (by[math.inf] - by[8.0]):.1f}" for name, by in accuracy.items()
            if 8.0 in by and math.inf in by) + ".",
        "",
        f"DP step time (client 0, LoRA, {cfg.federation.client_cpus} thread(s), expected batch {tr.batch_size}): "
        f"{1000 * private:.0f} ms vs {1000 * plain:.0f} ms non-private, **{private / plain:.2f}x** "
        "(per-example gradients of the adapter and head, clipping, noise).",
        "",
        f"![accuracy vs epsilon]({PNG.name})",
    ])
    common.write_section("privacy", body)
    print(body)


if __name__ == "__main__":
    main()
