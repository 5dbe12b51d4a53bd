"""Secure aggregation (SecAgg+) of the loss differences, through Flower's legacy workflow.

The server learns only the example-weighted mean of the clients' K-vectors, which is
all a shared-seed FedSGD round needs: g = scale * sum_k dbar_k eps_k is linear in dbar.

Quantization. Each client uploads u = d / sigma (the directional derivatives, O(|grad|)
whatever sigma is); Flower's SecAgg+ mod scales u by n_c / max_weight, clips it to
[-c, c] and stochastically rounds it to one of 2^22 levels. With max_weight = the batch
size and c = ``CLIP_MARGIN`` x the largest |u| measured on the server's validation data at
the start, the rounding error of the mean is about c / 2^22 per entry (~1e-6 of c): far
below the estimator's own noise. The server multiplies the mean back by sigma. The
quantizer would clip a larger |u| silently, so a client whose scaled |u| exceeds c fails
its fit in one line instead (naming the ``secagg-clip`` run-config value that fixes it).
A round that SecAgg+ halts (fewer nodes left than its threshold) is logged as a failed
round with the model unchanged, like a plaintext round without enough uploads.
The round's metrics also count every SecAgg+ message's serialized content by node
(``protocol_bytes_up_per_client`` / ``_down_``, means over the nodes that answered): the
protocol's keys, shares and masked integers beside the K values it sums.
Only ``--method baffle --mode fedsgd --seed-sharing round`` can be aggregated this way.

With ``--guide-dims`` the server also sends its latest basis U to each node not known to
hold it, as one more array after the weights; the node keeps it in ``Context.state`` and
draws every direction in it. A node that lost it (restarted) fails its fit with a one-line
error, which SecAgg+ treats as a dropout; the server sends it the basis again next round.
Guided directions U z_k give |u_k| = |z_k . U^T g| <= |z_k| |g|, no more than unguided ones
in distribution, so the clipping range calibrated at the start still holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import (
    Context,
    FitIns,
    FitRes,
    Message,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.serde import recorddict_to_proto
from flwr.server import ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from baffle.aggregate import Upload
from baffle.errors import ConfigError
from baffle.estimator import loss_differences
from baffle.flower.wire import (
    BasisHolders,
    check_round_spec,
    config_from_run_config,
    error_line,
    kept_basis,
    round_config,
)
from baffle.simulator import (
    Federation,
    RunLog,
    begin_round,
    finish_round,
    guide_round,
    round_seed,
    run_client,
    setup,
)

log = logging.getLogger("baffle.flower")
CLIP_MARGIN = 4.0
# the server's run-config extras, 0 meaning the default (``protocol_settings``); a client
# ignores them (one run config serves both apps)
SECAGG_DEFAULTS: dict[str, int | float] = {"secagg-shares": 0, "secagg-threshold": 0,
                                           "secagg-clip": 0.0}
SECAGG_KEYS = tuple(SECAGG_DEFAULTS)


def check_secagg_config(fed: Federation) -> None:
    c = fed.config
    if not (c.is_baffle and c.round_mode == "fedsgd" and c.seed_sharing == "round"):
        raise ConfigError("secure aggregation needs --method baffle --mode fedsgd "
                          "--seed-sharing round (the server may only learn the mean K-vector)")


def protocol_settings(extras: dict[str, Any], clients: int) -> tuple[int, int, float]:
    """(shares, threshold, clip) from the ``SECAGG_KEYS`` run-config values, absent or 0
    meaning the default: all clients, 2/3 of the shares (at least 2), and clip 0 (to be
    calibrated); ``ConfigError`` for a value SecAgg+ cannot use."""
    shares, threshold, clip = ({**SECAGG_DEFAULTS, **extras}[k] for k in SECAGG_KEYS)
    try:
        shares, threshold, clip = int(shares), int(threshold), float(clip)
    except (TypeError, ValueError):
        raise ConfigError(f"secagg-shares and secagg-threshold must be integers and "
                          f"secagg-clip a number, got {shares!r}, {threshold!r}, {clip!r}"
                          ) from None
    if not clip >= 0:
        raise ConfigError(f"secagg-clip must be >= 0 (0: calibrate it), got {clip}")
    shares = shares or clients
    threshold = threshold or max(2, (2 * shares + 2) // 3)
    check_protocol(clients, shares, threshold)
    return shares, threshold, clip


def check_protocol(clients: int, shares: int, threshold: int) -> None:
    """``ConfigError`` unless SecAgg+ can run: at least 3 clients (of 2, each could take its
    own vector from the sum and read the other's), 3 <= shares <= clients (Flower's lower
    bound) and 2 <= threshold <= shares."""
    if clients < 3:
        raise ConfigError(f"secure aggregation needs at least 3 clients (got {clients}): with "
                          "2, each could subtract its own vector from the sum")
    if not 3 <= shares <= clients:
        raise ConfigError(f"secagg-shares must be 3..{clients} (the clients), got {shares}")
    if not 2 <= threshold <= shares:
        raise ConfigError(f"secagg-threshold must be 2..{shares} (the shares), got {threshold}")


@torch.no_grad()
def calibrate_clip(fed: Federation, batches: int = 4) -> float:
    """c = CLIP_MARGIN x max |d / sigma| on a few server-side validation (or test) batches."""
    data = fed.val if fed.val is not None else fed.data.test
    B, peak = fed.config.batch_size, 0.0
    for b in range(batches):
        x, y = data.x[b * B:(b + 1) * B], data.y[b * B:(b + 1) * B]
        if len(y) == 0:
            break
        est = loss_differences(fed.server.model, fed.loss_fn, x, y, 1000 + b, fed.spec, fed.dirs)
        peak = max(peak, float(est.diffs.abs().max()) / fed.config.sigma)
    return CLIP_MARGIN * max(peak, 1e-3)


def _weights(fed: Federation) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in fed.server.model.state_dict().values()]


def _load(fed: Federation, arrays: list[np.ndarray]) -> None:
    keys = list(fed.server.model.state_dict())
    fed.server.model.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in
                                      zip(keys, arrays, strict=True)})


def _error(failure: Any) -> str:
    """One line for a SecAgg+ failure: an ``Exception`` wrapping a node's ``Error``."""
    return error_line(getattr(failure.args[0], "reason", failure) if failure.args else failure)


