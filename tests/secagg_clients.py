"""ClientApps for SecAgg+ dropout tests: fedtune's own, with clients killed mid-protocol.

Test-only (``simulate(..., client_app=...)``): a mod before fedtune's SecAgg+ mod raises at
the "collect masked vectors" stage (after the keys were shared, before the masked vector is
sent) for the clients in its kill set, as a client that dies mid-protocol would.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtune.client import app as fedtune_app
from fedtune.client.secagg import secagg_mod
from fedtune.privacy.client import client_dp_mod


def _killer(kill: set[int]):
    def mod(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
                and int(context.node_config["partition-id"]) in kill):
            raise RuntimeError("injected: killed mid-protocol")
        return call_next(msg, context)

    return mod


def _app(kill: set[int]) -> ClientApp:
    app = ClientApp()
    app.train(mods=[_killer(kill), secagg_mod, client_dp_mod])(fedtune_app.train)  # the decorator returns fn
    app.evaluate()(fedtune_app.evaluate_local)
    app.query("head_init")(fedtune_app.head_init)
    app.query("whoami")(fedtune_app.whoami)
    return app


one_killed = _app({1})
two_killed = _app({1, 2})
