"""The in-process federated simulator: one readable training loop.

    for each round r:
        [--guide-dims: server gradient on its own images -> new basis every few rounds]
        sample clients -> send (W, seed) -> clients upload K scalars (or the baselines'
        tensors) -> validate -> aggregate -> rebuild -> optimizer step -> EMA -> evaluate

Every random choice is a pure function of (config.seed, round, client), so a run
resumed from any checkpoint finishes with bit-identical weights.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baffle import branch
from baffle.aggregate import (
    Upload,
    aggregate_gradient,
    tensors_problem,
    upload_problem,
    weighted_tensors,
    weights_of,
)
from baffle.baselines import bp_gradient_update, bp_local_epoch_update
from baffle.client import (
    Batch,
    fedsgd_update,
    local_epoch_update,
    local_optimizer,
    optimizer_digest,
    replay_local_epoch,
)
from baffle.config import TrainConfig
from baffle.data import ArrayDataset, DataBundle, load_dataset, partition
from baffle.directions import DirectionCache, DirectionScheme, derive_seed, layer_blocks
from baffle.ema import EMA
from baffle.errors import BaffleError, ConfigError
from baffle.estimator import EstimatorSpec, LossFn, check_no_batchnorm, trainable_params
from baffle.guide import GuideState, flat_gradient, public_batch
from baffle.models import build_model
from baffle.rundir import CONFIG, RunDir
from baffle.schedule import k_at, lr_at
from baffle.server import Server, make_optimizer, optimizer_factory, set_lr

UploadHook = Callable[[int, Upload], Upload]
log = logging.getLogger("baffle")


class Callback(Protocol):
    def on_round(self, record: dict[str, Any], total_rounds: int) -> None: ...


@dataclass
class Federation:
    """Everything a run needs, built once from the config."""

    config: TrainConfig
    data: DataBundle
    clients: list[np.ndarray]  # per-client indices into data.train
    val: ArrayDataset | None
    server: Server
    loss_fn: LossFn
    spec: EstimatorSpec  # K from --K; spec_at(r) applies the K schedule
    dirs: DirectionScheme
    rounds_per_epoch: int
    total_rounds: int
    cache: DirectionCache | None = None  # this FedSGD round's drawn directions
    public: ArrayDataset | None = None  # --guide-dims: the server's labelled images

    def spec_at(self, round_: int) -> EstimatorSpec:
        """The estimator of round ``round_``: ``spec`` with K from the K schedule."""
        c = self.config
        K = k_at(round_ // self.rounds_per_epoch, c.K, c.K_milestones, c.K_values)
        return self.spec if K == self.spec.K else replace(self.spec, K=K)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in trainable_params(self.server.model).values())


@dataclass
class RunResult:
    """What ``train`` returns: the config, every round's record and the final state."""

    config: TrainConfig
    metrics: list[dict[str, Any]]
    model: nn.Module
    summary: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


def setup(
    config: TrainConfig,
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    data: DataBundle | None = None,
    node: bool = False,
) -> Federation:
    """Load data, split it, build the model and the server state from the config.

    ``node``: for a Flower node, which only computes uploads: no EMA shadow (a model-sized
    copy an edge device would carry for nothing) and none of the server's guide state or
    labelled images."""
    data = data or load_dataset(config.dataset, config.data_dir or None, config.download)
    val_per_class = data.val_per_class if config.val_per_class < 0 else config.val_per_class
    split = partition(config.split, data.train.y.numpy(), config.clients, config.seed,
                      val_per_class=val_per_class, alpha=config.alpha,
                      shards_per_client=config.shards_per_client)
    if model is None:
        model = initial_model(config, data)
    if config.is_baffle:
        check_no_batchnorm(model)
    model = model.to(config.device)
    optimizer = optimizer_factory(config.optimizer, trainable_params(model).values(),
                                  config.lr, config.betas, config.momentum, config.weight_decay)
    ema = EMA.of(model, config.ema_decay) if config.ema and not node else None
    sizes = [len(c) for c in split.clients]
    if config.round_mode == "fedsgd":  # an epoch ends when the smallest client runs out
        rounds_per_epoch = max(1, min(sizes) // config.batch_size)
    else:
        rounds_per_epoch = 1
    total = config.rounds or config.epochs * rounds_per_epoch
    val = data.train.subset(split.val) if len(split.val) else None
    dirs = direction_scheme(config, model)
    public = None
    if config.guide_dims and not node:
        if len(split.val) < config.guide_images:
            raise ConfigError(f"--guide-images {config.guide_images} asks for more held-out "
                              f"images than the validation split has ({len(split.val)}): "
                              "lower it or raise --val-per-class")
        public = data.train.subset(split.val[:config.guide_images])
    guide = GuideState() if config.guide_dims and not node else None
    server = Server(model, optimizer, ema, guide=guide)
    return Federation(config, data, split.clients, val, server, loss_fn or F.cross_entropy,
                      EstimatorSpec(config.K, config.sigma, config.scheme, config.guide_solve),
                      dirs, rounds_per_epoch, total, public=public)


def initial_model(config: TrainConfig, data: DataBundle) -> nn.Module:
    """The model a run of ``config`` starts from: its architecture, initialised from
    ``config.seed`` (pass it to ``train(model=...)`` to hold a reference while it trains)."""
    return build_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                       norm=config.norm, activation=config.activation,
                       generator=torch.Generator().manual_seed(config.seed))