def content_bytes(message: Message) -> int:
    """The serialized size of a message's content (its RecordDict as protobuf): the
    payload Flower carries, without the message's metadata and the transport's framing."""
    return 0 if message.has_error() else recorddict_to_proto(message.content).ByteSize()


class _CountingGrid:
    """A grid that adds each message's ``content_bytes`` to ``up`` / ``down`` by node."""

    def __init__(self, grid: Grid, up: dict[int, int], down: dict[int, int]) -> None:
        self._grid, self.up, self.down = grid, up, down

    def send_and_receive(self, messages: Iterable[Message], *args: Any, **kwargs: Any
                         ) -> Iterable[Message]:
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + content_bytes(m)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for m in replies:
            node = m.metadata.src_node_id
            self.up[node] = self.up.get(node, 0) + content_bytes(m)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, telling the strategy why a round halts (every stage ends
    in ``_check_threshold``; without this hook the round is still logged, with no reason),
    and counting the bytes of its four exchanges by node (``SecAggBaffleStrategy.sent``,
    ``.received``)."""

    def __init__(self, strategy: SecAggBaffleStrategy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strategy = strategy

    def __call__(self, grid: Grid, context: Any) -> None:
        s = self.strategy
        s.received, s.sent = {}, {}
        super().__call__(_CountingGrid(grid, s.received, s.sent), context)

    def _check_threshold(self, state: Any) -> bool:
        ok = super()._check_threshold(state)
        if not ok:
            self.strategy.halted(state.failures)
        return ok


class SecAggBaffleStrategy(Strategy):
    """Legacy Flower strategy: FedSGD BAFFLE whose aggregate arrives already summed."""

    def __init__(self, fed: Federation, run_log: RunLog, first_round: int,
                 metrics: list[dict[str, Any]], clip: float) -> None:
        check_secagg_config(fed)
        self.fed, self.run_log, self.first_round, self.metrics = fed, run_log, first_round, metrics
        self.clip = clip
        self.holders = BasisHolders()  # --guide-dims: who holds the latest basis
        self._pending: dict[str, Any] = {}  # the round between configure and aggregate
        self._halt_errors: list[Any] = []
        # the round's SecAgg+ messages, content bytes by node (filled by ``_Workflow``)
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(_weights(self.fed))

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.settle_halted()
        fed = self.fed
        r = self.first_round + server_round - 1
        started = time.perf_counter()
        lr = begin_round(fed, r)
        guide_round(fed, r)
        n = client_manager.num_available()
        clients = client_manager.sample(num_clients=n, min_num_clients=max(1, fed.config.min_clients))
        seed = round_seed(fed.config, r)
        nodes = [int(c.node_id) for c in clients]
        basis = fed.dirs.basis
        lacking = self.holders.lacking(nodes, basis)
        self._pending = {"round": r, "lr": lr, "seed": seed, "started": started,
                         "sampled": nodes, "sent-basis": lacking}
        config: dict[str, Scalar] = {**round_config(r, seed, lr, fed.spec_at(r), fed.dirs),
                                     "secagg-clip": self.clip,
                                     "secagg-max-weight": fed.config.batch_size}
        weights = _weights(fed)
        plain = FitIns(ndarrays_to_parameters(weights), config)
        with_basis = (FitIns(ndarrays_to_parameters([*weights, torch.cat(basis.blocks).numpy()]),
                             config) if basis is not None and lacking else plain)
        return [(c, with_basis if int(c.node_id) in lacking else plain) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        p, fed = self._pending, self.fed
        uploads = []
        if results:
            (mean_u,) = parameters_to_ndarrays(results[0][1].parameters)
            dbar = torch.from_numpy(np.asarray(mean_u, dtype=np.float64) * fed.config.sigma).float()
            total = sum(res.num_examples for _, res in results)
            uploads = [Upload(-1, int(total), (p["seed"],), dbar,
                              forward_passes=fed.spec_at(p["round"]).forward_passes)]
        answered = [int(proxy.node_id) for proxy, _ in results]
        basis, guide = fed.dirs.basis, fed.server.guide
        self.holders.settle(p["sampled"], answered, basis)
        if guide is not None and basis is not None:
            guide.held[-1] = basis.digest  # the aggregate's "client": basis counted below
        # Flower's workflow lists some errors twice and none by node: one entry per node
        # that did not answer, each naming the round's distinct errors
        errors = "; ".join(dict.fromkeys(_error(f) for f in failures))
        fails = [{"client": f"node {n}", "reason": f"dropped out: {errors or 'no reply'}"[:300]}
                 for n in sorted(set(p["sampled"]) - set(answered))]
        record = finish_round(fed, p["round"], p["lr"], p["sampled"], uploads, fails,
                              p["started"])
        if basis is not None and answered:  # the mean over the senders, as for plain rounds
            got = len(p["sent-basis"] & set(answered))
            record["bytes_down_per_client"] += 4 * fed.n_params * basis.dims * got / len(answered)
        if answered:  # everything the protocol carried, per node that answered
            record["protocol_bytes_up_per_client"] = float(
                np.mean([self.received.get(n, 0) for n in answered]))
            record["protocol_bytes_down_per_client"] = float(
                np.mean([self.sent.get(n, 0) for n in answered]))
        self._log(record, len(results), uploads[0].diffs.tolist() if uploads else None)
        return ndarrays_to_parameters(_weights(fed)), {}

    def _log(self, record: dict[str, Any], summed: int, aggregate: list[float] | None) -> None:
        """Log a finished (or halted) round and clear it."""
        record.update({"secagg_clients": summed, "secagg_clip": self.clip,
                       "aggregate": aggregate})
        self.metrics.append(record)
        self.run_log.round_done(self.fed, record)
        self._pending, self._halt_errors = {}, []

    def halted(self, failures: list[Any]) -> None:
        """Called by the workflow when a stage leaves too few nodes: its errors so far."""
        self._halt_errors = list(failures)

    def settle_halted(self) -> None:
        """Log the pending round, if SecAgg+ halted it before ``aggregate_fit``: every
        sampled node a failure, the model unchanged (``finish_round`` with no upload)."""
        p, fed = self._pending, self.fed
        if not p:
            return
        errors = "; ".join(dict.fromkeys(_error(f) for f in self._halt_errors)) or "no errors"
        why = f"SecAgg+ halted: fewer nodes than its threshold answered ({errors})"[:300]
        fails = [{"client": f"node {n}", "reason": why} for n in p["sampled"]]
        record = finish_round(fed, p["round"], p["lr"], p["sampled"], [], fails, p["started"])
        self._log(record, 0, None)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def make_secagg_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """ServerApp running SecAgg+ rounds. Run-config extras (absent or 0: the default):
    ``secagg-shares`` (all clients), ``secagg-threshold`` (2/3 of the shares, at least 2),
    ``secagg-clip`` (calibrated, ``calibrate_clip``); and ``round-timeout``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        raw = {**dict(context.run_config), **(overrides or {})}
        extras = {k: raw.pop(k) for k in SECAGG_KEYS if k in raw}
        cfg, flower = config_from_run_config(raw)
        shares, threshold, clip = protocol_settings(extras, cfg.clients)
        run_log = RunLog(flower["run-dir"] or None)
        fed = setup(cfg)
        check_secagg_config(fed)
        start, metrics = run_log.open(fed, bool(flower["resume"]))
        clip = clip or calibrate_clip(fed)
        strategy = SecAggBaffleStrategy(fed, run_log, start, metrics, clip)
        log.info("SecAgg+: %d shares, threshold %d, clipping range %.4g, max_weight %d",
                 shares, threshold, clip, cfg.batch_size)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=fed.total_rounds - start),
                               strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=_Workflow(
            strategy, num_shares=shares, reconstruction_threshold=threshold,
            clipping_range=clip, max_weight=float(cfg.batch_size),
            timeout=float(flower["round-timeout"])))
        workflow(grid, legacy)
        strategy.settle_halted()  # the last round, if it halted
        result = run_log.close(fed, strategy.metrics)
        print(f"baffle-summary: {result.summary}", flush=True)

    return app


