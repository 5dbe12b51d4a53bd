"""Flower ClientApp: computes one client's upload with baffle's own client functions.

The node finds its data through ``node_config``: ``partition-id`` (its client index in
the seeded split; Flower's simulation sets it, SuperNodes get it with
``--node-config "partition-id=0"``). A server whose direction scheme (version or
fingerprint) or round estimator (K, sigma, scheme) differs from ours gets an error reply
instead of garbage.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from baffle.aggregate import Upload
from baffle.directions import DirectionScheme
from baffle.flower.wire import (
    check_round_spec,
    config_from_run_config,
    load_weights,
    upload_to_content,
)
from baffle.simulator import Federation, run_client, setup


@functools.lru_cache(maxsize=2)
def _federation(run_config_json: str) -> Federation:
    cfg, _ = config_from_run_config(json.loads(run_config_json))
    return setup(cfg)


def make_client_app(
    overrides: dict[str, Any] | None = None,
    tamper: Callable[[int, Upload], Upload] | None = None,
    dirs: DirectionScheme | None = None,
) -> ClientApp:
    """A ClientApp; ``overrides`` are run-config values applied over Flower's run config.

    ``tamper(client, upload)`` and ``dirs`` (this client's own direction scheme) exist to
    test faulty and mismatched clients.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_config = {**dict(context.run_config), **(overrides or {})}
        fed = _federation(json.dumps(run_config, sort_keys=True))
        client = int(context.node_config["partition-id"])
        rc = msg.content["config"]
        (dirs or fed.dirs).check(str(rc["scheme-version"]), str(rc["fingerprint"]))
        check_round_spec(fed.spec_at(int(rc["round"])), rc)
        load_weights(fed.server.model, msg.content["arrays"])
        upload = run_client(fed, client, int(rc["round"]), float(rc["lr"]), int(rc["seed"]))
        if tamper is not None:
            upload = tamper(client, upload)
        return Message(upload_to_content(upload), reply_to=msg)

    return app


app = make_client_app()