def direction_scheme(config: TrainConfig, model: nn.Module) -> DirectionScheme:
    """The run's direction scheme: generation device, and one block per layer under
    ``--perturb layer``, taken in ``--layer-cycle`` order. A K (or K-schedule value) that
    leaves a layer without a direction is refused."""
    names = list(trainable_params(model))
    blocks = layer_blocks(names) if config.perturb == "layer" else ()
    cycle, L = config.layer_cycle, max(blocks, default=0) + 1
    if cycle and sorted(set(cycle)) != list(range(L)):
        raise ConfigError(f"--layer-cycle must name each of the model's {L} layers "
                          f"0..{L - 1} at least once, and no other (got "
                          f"{','.join(map(str, cycle))})")
    dirs = DirectionScheme(device=_dir_device(config.device), blocks=blocks,
                           sampler=config.sampler, cycle=cycle)
    if config.is_baffle:
        for K in (config.K, *config.K_values):
            dirs.weights(K)
    return dirs


def _dir_device(device: str) -> str:
    return "cpu" if torch.device(device).type == "cpu" else device


def guide_round(fed: Federation, r: int) -> None:
    """--guide-dims: the server's gradient at round ``r``'s weights on its batch of
    held-out images joins the history (a new basis on refresh rounds), and the round's
    directions lie in the latest basis (``baffle.guide``)."""
    cfg, guide = fed.config, fed.server.guide
    if guide is None or fed.public is None:
        return
    idx = torch.as_tensor(public_batch(cfg.seed, r, len(fed.public),
                                       cfg.clients * cfg.batch_size))
    x, y = fed.public.x[idx].to(cfg.device), fed.public.y[idx].to(cfg.device)
    gradient = flat_gradient(fed.server.model, fed.loss_fn, x, y)
    new = guide.observe(gradient, r, cfg.guide_dims, cfg.guide_history, cfg.guide_refresh)
    if new:
        log.info("round %d: new basis of %d directions from %d server gradients", r,
                 cfg.guide_dims, len(guide.history))
    if new or (guide.basis is not None and fed.dirs.basis is None):  # or just resumed
        fed.dirs = replace(fed.dirs, basis=guide.basis_for(fed.server.sizes))


def sample_clients(config: TrainConfig, round_: int) -> list[int]:
    """The clients taking part in a round (all, a fraction, or a fixed count)."""
    m = config.clients_per_round or max(1, round(config.participation * config.clients))
    if m >= config.clients:
        return list(range(config.clients))
    rng = np.random.default_rng(derive_seed(config.seed, "sample", round_))
    return sorted(int(c) for c in rng.choice(config.clients, size=m, replace=False))


