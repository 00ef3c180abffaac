"""Run a federation on Flower's simulation runtime: N virtual SuperNodes on Ray actors.

We call ``flwr.simulation.run_simulation`` rather than ``flwr run``: the latter syncs the
app's dependencies into a fresh environment (pulling a CUDA torch here), while this runs in
the environment the user already has. Flower marks it deprecated; it is the supported way
to start the same ServerApp/ClientApp in-process; its notice shows with --verbose.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.data import load_dataset, partition_indices, train_sizes
from fedtune.modeling import load_tokenizer, shared_model
from fedtune.profiles import server_model
from fedtune.server.app import Progress, make_server_app, print_progress
from fedtune.artifacts import CLIENTS_DIR, RunDir
from fedtune.strategies.recipes import recipe_for

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Flower's Ray backend: each virtual client's share (client-cpus, client-gpus) and Ray's
    init arguments: a local Ray instance, or the cluster at ``ray-address`` (docs/gpu.md)."""
    fed = cfg.federation
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
    if fed.ray_address:  # an existing cluster brings its own resources
        init["address"] = fed.ray_address
    else:
        init["num_cpus"] = max(fed.client_cpus, os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus}, "init_args": init}


def check_devices(cfg: RunConfig) -> None:
    """One line before Ray starts (never a hang waiting for GPUs that do not exist): the
    clients' and the server's devices, and client-gpus, on this machine. A run on an existing
    Ray cluster (ray-address) is checked by its own nodes."""
    import torch

    from fedtune.device import resolve
    from fedtune.errors import ConfigError

    resolve(cfg.model.server_device, "server-device")
    if cfg.federation.ray_address:
        return
    resolve(cfg.model.device, "device")
    if cfg.federation.client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"bad value client-gpus={cfg.federation.client_gpus}: this machine has no CUDA device "
                          "(set client-gpus=0, or ray-address=auto to use a Ray cluster with GPUs)")


def preflight(cfg: RunConfig) -> None:
    """Fail fast, in this process, on what would otherwise fail inside Ray: the data, the
    partitioning, the devices, the tokenizer and the model with its adapter (built once, on
    the server's device, and reused by the server, which runs in this process)."""
    check_devices(cfg)
    ds = load_dataset(cfg.data)
    partition_indices(cfg.data, cfg.partition, cfg.federation.seed)
    load_tokenizer(cfg.model.model)
    shared_model(server_model(cfg), ds.num_labels, cfg.federation.seed)
    from fedtune.privacy.federation import preflight as privacy_preflight  # noise calibration, DP wrappers

    privacy_preflight(cfg)
    from fedtune.strategies import build_strategy  # robust aggregation: what the strategy refuses

    build_strategy(cfg)
    if cfg.federation.secure_aggregation != "none":  # Flower's SecAgg+ argument checks
        from fedtune.server.secagg import secagg_of

        secagg_of(object(), cfg)


def with_client_state_dir(cfg: RunConfig, out: str | Path) -> RunConfig:
    """``cfg`` with ``client-state-dir`` = ``<out>/clients`` (absolute: the actors' working
    directory may differ) when its strategy keeps personal tensors on the clients (fedsa) and
    none is set; other runs are unchanged."""
    if cfg.federation.client_state_dir or not recipe_for(cfg.federation.strategy).local:
        return cfg
    return cfg.replace(**{"client-state-dir": str(Path(out).resolve() / CLIENTS_DIR)})


def simulate(
    cfg: RunConfig, out: str | Path, progress: Progress = print_progress, verbose: bool = False,
    resume: bool = False, client_app: Any = None,
) -> dict[str, Any]:
    """Run ``cfg`` and return its summary; everything lands in ``out`` (fedsa: each client's
    own B in ``out/clients/``, unless ``client-state-dir`` says otherwise). ``resume``:
    continue the run in ``out`` from its last checkpoint (docs/robustness.md).
    ``client_app``: another ClientApp than fedtune's (tests inject faults with it)."""
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as fedtune_client_app

    cfg = with_client_state_dir(cfg, out)
    preflight(cfg)
    run = RunDir(out) if resume else RunDir(out).create(cfg)
    # the server knows every partition here: no client may state more examples than its own holds
    caps = train_sizes(cfg.data, cfg.partition, cfg.federation.seed)
    server_app = make_server_app(cfg, run, progress, resume, caps)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:  # Flower's own log (incl. the run_simulation deprecation notice) only with --verbose
        flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app or fedtune_client_app,
            num_supernodes=cfg.partition.num_clients,
            backend_config=backend_config(cfg),
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.setLevel(level)
    if not (run.path / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without finishing its rounds; see {run.path}")
    return run.summary()