class _BaffleNumPyClient(NumPyClient):
    def __init__(self, fed: Federation, client: int, context: Context,
                 tamper: Any = None) -> None:
        self.fed, self.client, self.node, self.tamper = fed, client, context, tamper

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]
            ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        fed = self.fed
        n = len(fed.server.model.state_dict())
        sent = ArrayRecord({"U": Array(parameters[n])}) if len(parameters) > n else None
        digest = str(config["basis-digest"]) if "basis-digest" in config else None
        if (basis := kept_basis(self.node.state, digest, sent, fed.server.sizes)) \
                != fed.dirs.basis:
            fed.dirs = replace(fed.dirs, basis=basis)
        fed.dirs.check(str(config["scheme-version"]), str(config["fingerprint"]))
        check_round_spec(fed.spec_at(int(config["round"])), config)
        _load(fed, parameters[:n])
        u = run_client(fed, self.client, int(config["round"]), float(config["lr"]),
                       int(config["seed"]))
        if self.tamper is not None:
            u = self.tamper(self.client, u)
        assert u.diffs is not None
        scaled = u.diffs.double() / fed.config.sigma
        check_clip(scaled, u.num_examples, config)
        return [scaled.numpy()], u.num_examples, {}


def check_clip(u: torch.Tensor, n: int, config: dict[str, Scalar]) -> None:
    """``ConfigError`` if SecAgg+ would clip ``u``: the mod scales it by n / max_weight
    and clips to [-c, c], which would bias the sum without a word."""
    c = float(config["secagg-clip"])
    top = float(u.abs().max()) * n / float(config["secagg-max-weight"])
    if top > c:
        raise ConfigError(f"this client's |d / sigma| reaches {top:.4g}, beyond the SecAgg+ "
                          f"clipping range {c:.4g}: restart the server with run-config "
                          f"secagg-clip >= {2 * top:.3g}")


def make_secagg_client_app(overrides: dict[str, Any] | None = None,
                           tamper: Any = None, mods: Sequence[Any] = ()) -> ClientApp:
    """ClientApp with Flower's ``secaggplus_mod`` (then ``mods``): it uploads d/sigma,
    masked. ``tamper`` and ``mods`` exist to test faulty clients."""
    from flwr.client.mod import secaggplus_mod

    cache: dict[str, Federation] = {}

    def client_fn(context: Context) -> Any:
        raw = {**dict(context.run_config), **(overrides or {})}
        cfg, _ = config_from_run_config({k: v for k, v in raw.items() if k not in SECAGG_KEYS})
        key = repr(cfg)
        if key not in cache:
            cache[key] = setup(cfg, node=True)
        return _BaffleNumPyClient(cache[key], int(context.node_config["partition-id"]),
                                  context, tamper).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod, *mods])


server_app = make_secagg_server_app()
client_app = make_secagg_client_app()