def client_batches(fed: Federation, client: int, round_: int, steps: int) -> list[Batch]:
    """``steps`` consecutive mini-batches of a client's seeded per-epoch shuffle."""
    cfg, idx = fed.config, fed.clients[client]
    B = min(cfg.batch_size, len(idx))
    per_epoch = max(1, len(idx) // B)
    first = (round_ % fed.rounds_per_epoch) * steps if cfg.round_mode == "fedsgd" else 0
    epoch = round_ // fed.rounds_per_epoch
    batches = []
    for step in range(first, first + steps):
        e, i = epoch + step // per_epoch, step % per_epoch
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, "shuffle", client, e)))
        take = torch.as_tensor(idx)[perm[i * B:(i + 1) * B]]
        x, y = fed.data.train.x[take], fed.data.train.y[take]
        if fed.data.augment is not None:
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", client, round_, step))
            x = fed.data.augment(x, g)
        batches.append((x.to(cfg.device), y.to(cfg.device)))
    return batches


def round_seed(config: TrainConfig, round_: int) -> int:
    """The seed the server sends out with round ``round_``."""
    return derive_seed(config.seed, "round", round_)


def client_seeds(seed: int, seed_sharing: str, client: int, steps: int) -> tuple[int, ...]:
    """Direction seeds of one client's steps, derived from the round's seed: the same for
    every client (``round`` sharing) or the client's own (``client`` sharing)."""
    base = derive_seed(seed, "client", client) if seed_sharing == "client" else seed
    return tuple(derive_seed(base, "step", s) for s in range(steps)) if steps > 1 else (base,)


def local_steps(fed: Federation, client: int) -> int:
    cfg = fed.config
    return cfg.local_steps or max(1, len(fed.clients[client]) // min(cfg.batch_size,
                                                                        len(fed.clients[client])))


def run_client(fed: Federation, client: int, round_: int, lr: float, seed: int) -> Upload:
    """What one client computes in a round from the server's (weights, seed, lr), in process.

    ``fed.server.model`` holds the weights the server sent; it is not modified. With
    ``--client-optimizer keep`` BAFFLE's client starts from the server's replayed copy of
    its local optimizer state, bit-identical to its own by construction
    (tests/test_reconstruct.py); bp-fedavg's client state is stored with the server's, so
    checkpoints hold it. A Flower client keeps its own instead (``flower.client_app``).
    """
    upload, state = client_round(fed, client, round_, lr, seed,
                                 fed.server.client_optim.get(client))
    if state is not None and fed.config.method == "bp-fedavg":
        fed.server.client_optim[client] = state
    return upload


