"""The client side of DP in the federation: a DP-SGD round with a persistent accountant, and
the mod that clips whole updates for client-level DP with client-side clipping.

The accountant of a client is kept in two places, and both are written after every round,
before the reply leaves:

- Flower's ``context.state`` (per node, across rounds of one run), as a ConfigRecord
  holding the accountant's JSON state;
- a state file ``<state-dir>/client-<id>.json`` when a state directory is configured
  (node config ``state-dir``, else the run config key ``dp-state-dir``), written atomically;
  it survives a restart of the process, the node or the whole federation.

On load the longer history wins (an accountant only grows, so it is the newer one). A state
that cannot be read is an error, never a silent reset: a reset would spend the budget twice.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from fedtune.artifacts import atomic_write
from fedtune.config import RunConfig
from fedtune.privacy.accountant import PrivacyAccountant

STATE_KEY = "fedtune-privacy"  # context.state[STATE_KEY] = ConfigRecord({"accountant": json})
NODE_STATE_DIR = "state-dir"  # node config key (flower-supernode --node-config "state-dir=...")

# What a DP client reports: numbers that are functions of the DP outputs and of public
# quantities only (n_local is treated as public). train_loss, examples_seen and
# empty_batches are computed on private batches without noise, so they stay on the client.
REPLY_KEYS = ("epsilon", "budget_exhausted", "steps", "noise_multiplier", "sample_rate", "delta")


def state_path(cfg: RunConfig, context: Context, client: int) -> Path | None:
    folder = str(context.node_config.get(NODE_STATE_DIR, "") or cfg.privacy.dp_state_dir)
    return Path(folder) / f"client-{client}.json" if folder else None


def load_accountant(cfg: RunConfig, context: Context, client: int) -> PrivacyAccountant:
    """This client's accountant: the longer of the context.state and state-file histories,
    or a fresh one."""
    candidates: list[PrivacyAccountant] = []
    if STATE_KEY in context.state:
        text = str(context.state[STATE_KEY]["accountant"])  # type: ignore[index]
        candidates.append(PrivacyAccountant.from_state_dict(json.loads(text)))
    path = state_path(cfg, context, client)
    if path is not None and path.exists():
        try:
            saved = json.loads(path.read_text())
            candidates.append(PrivacyAccountant.from_state_dict(saved["accountant"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"cannot read the privacy accountant state {path}: {exc}") from None
    if not candidates:
        return PrivacyAccountant(cfg.privacy.accountant)
    best = max(candidates, key=lambda a: a.steps)
    if best.mechanism != cfg.privacy.accountant:
        raise RuntimeError(
            f"client {client}'s privacy accountant is {best.mechanism!r} but the run asks for "
            f"accountant={cfg.privacy.accountant!r}; its budget cannot be carried over"
        )
    return best


def save_accountant(acc: PrivacyAccountant, cfg: RunConfig, context: Context, client: int) -> None:
    text = json.dumps(acc.state_dict())
    context.state[STATE_KEY] = ConfigRecord({"accountant": text})
    path = state_path(cfg, context, client)
    if path is not None:
        atomic_write(path, json.dumps({"client": client, "accountant": acc.state_dict()}))


def release_head_sums(worker: Any, cfg: RunConfig, context: Context, client: int) -> tuple[Any, dict[str, float]]:
    """The DP FedNCM release of this client (:mod:`fedtune.privacy.head`): noisy unit-feature
    class sums over all its training examples (the noise does not grow with their number),
    accounted and saved before they leave. Returns (sums [C, d], reply metrics)."""
    import secrets

    import torch

    from fedtune.head_init import head_features, head_module
    from fedtune.privacy.head import head_plan, noisy_class_sums

    dp = cfg.privacy.sample_dp()
    ((sigma, q, steps),) = head_plan(cfg)
    acc = load_accountant(cfg, context, client)
    if dp.target_epsilon is not None:
        after = acc.projected_epsilon(dp.delta, noise_multiplier=sigma, sample_rate=q, steps=steps)
        if after > dp.target_epsilon * (1 + 1e-9):
            raise RuntimeError(f"client {client}: the head release would spend epsilon {after:.3g} "
                               f"> target-epsilon {dp.target_epsilon:g}; nothing was released")
    x, y = head_features(worker.model, worker.data.train, cfg.train.eval_batch_size, worker.pad_id)  # [N, d], [N]
    generator = torch.Generator().manual_seed(secrets.randbits(63))  # OS entropy: the noise must stay secret
    sums = noisy_class_sums(x, y, head_module(worker.model).out_features, sigma, generator)
    acc.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    save_accountant(acc, cfg, context, client)  # accounted before anything leaves
    return sums, {"epsilon": acc.epsilon(dp.delta), "noise_multiplier": sigma, "delta": dp.delta}


def train_sample_dp(worker: Any, cfg: RunConfig, seed: int, context: Context, client: int) -> dict[str, float]:
    """One DP-SGD round of this client (``train_local_dp``), its accountant loaded before and
    saved after. Returns the reply metrics (REPLY_KEYS); ``budget_exhausted=1``: nothing was
    trained, the weights are the ones received."""
    from fedtune.privacy.dp_train import train_local_dp  # opacus: imported on use
    from fedtune.privacy.head import head_plan

    acc = load_accountant(cfg, context, client)
    with warnings.catch_warnings():  # opacus' hooks on a model whose inputs need no grad: expected, harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        stats = train_local_dp(
            worker.model, worker.data.train, cfg.train, cfg.privacy.sample_dp(), acc, seed, worker.pad_id,
            rounds=cfg.federation.rounds, prior=head_plan(cfg),
        )
    save_accountant(acc, cfg, context, client)
    return {k: float(stats[k]) for k in REPLY_KEYS}


def client_dp_mod(msg: Message, context: Context, call_next):  # a Flower Mod on the train handler
    """Client-level DP with dp-clipping=client: Flower's ``fixedclipping_mod`` /
    ``adaptiveclipping_mod`` clip this client's update to the norm the server's wrapper sent.
    Other runs pass straight through."""
    from fedtune import wire

    try:
        flat = json.loads(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
    except (KeyError, TypeError, ValueError):
        return call_next(msg, context)
    dp, clipping = flat.get("dp", "none"), flat.get("dp-clipping", "server")
    if clipping != "client" or dp not in ("client-fixed", "client-adaptive"):
        return call_next(msg, context)
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mod = adaptiveclipping_mod if dp == "client-adaptive" else fixedclipping_mod
    return mod(msg, context, call_next)
