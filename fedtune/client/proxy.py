"""The ClientApp a deployed SuperNode starts for each message: hands the message and its
context to the node's long-lived worker (fedtune/client/service.py) and returns its reply.
It imports no torch: a fresh ``flwr-clientapp`` process costs Flower's imports only.

Without a worker (a SuperNode started by hand, not by ``fedtune join``) it runs fedtune's
ClientApp in this process, as Flower would.
"""

from __future__ import annotations

import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client import service

# What fedtune.client.app registers (tests/test_worker_service.py checks they agree).
HANDLERS = ("train.default", "evaluate.default", "query.head_init", "query.whoami")

app = ClientApp()


def forward(msg: Message, context: Context) -> Message:
    folder = os.environ.get(service.ENV)
    if not folder:
        from fedtune.client.app import app as local

        return local(msg, context)
    reply, state = service.call(folder, msg, context)
    context.state = state  # Flower keeps the node's context (FedSA's B, DP accountants) from here
    return reply


for _name in HANDLERS:
    _category, _action = _name.split(".")
    getattr(app, _category)(_action)(forward)