def client_round(fed: Federation, client: int, round_: int, lr: float, seed: int,
                 optim_state: dict[str, Any] | None = None
                 ) -> tuple[Upload, dict[str, Any] | None]:
    """One client's round: its upload and, with ``--client-optimizer keep``, the state its
    local optimizer ends in (else ``None``). A local epoch starts its optimizer from
    ``optim_state`` when kept (``None``: fresh); the upload names that start by digest."""
    cfg, model, spec = fed.config, fed.server.model, fed.spec_at(round_)
    make_opt = functools.partial(make_optimizer, cfg.optimizer, lr=lr, betas=cfg.betas,
                                 momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.round_mode == "fedsgd":
        (batch,) = client_batches(fed, client, round_, 1)
        if cfg.method == "bp-fedsgd":
            return bp_gradient_update(client, model, fed.loss_fn, batch), None
        (seed,) = client_seeds(seed, cfg.seed_sharing, client, 1)
        return fedsgd_update(client, model, fed.loss_fn, batch, seed, spec, fed.dirs,
                             cfg.engine, cfg.chunk, cfg.max_memory,  # type: ignore[arg-type]
                             fed.cache), None
    keep = cfg.client_optimizer == "keep"
    start = optim_state if keep else None
    steps = local_steps(fed, client)
    batches = client_batches(fed, client, round_, steps)
    local = copy.deepcopy(model)
    optimizer = local_optimizer(make_opt, local, start)
    if cfg.method == "bp-fedavg":
        upload = bp_local_epoch_update(client, local, fed.loss_fn, batches, optimizer)
    else:
        upload = local_epoch_update(
            client, local, fed.loss_fn, batches,
            client_seeds(seed, cfg.seed_sharing, client, steps), spec, fed.dirs, optimizer,
            cfg.clip_value, cfg.engine, cfg.chunk, cfg.max_memory)  # type: ignore[arg-type]
    if not keep:
        return upload, None
    return replace(upload, optim_base=optimizer_digest(start)), optimizer.state_dict()


def problem(fed: Federation, u: Upload, round_: int) -> str | None:
    """Why an upload to round ``round_`` must be rejected, or ``None``."""
    cfg = fed.config
    if not cfg.is_baffle:
        return tensors_problem(u, fed.server.shapes)
    steps = None if cfg.round_mode == "fedsgd" else local_steps(fed, u.client)
    if steps is not None and u.optim_base and u.optim_base != replay_base(fed, u.client):
        return (f"its local optimizer started from state {u.optim_base:016x}, which the "
                "server cannot replay (client state out of step): next round the server "
                "names the state it holds, and the client starts from that or fresh")
    return upload_problem(u, fed.spec_at(round_).K, steps)


def replay_base(fed: Federation, client: int) -> int:
    """Digest of the local optimizer state the server holds for ``client`` (0: none):
    what a kept client must start its next local epoch from for the server to replay it."""
    return optimizer_digest(fed.server.client_optim.get(client))


def update_server(fed: Federation, uploads: Sequence[Upload], lr: float, round_: int) -> None:
    """Aggregate round ``round_``'s valid uploads and move the global model (unchanged if none)."""
    cfg, server, spec = fed.config, fed.server, fed.spec_at(round_)
    if not uploads:
        return
    if cfg.method == "bp-fedsgd":
        server.apply_gradient(weighted_tensors([u.tensors for u in uploads], weights_of(uploads)),
                              None)
    elif cfg.method == "bp-fedavg":
        server.load_average([u.tensors for u in uploads], weights_of(uploads))
    elif cfg.round_mode == "fedsgd":
        grads = aggregate_gradient(uploads, server.shapes, spec, fed.dirs,
                                   cfg.seed_sharing == "round", cfg.device, fed.cache)
        server.apply_gradient(grads, cfg.clip_value)
    else:  # epoch-level BAFFLE: replay every client's trajectory from its scalars
        make_opt = functools.partial(make_optimizer, cfg.optimizer, lr=lr, betas=cfg.betas,
                                     momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        replayed = []
        for u in uploads:
            local = copy.deepcopy(server.model)
            # a kept client starts from the server's copy, or fresh (base 0: new, or reset)
            start = server.client_optim.get(u.client) if u.optim_base else None
            optimizer = local_optimizer(make_opt, local, start)
            replayed.append(replay_local_epoch(local, u, spec, fed.dirs, optimizer,
                                               cfg.clip_value))
            if cfg.client_optimizer == "keep":
                server.client_optim[u.client] = optimizer.state_dict()
        server.load_average(replayed, weights_of(uploads))


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, device: str, batch: int = 1000) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) on a data set."""
    was_training = model.training
    model.eval()
    loss = top1 = top5 = 0.0
    for i in range(0, len(data), batch):
        x, y = data.x[i:i + batch].to(device), data.y[i:i + batch].to(device)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        top1 += float((top[:, 0] == y).sum())
        top5 += float((top == y[:, None]).any(dim=1).sum())
    model.train(was_training)
    n = max(1, len(data))
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def traffic(fed: Federation, u: Upload) -> tuple[int, int]:
    """Exact payload bytes (down, up) of one client in one round, float32 values.

    Down: the weights (4 bytes each) plus, for BAFFLE, the 8-byte seed, and with
    --guide-dims the basis U (4 d r bytes) whenever the client lacks the latest one.
    Up: 4 bytes per loss difference plus 8 per seed (BAFFLE), or a model-sized
    gradient/model (backprop); plus 8 bytes for the example count.
    """
    down = 4 * fed.n_params + (8 if fed.config.is_baffle else 0)
    guide, basis = fed.server.guide, fed.dirs.basis
    if guide is not None and basis is not None and guide.held.get(u.client) != basis.digest:
        down += 4 * fed.n_params * basis.dims
    if fed.config.is_baffle:
        up = 4 * (0 if u.diffs is None else u.diffs.numel()) + 8 * len(u.seeds) + 8
    else:
        up = 4 * fed.n_params + 8
    return down, up


def begin_round(fed: Federation, r: int) -> float:
    """Set and return the round's learning rate (schedule by epoch)."""
    cfg = fed.config
    lr = lr_at(r // fed.rounds_per_epoch, cfg.lr, cfg.lr_milestones, cfg.lr_gamma,
               cfg.resolved_warmup_lr)
    set_lr(fed.server.optimizer, lr)
    return lr


