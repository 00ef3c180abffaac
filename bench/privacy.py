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

``--audit``: instead, the accountant's epsilon against the one-shot empirical estimate
``epsilon_audit`` (Andrew et al., ICLR 2024; ``audit-canaries``, docs/privacy.md) for
client-level DP (``dp=client-fixed``, head-init=random) at each epsilon, and without DP at inf;
section "privacy-audit" of docs/benchmarks.md.

    .venv/bin/python bench/privacy.py [--eval-size 500] [--epsilons 1,3,8,inf] [--set key=value ...]
    .venv/bin/python bench/privacy.py --set model=tiny --set rounds=1 --set train-size=400   # plumbing check
    .venv/bin/python bench/privacy.py --audit [--canaries 500] [--epsilons 1,3,8,inf] [--set key=value ...]

``--secagg``: instead, SecAgg+ overhead (``secure-aggregation=secagg+``, Flower's SecAgg+): seconds and
bytes per round against the same run without it (head-init=random in both), as ratios (goals: at most
1.5x time, 2x bytes); section "privacy-secagg".

    .venv/bin/python bench/privacy.py --secagg [--set key=value ...]
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


def audit(base: dict, epsilons: list[float], canaries: int) -> None:
    """The accountant's epsilon against epsilon_audit, client-level DP at each epsilon (inf: no DP)."""
    from fedtune.simulations.simulate import simulate

    rows = []
    for eps in epsilons:
        dp = {} if math.isinf(eps) else {"dp": "client-fixed", "target-epsilon": str(eps)}
        cfg = resolve("default", overrides={**base, "head-init": "random", "audit-canaries": str(canaries), **dp})
        out = tempfile.mkdtemp(prefix="fedtune-audit-")
        print(f"== audit, epsilon {eps:g}", flush=True)
        summary = simulate(cfg, out)
        acc = summary.get("epsilon", math.inf)
        rows.append(["inf (no DP)" if math.isinf(eps) else f"{eps:g}", f"{acc:.3g}" if math.isfinite(acc) else "-",
                     f"{summary['epsilon_audit']:.3g} [{summary['epsilon_audit_low']:.3g}, "
                     f"{summary['epsilon_audit_high']:.3g}]",
                     # sound: the interval reaches the accountant (a tight accountant puts the point near it)
                     "yes" if not math.isfinite(acc) or summary["epsilon_audit_low"] <= acc else "**NO**",
                     f"{summary['final_accuracy']:.3f}"])
    cfg = resolve("default", overrides={**base, "head-init": "random"})
    fed = cfg.federation
    body = "\n".join([
        "## Accountant epsilon against the empirical audit (`bench/privacy.py --audit`)",
        "",
        f"Model `{cfg.model.model}` + LoRA r={cfg.model.lora_rank}, {cfg.partition.num_clients} "
        f"{cfg.partition.partition} clients, {fed.rounds} rounds, `dp=client-fixed` (clip-norm "
        f"{cfg.privacy.clip_norm}, delta {cfg.privacy.delta}, {cfg.privacy.accountant} accountant, head-init=random), "
        f"{canaries} canary clients and as many never-inserted directions (`audit-canaries`, Andrew et al., "
        "ICLR 2024). `epsilon_audit` estimates what the final model alone reveals; the accountant bounds every "
        "round's model, so the audit must not exceed it beyond its own sampling error: the interval's low end "
        "stays at or below it (docs/privacy.md).",
        "",
        common.table(["target epsilon", "accountant epsilon", "epsilon_audit [95% CI]", "CI low end <= accountant",
                      "final acc"], rows),
    ])
    common.write_section("privacy-audit", body)
    print(body)


def secagg(base: dict) -> None:
    """Seconds and bytes per round with and without SecAgg+, same data, clients, rounds and seed."""
    from fedtune.server.run_dir import RunDir
    from fedtune.simulations.simulate import simulate

    res = {}
    for mode in ("none", "secagg+"):
        cfg = resolve("default", overrides={**base, "head-init": "random", "secure-aggregation": mode})
        out = tempfile.mkdtemp(prefix="fedtune-secagg-")
        print(f"== secure-aggregation={mode}", flush=True)
        summary = simulate(cfg, out)
        rows = RunDir(out).metrics()[1:]
        res[mode] = (summary["seconds_per_round"], sum(r["bytes_up"] + r["bytes_down"] for r in rows) / len(rows),
                     summary["final_accuracy"])
    (t0, b0, a0), (t1, b1, a1) = res["none"], res["secagg+"]
    cfg = resolve("default", overrides={**base, "head-init": "random"})
    fed = cfg.federation
    body = "\n".join([
        "## SecAgg+ overhead (`bench/privacy.py --secagg`)",
        "",
        f"Model `{cfg.model.model}` + LoRA r={cfg.model.lora_rank}, {cfg.partition.num_clients} clients, "
        f"{fed.rounds} rounds, head-init=random, the same seed; `secure-aggregation=secagg+` runs Flower's SecAgg+ "
        f"(shares {fed.secagg_shares:g}, threshold {fed.secagg_threshold:g}, clipping range "
        f"{fed.secagg_clipping_range:g}, {fed.secagg_quantization_range} levels). Bytes: everything the "
        "train and evaluate messages carry both ways (SecAgg+: its four exchanges: keys, shares, masked "
        "vectors, unmasking shares).",
        "",
        common.table(["", "s/round", "bytes/round", "final acc"],
                     [["plain", f"{t0:.1f}", f"{b0:,.0f}", f"{a0:.3f}"],
                      ["secagg+", f"{t1:.1f}", f"{b1:,.0f}", f"{a1:.3f}"],
                      ["ratio", f"**{t1 / t0:.2f}x** (goal <= 1.5x)", f"**{b1 / b0:.2f}x** (goal <= 2x)", ""]]),
    ])
    common.write_section("privacy-secagg", body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-size", default="500")
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--methods", default=",".join(METHODS.values()))
    ap.add_argument("--audit", action="store_true", help="accountant epsilon vs epsilon_audit (client-level DP)")
    ap.add_argument("--canaries", type=int, default=500)
    ap.add_argument("--secagg", action="store_true", help="SecAgg+ overhead: time and bytes per round")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    base = {"eval-size": args.eval_size, **parse_set(args.set)}
    epsilons = [float(e) for e in args.epsilons.split(",")]
    if args.audit:
        audit(base, epsilons, args.canaries)
        return
    if args.secagg:
        secagg(base)
        return
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
