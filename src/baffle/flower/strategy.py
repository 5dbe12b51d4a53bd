"""A Flower strategy (message API) that runs baffle's server side.

It owns the ``Federation`` (global model, stock torch optimizer, EMA, schedule) and,
each round, sends the weights with a ConfigRecord (seed, lr, K, sigma, scheme, scheme
version and fingerprint; with kept client optimizers in epoch mode, the digest of the
state it will replay each client from), turns the replies into ``Upload`` objects and
hands them to ``simulator.finish_round``: the very function the in-process simulator uses.

With ``--guide-dims`` it first takes the server's own gradient (``simulator.guide_round``)
and sends the basis U to every node not known to hold the latest one: a node holds it once
it has answered a round that named it; a node that failed, and every node after a server
restart (a new Flower run, so new ``Context.state``), is sent it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from baffle.aggregate import Upload
from baffle.directions import derive_seed
from baffle.flower.wire import (
    BasisHolders,
    basis_record,
    content_to_upload,
    error_line,
    round_config,
    weights_record,
)
from baffle.simulator import (
    Federation,
    RunLog,
    begin_round,
    finish_round,
    guide_round,
    replay_base,
    round_seed,
)

log = logging.getLogger("baffle.flower")


class BaffleStrategy(Strategy):
    """BAFFLE (or a backprop baseline) as a Flower strategy.

    ``first_round`` is the round index Flower's round 1 maps to (non-zero on resume).
    ``min_available`` nodes must be connected before a round starts.
    """

    def __init__(self, fed: Federation, run_log: RunLog, first_round: int = 0,
                 metrics: list[dict[str, Any]] | None = None, min_available: int = 1,
                 wait_s: float = 600.0) -> None:
        self.fed, self.run_log, self.first_round = fed, run_log, first_round
        self.metrics = metrics if metrics is not None else []
        self.min_available, self.wait_s = min_available, wait_s
        self._pending: dict[str, Any] = {}
        self._client_of: dict[int, int] = {}  # node id -> client index, learned from replies
        self._holders = BasisHolders()  # --guide-dims: who holds the latest basis

    def summary(self) -> None:
        c = self.fed.config
        log.info("BaffleStrategy: method=%s mode=%s K=%d (K schedule %s -> %s) sigma=%g "
                 "scheme=%s seed-sharing=%s", c.method, c.round_mode, c.K, c.K_milestones,
                 c.K_values, c.sigma, c.scheme, c.seed_sharing)

    def _sample(self, grid: Grid, r: int) -> list[int]:
        """All connected nodes, or a seeded sample. The first round waits (up to
        ``wait_s``) for ``min_available`` nodes; later ones go on with whoever is left."""
        cfg = self.fed.config
        deadline = time.monotonic() + (self.wait_s if r == self.first_round else 0)
        while (len(nodes := sorted(grid.get_node_ids())) < self.min_available
               and time.monotonic() < deadline) or not nodes:
            log.info("waiting for nodes: %d connected, %d wanted", len(nodes), self.min_available)
            time.sleep(1)
        m = cfg.clients_per_round or max(1, round(cfg.participation * len(nodes)))
        if m >= len(nodes):
            return nodes
        rng = np.random.default_rng(derive_seed(cfg.seed, "sample", r))
        return sorted(int(n) for n in rng.choice(nodes, size=m, replace=False))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        fed = self.fed
        r = self.first_round + server_round - 1
        started = time.perf_counter()
        lr = begin_round(fed, r)
        guide_round(fed, r)
        nodes = self._sample(grid, r)
        cfg = fed.config
        digests = ([replay_base(fed, c) for c in range(cfg.clients)]
                   if cfg.is_baffle and cfg.round_mode == "epoch"
                   and cfg.client_optimizer == "keep" else None)
        records = {"arrays": weights_record(fed.server.model),
                   "config": round_config(r, round_seed(cfg, r), lr, fed.spec_at(r), fed.dirs,
                                          digests)}
        basis = fed.dirs.basis
        sent_basis = self._holders.lacking(nodes, basis)
        plain = RecordDict(records)
        with_basis = (RecordDict({**records, "basis": basis_record(basis)})
                      if basis is not None and sent_basis else plain)
        messages = [Message(content=with_basis if n in sent_basis else plain, dst_node_id=n,
                            message_type=MessageType.TRAIN) for n in nodes]
        self._pending = {"round": r, "lr": lr, "nodes": nodes, "started": started,
                         "sent-basis": sent_basis}
        self._pending["sent"] = messages  # Flower stamps their message ids when it pushes them
        return messages

    def _name(self, node: int) -> str:
        return f"client {self._client_of[node]}" if node in self._client_of else f"node {node}"

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        p = self._pending
        uploads: list[Upload] = []
        failures: list[dict[str, Any]] = []
        answered = set()
        answered_by: list[tuple[int, int]] = []  # (node, client) of each parsed upload
        # A reply for a dead node comes from the SuperLink itself: map replies to the
        # node they answer through the message ids, not through their sender.
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in p.get("sent", [])}
        for msg in replies:
            node = dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            if msg.has_error():
                failures.append({"client": self._name(node),
                                 "reason": f"client failed: {error_line(msg.error.reason)}"})
                continue
            try:
                u = content_to_upload(msg.content)
            except (KeyError, ValueError, TypeError) as e:
                failures.append({"client": self._name(node),
                                 "reason": f"malformed upload: {type(e).__name__}: {e}"})
                continue
            self._client_of[node] = u.client
            uploads.append(u)
            answered_by.append((node, u.client))
        for node in sorted(set(p["nodes"]) - answered):
            failures.append({"client": self._name(node), "reason": "no reply before the timeout"})
        self._note_basis(p["nodes"], p["sent-basis"], answered_by)
        record = finish_round(self.fed, p["round"], p["lr"], p["nodes"], uploads, failures,
                              p["started"])
        self.metrics.append(record)
        self.run_log.round_done(self.fed, record)
        log.info("round %d: %d accepted, %d rejected%s", record["round"], record["accepted"],
                 record["rejected"],
                 f", test top-1 {record['test_top1']:.2f}%" if "test_top1" in record else "")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        return weights_record(self.fed.server.model), MetricRecord(scalars)

    def _note_basis(self, nodes: list[int], sent: set[int],
                    answered_by: list[tuple[int, int]]) -> None:
        """--guide-dims: the nodes that answered hold the round's basis; the others may
        not (sent again next time). The traffic count (``GuideState.held``, by client)
        charges the basis to exactly the clients whose message carried it."""
        guide, basis = self.fed.server.guide, self.fed.dirs.basis
        if guide is None or basis is None:
            return
        self._holders.settle(nodes, [node for node, _ in answered_by], basis)
        for node, client in answered_by:
            if node in sent:
                guide.held.pop(client, None)
            else:
                guide.held[client] = basis.digest

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is central, on the server's test/validation sets

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None