def finish_round(fed: Federation, r: int, lr: float, sampled: Sequence[int],
                 uploads: Sequence[Upload], failures: Sequence[dict[str, Any]],
                 started: float) -> dict[str, Any]:
    """Validate the uploads, update the server (if enough are valid), EMA, evaluate.

    ``failures`` are clients that sent nothing usable ({"client", "reason"}). Returns the
    round's record. The in-process simulator and the Flower strategy both call this.
    """
    cfg, server = fed.config, fed.server
    accepted, rejected = [], list(failures)
    # Aggregate in client order, not arrival order: float sums depend on the order.
    for u in sorted(uploads, key=lambda u: u.client):
        why = problem(fed, u, r)
        if why is None:
            accepted.append(u)
        else:
            rejected.append({"client": u.client, "reason": why})
    note = None
    if len(accepted) < cfg.min_clients:
        note = (f"{len(accepted)} valid upload(s), fewer than min_clients={cfg.min_clients}: "
                "model unchanged")
        log.warning("round %d: %s", r, note)
    else:
        update_server(fed, accepted, lr, r)
    for x in rejected:
        log.warning("round %d: rejected client %s: %s", r, x["client"], x["reason"])
    end_of_epoch = (r + 1) % fed.rounds_per_epoch == 0
    if server.ema is not None and (end_of_epoch or cfg.ema_every == "round"):
        server.ema.update(server.model)
    fed.cache = None
    record = round_record(fed, r, lr, sampled, accepted, rejected, time.perf_counter() - started)
    if note:
        record["note"] = note
    if (cfg.eval_every and (r + 1) % cfg.eval_every == 0) or (
            not cfg.eval_every and end_of_epoch) or r + 1 == fed.total_rounds:
        record.update(evaluation(fed))
    return record


