"""A deployed round against a simulated one: the same clients on the same machine.

Runs the federation twice, one after the other: ``fedtune serve`` + N ``fedtune join`` on
loopback (Flower's deployment engine, TLS and node auth, each node with its long-lived
worker), then ``fedtune simulate`` (Flower's simulation runtime on Ray). Reports seconds per
round (rounds 1..R; round 0 is start-up and the initial evaluation) and the ratio
deployed / simulated. Goal: <= 1.2.

    .venv/bin/python bench/deployed.py [--preset quick] [--set key=value ...] [--no-write]
    # a round where local training dominates (MiniLM, the anchor's data and local epoch), its own section:
    .venv/bin/python bench/deployed.py --preset default --nodes 4 --section deployed-minilm \
        --set train-size=1500 --set max-length=128 --set local-epochs=1 --set eval-size=800
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from fedtune.config import parse_set

FEDTUNE = [sys.executable, "-m", "fedtune"]


def _rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


KINDS = (("flower-superlink", "SuperLink"), ("flwr-serverapp", "ServerApp"), ("flower-supernode", "SuperNodes"),
         ("flwr-clientapp", "flwr-clientapp (one per message)"), ("fedtune.client.service", "workers (training)"), ("superexec", "SuperExec"),
         ("/flwr ls", "flwr ls (fedtune serve's status checks)"))


class CpuBy:
    """CPU seconds (user + system) spent by each kind of process between ``start`` and ``stop``,
    sampled every half second (a process that lives between two samples is missed: flwr-clientapp
    processes live for a whole message, seconds at least)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, float, float]] = {}  # pid -> (kind, cpu at start or birth, last cpu)
        self.on = False

    def sample(self) -> None:
        if not self.on:
            return
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            line = " ".join(proc.info["cmdline"] or [])
            kind = next((name for needle, name in KINDS if needle in line), None)
            times = proc.info["cpu_times"]
            if kind is None or times is None:
                continue
            used = times.user + times.system
            first = self.seen.get(proc.info["pid"], (kind, self.base.get(proc.info["pid"], 0.0), 0.0))[1]
            self.seen[proc.info["pid"]] = (kind, first, used)

    def start(self) -> None:
        import psutil

        self.base = {p.pid: sum(p.cpu_times()[:2]) for p in psutil.process_iter()}  # what ran before round 1
        self.on = True
        self.sample()

    def stop(self) -> None:
        self.sample()
        self.on = False

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {name: 0.0 for _, name in KINDS}
        for kind, first, last in self.seen.values():
            out[kind] += last - first
        return out


