"""A ClientApp for fault tests: fedtune's own, with clients that crash or hang in training.

Test-only: production code has no fault hooks; ``simulate(..., client_app=...)`` takes it.
``app``: round 1: client 1 crashes; round 2: client 2 hangs past the round timeout, client 3 crashes.
``oom_app``: round 1: client 0 runs out of CUDA memory (raised: CI has no GPU), behind fedtune's oom_mod.
"""

from __future__ import annotations

import time

import torch

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.client import app as fedtune_app
from fedtune.client.gpu import oom_mod

CRASH = {1: {1}, 2: {3}}  # round -> clients whose training raises
HANG = {2: {2}}  # round -> clients whose training outlives the round timeout
HANG_S = 65.0  # longer than the round-timeout the test sets (60 s); the simulation ends when it does


def _train(msg: Message, context: Context) -> Message:
    client, server_round = int(context.node_config["partition-id"]), int(msg.content[wire.CONFIG]["server-round"])
    if client in CRASH.get(server_round, ()):
        raise RuntimeError("injected crash")
    if client in HANG.get(server_round, ()):
        time.sleep(HANG_S)
    return fedtune_app.train(msg, context)


app = ClientApp()
app.train()(_train)
app.evaluate()(fedtune_app.evaluate_local)
app.query("head_init")(fedtune_app.head_init)
app.query("whoami")(fedtune_app.whoami)


OOM = {1: {0}}  # round -> clients whose training runs out of CUDA memory


def _train_oom(msg: Message, context: Context) -> Message:
    client, server_round = int(context.node_config["partition-id"]), int(msg.content[wire.CONFIG]["server-round"])
    if client in OOM.get(server_round, ()):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
    return fedtune_app.train(msg, context)


oom_app = ClientApp()
oom_app.train(mods=[oom_mod])(_train_oom)
oom_app.evaluate()(fedtune_app.evaluate_local)
oom_app.query("head_init")(fedtune_app.head_init)
oom_app.query("whoami")(fedtune_app.whoami)