class RunLog:
    """Run-directory side of training: create or resume, then log and checkpoint rounds."""

    def __init__(self, run_dir: str | Path | None) -> None:
        self.rd = RunDir(run_dir) if run_dir is not None else None

    def saved_config(self) -> TrainConfig:
        assert self.rd is not None
        return self.rd.config()

    def open(self, fed: Federation, resume: bool) -> tuple[int, list[dict[str, Any]]]:
        """Restore the last checkpoint (resume) or start the directory; (start round, rows)."""
        if self.rd is None:
            return 0, []
        if not resume:
            self.rd.create(fed.config)
            return 0, []
        ckpt = self.rd.load_checkpoint()
        start = int(ckpt["rounds_done"]) if ckpt is not None else 0
        # a Flower server, or `baffle train --resume` with flags, may resume with a config
        # that lengthens or reschedules the saved one
        if (self.rd.path / CONFIG).exists() and (saved := self.rd.config()) != fed.config:
            branch.check(saved, fed.config, start, fed.rounds_per_epoch,
                         what="resuming with another config", also=branch.MOVABLE)
            self.rd.save_config(fed.config)
        if ckpt is not None:
            fed.server.load_state_dict(ckpt["server"])
        # kept epochs past the checkpoint are trained (and kept) again
        self.rd.drop_kept_after(start, fed.rounds_per_epoch)
        return start, self.rd.truncate_metrics(start)

    def branch(self, fed: Federation, source: str | Path,
               epoch: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """Start the directory from ``source``'s last checkpoint, or the one it kept at the
        end of ``epoch`` (``baffle.branch``): its finished rounds' metrics are copied, and
        ``branch.json`` records where they came from. (start round, rows)."""
        assert self.rd is not None
        src = RunDir(source)
        old = src.config()
        ckpt = src.load_checkpoint() if epoch is None else src.load_kept(epoch)
        if ckpt is None:
            raise ConfigError(f"{source} has no checkpoint to branch from")
        done = int(ckpt["rounds_done"])
        branch.check(old, fed.config, done, fed.rounds_per_epoch)
        rows = [r for r in src.metrics() if r["round"] < done]
        if [r["round"] for r in rows] != list(range(done)):
            raise ConfigError(f"{source}/metrics.jsonl lacks some of the {done} rounds its "
                              "checkpoint holds; resume that run first")
        self.rd.create(fed.config)
        self.rd.write_metrics(rows)
        self.rd.save_checkpoint({**ckpt, "config": fed.config.to_dict()})
        self.rd.save_branch({"source": str(Path(source).resolve()), "rounds_done": done,
                             "epoch": epoch,
                             "changed": {k: list(v) for k, v in
                                         branch.changed(old, fed.config).items()}})
        fed.server.load_state_dict(ckpt["server"])
        return done, rows

    def round_done(self, fed: Federation, record: dict[str, Any]) -> None:
        if self.rd is None:
            return
        done, cfg = record["round"] + 1, fed.config
        self.rd.append_metrics(record)
        epoch, into = divmod(done, fed.rounds_per_epoch)
        save = done % cfg.checkpoint_every == 0 or done == fed.total_rounds
        keep = cfg.keep_every > 0 and into == 0 and epoch % cfg.keep_every == 0
        if save or keep:
            state = {"rounds_done": done, "server": fed.server.state_dict(),
                     "config": cfg.to_dict()}
            if save:
                self.rd.save_checkpoint(state)
            if keep:
                self.rd.keep_checkpoint(epoch, state)

    def close(self, fed: Federation, metrics: list[dict[str, Any]]) -> RunResult:
        result = RunResult(fed.config, metrics, fed.server.eval_model(),
                           summarize(fed, metrics), self.rd.path if self.rd else None)
        if self.rd is not None:
            self.rd.write_summary(result.summary, summary_table([result.summary]))
        return result


def train(
    config: TrainConfig | None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    data: DataBundle | None = None,
    upload_hook: UploadHook | None = None,
    branch_from: str | Path | None = None,
    branch_epoch: int | None = None,
) -> RunResult:
    """Run (or resume) federated training; returns the metrics and the final model.

    ``resume`` continues ``run_dir`` from its checkpoint, under its saved config when
    ``config`` is None; a given ``config`` may change only what a branch may (the length,
    schedules not yet reached, cadences) and where it trains (``data_dir``, ``device``).

    ``branch_from`` starts a new ``run_dir`` from that run's last checkpoint, or from the one
    it kept at the end of epoch ``branch_epoch`` (``keep_every``); ``config`` may change
    only schedules not yet reached (``baffle.branch``).

    ``upload_hook(round, upload)`` stands between client and server (fault injection,
    transport); an upload it breaks is rejected and logged, never trained on.
    """
    if branch_from is not None and (resume or run_dir is None):
        raise ConfigError("a branch needs a new run directory and cannot also resume")
    if branch_epoch is not None and branch_from is None:
        raise ConfigError("--branch-epoch names an epoch of the --branch run; add --branch")
    run_log = RunLog(run_dir)
    if resume:
        saved = run_log.saved_config()  # one-line error for a directory that holds no run
        config = saved if config is None else config
    if config is None:
        raise ConfigError("train needs a config unless it resumes a run")
    fed = setup(config, model, loss_fn, data)
    if branch_from is not None:
        start, metrics = run_log.branch(fed, branch_from, branch_epoch)
    else:
        start, metrics = run_log.open(fed, resume)
    for r in range(start, fed.total_rounds):
        t0 = time.perf_counter()
        lr = begin_round(fed, r)
        guide_round(fed, r)
        cfg = fed.config
        if cfg.is_baffle and cfg.round_mode == "fedsgd" and (
                cfg.seed_sharing == "round" or cfg.sampler == "torch" or cfg.device != "cpu"):
            # in process, the server rebuilds from the directions the clients drew, so each
            # is drawn once a round (once for all clients under a shared seed). On a CPU a
            # counter draw of client seeds is one batch per tensor, cheaper than the K
            # cached copies the rebuild would read back (the estimate drew 2 at a time); a
            # GPU estimate draws all K at once, which the rebuild reads back in one copy.
            fed.cache = DirectionCache(fed.dirs)
        sampled = sample_clients(cfg, r)
        uploads, failures = [], []
        for c in sampled:
            try:
                u = run_client(fed, c, r, lr, round_seed(fed.config, r))
                uploads.append(upload_hook(r, u) if upload_hook else u)
            except Exception as e:  # noqa: BLE001 - a dying client must not kill the round
                failures.append({"client": c, "reason": f"client failed: {type(e).__name__}: {e}"})
        if len(failures) == len(sampled):
            raise BaffleError(f"every client failed in round {r}: {failures[0]['reason']}")
        record = finish_round(fed, r, lr, sampled, uploads, failures, t0)
        metrics.append(record)
        run_log.round_done(fed, record)
        for cb in callbacks:
            cb.on_round(record, fed.total_rounds)
    return run_log.close(fed, metrics)


def round_record(fed: Federation, r: int, lr: float, sampled: list[int],
                 accepted: list[Upload], rejected: list[dict[str, Any]],
                 wall: float) -> dict[str, Any]:
    """The accounting logged for one round (per-client numbers are means over senders)."""
    n = max(1, len(accepted))
    down_up = [traffic(fed, u) for u in accepted]
    if fed.server.guide is not None and fed.dirs.basis is not None:
        for u in accepted:  # a client that answered holds the round's basis; one that
            fed.server.guide.held[u.client] = fed.dirs.basis.digest  # failed is sent it again
    return {
        "round": r,
        "epoch": (r + 1) / fed.rounds_per_epoch,
        "lr": lr,
        **({"K": fed.spec_at(r).K} if fed.config.is_baffle else {}),
        "clients": len(sampled),
        "accepted": len(accepted),
        "rejected": len(rejected),
        "rejections": rejected,
        "train_loss": sum(u.loss for u in accepted) / n if accepted else None,
        "fwd_per_client": sum(u.forward_passes for u in accepted) / n,
        "bwd_per_client": 0 if fed.config.is_baffle else
        sum(u.forward_passes for u in accepted) / n,
        "bytes_down_per_client": sum(d for d, _ in down_up) / n,
        "bytes_up_per_client": sum(u for _, u in down_up) / n,
        "wall_s": wall,
    }


def evaluation(fed: Federation) -> dict[str, float]:
    """Validation/test metrics on the evaluation weights (EMA if on)."""
    model = fed.server.eval_model()
    out = {f"test_{k}": v for k, v in evaluate(model, fed.data.test, fed.config.device).items()}
    if fed.val is not None:
        out.update({f"val_{k}": v for k, v in evaluate(model, fed.val, fed.config.device).items()})
    if fed.data.num_classes <= 10:
        out = {k: v for k, v in out.items() if not k.endswith("top5")}
    return out


def summarize(fed: Federation, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the run and the last evaluation."""
    cfg = fed.config
    last_eval = next((m for m in reversed(metrics) if "test_top1" in m), {})
    label = cfg.method if not cfg.is_baffle else f"baffle-{cfg.round_mode}"
    return {
        "method": label,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "rounds": len(metrics),
        "epochs": len(metrics) / fed.rounds_per_epoch,
        "test_top1": last_eval.get("test_top1"),
        "test_top5": last_eval.get("test_top5"),
        "val_top1": last_eval.get("val_top1"),
        "fwd_per_client": sum(m["fwd_per_client"] for m in metrics),
        "bytes_up_per_client": sum(m["bytes_up_per_client"] for m in metrics),
        "bytes_down_per_client": sum(m["bytes_down_per_client"] for m in metrics),
        "rejected_uploads": sum(m["rejected"] for m in metrics),
        "wall_s": sum(m["wall_s"] for m in metrics),
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A Markdown table comparing runs side by side."""
    head = ("| method | test top-1 % | rounds | epochs | fwd passes/client | up/client | "
            "down/client | wall s |")
    lines = [head, "|" + "---|" * 8]
    for s in summaries:
        acc = "-" if s["test_top1"] is None else f"{s['test_top1']:.2f}"
        lines.append(
            f"| {s['method']} | {acc} | {s['rounds']} | {s['epochs']:.1f} | "
            f"{s['fwd_per_client']:,.0f} | {_fmt_bytes(s['bytes_up_per_client'])} | "
            f"{_fmt_bytes(s['bytes_down_per_client'])} | {s['wall_s']:.1f} |")
    return "\n".join(lines)
