"""Flower ClientApp: computes one client's upload with baffle's own client functions.

The node finds its data through ``node_config``: ``partition-id`` (its client index in
the seeded split; Flower's simulation sets it, SuperNodes get it with
``--node-config "partition-id=0"``). A server whose direction scheme (version or
fingerprint) or round estimator (K, sigma, scheme) differs from ours gets an error reply
instead of garbage.

With ``client-optimizer = "keep"`` the node keeps its local optimizer state in Flower's
``Context.state`` (for the run's lifetime on that node), the last ``KEPT`` of them. A
node started with ``state-dir`` in its node config also writes them to a file there
(atomically, after every round) and reads it when its ``Context.state`` is empty, so the
states outlive a restarted SuperNode and a new Flower run that resumes the server. The
file is named by the run's training config, less what a resumed run may change (its
length, schedules, data folder and device), so another experiment never picks it up.

In epoch mode the server names, by digest, the state it will replay the client's epoch
from; the client starts from that one, or fresh if it no longer holds it, and says which
in its upload, so the server always replays what the client ran.

With ``--guide-dims`` the node keeps the latest basis U the server sent in
``Context.state`` and draws every direction in it; a round that names a basis the node does
not hold (a restarted node) gets an error reply, and the server sends it again next round.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from baffle.aggregate import Upload
from baffle.branch import BRANCHABLE, MOVABLE
from baffle.client import optimizer_digest
from baffle.config import TrainConfig
from baffle.directions import Basis, DirectionScheme
from baffle.errors import ConfigError
from baffle.flower.wire import (
    check_round_spec,
    config_from_run_config,
    load_weights,
    kept_basis,
    record_states,
    states_record,
    upload_to_content,
)
from baffle.rundir import atomic_write
from baffle.simulator import Federation, client_round, setup

log = logging.getLogger("baffle.flower")


@functools.lru_cache(maxsize=2)
def _federation(run_config_json: str) -> Federation:
    cfg, _ = config_from_run_config(json.loads(run_config_json))
    return setup(cfg, node=True)


def node_client(node_config: Mapping[str, Any], clients: int) -> int:
    """This node's client index: its ``partition-id``, which must be in 0..clients-1."""
    if "partition-id" not in node_config:
        raise ConfigError("this node has no partition-id: start it with "
                          "--node-config \"partition-id=N\" (0 <= N < clients)")
    client = int(node_config["partition-id"])
    if not 0 <= client < clients:
        raise ConfigError(f"partition-id {client} is outside this run's {clients} clients: "
                          f"start the node with --node-config \"partition-id=N\", "
                          f"0 <= N < {clients}")
    return client


STATE_KEY = "baffle-client-optim"
KEPT = 2  # the newest state, and the one before it for a server that lost its last round


def pick_start(kept: Sequence[dict[str, Any]], wanted: int | None,
               client: int) -> dict[str, Any] | None:
    """The optimizer state a kept client starts its round from: the newest it holds when
    the server names none (bp-fedavg: the state is the client's own), else the one whose
    digest the server names; fresh (``None``) for 0 or a state this node no longer holds."""
    if wanted is None:
        return kept[-1] if kept else None
    if wanted == 0:
        return None
    for state in reversed(kept):
        if optimizer_digest(state) == wanted:
            return state
    log.warning("client %d: the server replays from optimizer state %016x, which this node "
                "does not hold (restarted?): starting this epoch from a fresh optimizer",
                client, wanted)
    return None


def state_file(node_config: Mapping[str, Any], config: TrainConfig, client: int
               ) -> Path | None:
    """Where this node persists client ``client``'s kept states: ``state-dir`` (node
    config) / baffle-<hash of the config less BRANCHABLE and MOVABLE>-client<N>.pt, the
    fields a resumed run may change; None without a ``state-dir``."""
    folder = node_config.get("state-dir")
    if not folder:
        return None
    same = {k: v for k, v in config.to_dict().items() if k not in BRANCHABLE + MOVABLE}
    key = hashlib.blake2b(json.dumps(same, sort_keys=True).encode(), digest_size=6).hexdigest()
    return Path(str(folder)) / f"baffle-{key}-client{client}.pt"


def load_kept(context: Context, path: Path | None, client: int) -> list[dict[str, Any]]:
    """The states this node keeps: from ``Context.state``, else from ``path`` (a restarted
    node or a new run). An unreadable file is logged and counts as none."""
    kept = record_states(context.state.get(STATE_KEY))  # type: ignore[arg-type]
    if kept or path is None or not path.exists():
        return kept
    try:
        kept = list(torch.load(path, weights_only=True))
    except Exception as e:  # noqa: BLE001 - any unreadable file: start fresh, as on a new node
        log.warning("client %d: cannot read kept optimizer states %s (%s: %s); starting "
                    "without them", client, path, type(e).__name__, e)
        return []
    log.info("client %d: read %d kept optimizer state(s) from %s", client, len(kept), path)
    return kept


def save_kept(context: Context, path: Path | None, kept: list[dict[str, Any]]) -> None:
    """Keep ``kept`` in ``Context.state`` and, with a ``state-dir``, in ``path``."""
    context.state[STATE_KEY] = states_record(kept)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(kept, f))


def held_basis(msg: Message, context: Context, fed: Federation) -> Basis | None:
    """The basis the round names (None: none yet): the one the message carries, which the
    node then keeps in ``Context.state``, else the one it kept; ``ConfigError`` if it holds
    another or none."""
    rc = msg.content["config"]
    return kept_basis(context.state, str(rc["basis-digest"]) if "basis-digest" in rc else None,
                      msg.content["basis"] if "basis" in msg.content else None,
                      fed.server.sizes)


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
        client = node_client(context.node_config, fed.config.clients)
        rc = msg.content["config"]
        if (basis := held_basis(msg, context, fed)) != fed.dirs.basis:
            fed.dirs = replace(fed.dirs, basis=basis)
        (dirs or fed.dirs).check(str(rc["scheme-version"]), str(rc["fingerprint"]))
        check_round_spec(fed.spec_at(int(rc["round"])), rc)
        load_weights(fed.server.model, msg.content["arrays"])
        path = state_file(context.node_config, fed.config, client)
        kept = load_kept(context, path, client) if fed.config.client_optimizer == "keep" else []
        wanted = rc.get("optim-digests")
        start = pick_start(kept, None if wanted is None else int(wanted[client]), client)
        upload, state = client_round(fed, client, int(rc["round"]), float(rc["lr"]),
                                     int(rc["seed"]), start)
        if state is not None:
            save_kept(context, path, [*kept, state][-KEPT:])
        if tamper is not None:
            upload = tamper(client, upload)
        return Message(upload_to_content(upload), reply_to=msg)

    return app


app = make_client_app()