def deployed(config: list[str], nodes: int, rounds: int, threads: int,
             work: Path) -> tuple[list[dict], dict[str, float]]:
    """Each node trains with ``threads`` torch threads, as many as a simulated client gets."""
    from fedtune.deploy.certs import make_credentials
    from fedtune.deploy.processes import free_port, stop_tree

    creds = make_credentials(work / "creds", nodes=nodes)
    address = f"127.0.0.1:{free_port()}"
    run = work / "deployed"
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = (work / f"{name}.log").open("wb")
        procs.append(subprocess.Popen(FEDTUNE + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    try:
        server = start("serve", ["serve", *config, "--certs", str(creds.folder), "--address", address, "--out", str(run)])
        deadline = time.monotonic() + 300
        while "waits for" not in (work / "serve.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fedtune serve did not start; see {work / 'serve.log'}")
            time.sleep(0.5)
        for i in range(nodes):
            start(f"node{i}", ["join", "--superlink", address, "--ca", str(creds.ca), "--key", str(creds.node_key(i)),
                               "--partition-id", str(i), "--state-dir", str(work / f"home{i}"),
                               "--threads", str(threads)])
        last, cpu = -1, CpuBy()
        while server.poll() is None:
            rows = _rows(run)
            for r in rows[last + 1:]:
                print(f"  deployed round {r['round']}: {r['seconds']:.1f} s", flush=True)
                if r["round"] == 0:
                    cpu.start()  # rounds 1..: what each kind of process costs while the federation trains
                if r["round"] == rounds:
                    cpu.stop()
            last = len(rows) - 1
            cpu.sample()
            time.sleep(0.5)
        if server.returncode != 0:
            raise SystemExit(f"fedtune serve failed ({server.returncode}); see {work / 'serve.log'}")
    finally:
        for proc in reversed(procs):
            stop_tree(proc, grace=3)
    return _rows(run), cpu.seconds()


def simulated(config: list[str], work: Path) -> list[dict]:
    run = work / "simulated"
    subprocess.run(FEDTUNE + ["simulate", *config, "--out", str(run)], check=True, stdout=subprocess.DEVNULL)
    return _rows(run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--section", default="deployed", help="the docs/benchmarks.md section it writes")
    args = ap.parse_args()
    sets = [f"num-clients={args.nodes}", f"rounds={args.rounds}", "fraction-evaluate=0", *args.set]
    config = ["--preset", args.preset] + [a for s in sets for a in ("--set", s)]
    work = Path(tempfile.mkdtemp(prefix="fedtune-deployed-"))
    load = os.getloadavg()
    from fedtune.presets import resolve

    threads = resolve(args.preset, overrides=parse_set(sets)).federation.client_cpus
    dep, cpu = deployed(config, args.nodes, args.rounds, threads, work)
    sim = simulated(config, work)
    for r in sim:
        print(f"  simulated round {r['round']}: {r['seconds']:.1f} s", flush=True)
    d = statistics.mean(r["seconds"] for r in dep[1:])
    s = statistics.mean(r["seconds"] for r in sim[1:])
    builds, trains = [], []  # trains[node][k]: seconds of the node's (k+1)-th train message = round k+1
    for i in range(args.nodes):
        log = work / f"home{i}" / "worker" / "worker.jsonl"
        served = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        builds.append(served[-1]["model_builds"] if served else 0)
        trains.append([r["seconds"] for r in served if r["message_type"] == "train"])
    slowest = [max((t[k] for t in trains if len(t) > k), default=float("nan")) for k in range(len(dep) - 1)]
    outside = statistics.mean(r["seconds"] - w for r, w in zip(dep[1:], slowest))  # not the workers' training
    cores = os.cpu_count() or 1
    share = (f"{args.nodes} nodes x {threads} torch thread(s) = {args.nodes * threads} threads on {cores} cores"
             + (" (oversubscribed: each worker's training slows down beyond its share)" if args.nodes * threads > cores else ""))
    per_round = {k: v / args.rounds for k, v in cpu.items()}
    cpu_text = ", ".join(f"{k} {v:.1f}" for k, v in per_round.items())
    print(f"CPU seconds per round (rounds 1..{args.rounds}) by process: {cpu_text}")
    print(f"deployed {d:.2f} s/round, simulated {s:.2f} s/round, ratio {d / s:.2f} (goal <= 1.2); "
          f"model builds per node {builds}; slowest worker's train message per round {slowest}; "
          f"outside training {outside:.2f} s/round; {share}; load average before {load[0]:.1f}")
    if args.no_write:
        return
    body = "\n".join([
        f"## Deployed vs simulated rounds (`bench/deployed.py`, {args.preset} preset, {args.nodes} nodes)",
        "",
        f"`--preset {args.preset}` {' '.join('--set ' + s for s in sets)}: {args.nodes} SuperNodes on loopback "
        "(`fedtune serve` + `fedtune join`, TLS, node auth, one long-lived worker per node) against "
        "`fedtune simulate` (Ray), one after the other on the same machine. Seconds per round, rounds 1.."
        f"{args.rounds} (round 0 is start-up).",
        "",
        common.table(["round", "deployed s", "simulated s"],
                     [[a["round"], a["seconds"], b["seconds"]] for a, b in zip(dep[1:], sim[1:])]),
        "",
        f"Mean: deployed {d:.2f} s, simulated {s:.2f} s, **ratio {d / s:.2f}** (goal <= 1.2). Model builds per "
        f"node over the run: {builds}. The slowest node's worker spent {', '.join(f'{w:.1f}' for w in slowest)} s "
        f"on its train message (round 1.., its own log: round 1 includes nothing but training, the model is built "
        f"in round 0); the rest of a deployed round, **{outside:.2f} s** on average, is the server's evaluation "
        "and Flower's per-message cost: the SuperNode's 3 s idle poll of the SuperLink and a fresh "
        "`flwr-clientapp` process per message (~2 CPU-s of Python and Flower imports), and the processes' polls "
        "(docs/deploying.md, \"One process per node\"). "
        f"Threads: {share}; the simulation runs as many clients at once as client-cpus allows on the cores. "
        f"CPU seconds per round by process (rounds 1..{args.rounds}, all on this machine): {cpu_text}. "
        f"Load average (1 min) at the start: {load[0]:.1f} on {os.cpu_count()} cores. Command: "
        f"`.venv/bin/python bench/deployed.py --preset {args.preset} --nodes {args.nodes} --rounds {args.rounds}"
        + "".join(f" --set {s}" for s in args.set) + (f" --section {args.section}`" if args.section != "deployed" else "`"),
    ])
    common.write_section(args.section, body)


if __name__ == "__main__":
    main()
