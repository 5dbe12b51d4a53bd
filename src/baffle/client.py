"""Client: one FedSGD step (K scalars up) or one local epoch (K scalars per local step up).

Forward passes only: a client never calls ``backward``. In a local epoch the client
rebuilds its own gradient from its own scalars (``local_step``) and steps its own
optimizer, so the server can replay the very same steps from (seeds, scalars) alone.
That optimizer is fresh each round or carries the client's state from its last round
(``local_optimizer``); the server replays with the same starting state either way.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from baffle.aggregate import Upload
from baffle.directions import DirectionCache, DirectionScheme
from baffle.estimator import Engine, EstimatorSpec, LossFn, loss_differences, trainable_params
from baffle.reconstruct import rebuild_gradient
from baffle.server import step_with_gradient

Batch = tuple[torch.Tensor, torch.Tensor]
# A local step keeps the K directions its estimate drew for its own rebuild if they fit
# in this many bytes (LeNet, K=100: 10.7 MB); a bigger model draws them again.
STEP_CACHE = 64 << 20
OptimizerMaker = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def fedsgd_update(
    client: int,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    seed: int,
    spec: EstimatorSpec,
    dirs: DirectionScheme,
    engine: Engine = "auto",
    chunk: int = 32,
    max_memory: str | int | None = None,
    cache: DirectionCache | None = None,
) -> Upload:
    """Evaluate K loss differences on one local batch; upload only those K numbers."""
    x, y = batch
    est = loss_differences(model, loss_fn, x, y, seed, spec, dirs, engine, chunk,
                           max_memory=max_memory, cache=cache)
    return Upload(client, len(y), (seed,), est.diffs, loss=est.loss,
                  forward_passes=est.forward_passes)


def local_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    seed: int,
    diffs: torch.Tensor,
    spec: EstimatorSpec,
    dirs: DirectionScheme,
    clip: float | None,
    cache: DirectionCache | None = None,
) -> None:
    """Rebuild the gradient from (seed, diffs) and step: identical on client and server
    (``cache``: directions the client's estimate drew, same values, drawn once)."""
    device = next(iter(trainable_params(model).values())).device
    shapes = [p.shape for p in trainable_params(model).values()]
    step_with_gradient(model, optimizer,
                       rebuild_gradient(shapes, seed, diffs, spec, dirs, device, cache), clip)


def local_optimizer(make_optimizer: OptimizerMaker, model: nn.Module,
                    state: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """A local optimizer over ``model``'s trainable parameters: fresh, or carrying the
    per-parameter ``state`` (Adam's moments, a step count) of an earlier round. The
    hyperparameters (lr, betas, ...) stay those ``make_optimizer`` gives now."""
    optimizer = make_optimizer(trainable_params(model).values())
    if state is not None:
        now = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(copy.deepcopy(state))  # it steps in place: keep ``state``
        for group, hyper in zip(optimizer.param_groups, now, strict=True):
            group.update(hyper)
    return optimizer


def optimizer_digest(state: dict[str, Any] | None) -> int:
    """A 63-bit digest of an optimizer's per-parameter state (Adam's moments and step
    counts), 0 for none (a fresh optimizer). Equal states, bit for bit, give equal digests;
    the hyperparameters are left out, as ``local_optimizer`` replaces them anyway."""
    if state is None:
        return 0
    h = hashlib.blake2b(digest_size=8, person=b"baffle-optim")
    for p in sorted(state["state"]):
        for key in sorted(state["state"][p]):
            value = state["state"][p][key]
            if value is None:  # e.g. SGD without momentum keeps no buffer
                h.update(f"{p}/{key}/none|".encode())
                continue
            value = torch.as_tensor(value).detach().cpu().contiguous()
            h.update(f"{p}/{key}/{value.dtype}/{tuple(value.shape)}|".encode())
            h.update(value.numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1) or 1


def local_epoch_update(
    client: int,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    seeds: Sequence[int],
    spec: EstimatorSpec,
    dirs: DirectionScheme,
    optimizer: torch.optim.Optimizer,
    clip: float | None,
    engine: Engine = "auto",
    chunk: int = 32,
    max_memory: str | int | None = None,
) -> Upload:
    """E local BAFFLE steps on the client's own copy of the model, stepping ``optimizer``
    (over that copy's parameters, see ``local_optimizer``); upload (E, K) scalars."""
    rows, losses = [], []
    n_params = sum(p.numel() for p in trainable_params(model).values())
    reuse = spec.K * n_params * 4 <= STEP_CACHE  # else memory stays near inference's
    for (x, y), seed in zip(batches, seeds, strict=True):
        # the step's rebuild reads back the K directions its estimate drew
        cache = DirectionCache(dirs) if reuse else None
        est = loss_differences(model, loss_fn, x, y, seed, spec, dirs, engine, chunk,
                               max_memory=max_memory, cache=cache)
        local_step(model, optimizer, seed, est.diffs, spec, dirs, clip, cache)
        rows.append(est.diffs)
        losses.append(est.loss)
    return Upload(client, sum(len(y) for _, y in batches), tuple(seeds), torch.stack(rows),
                  loss=sum(losses) / len(losses), forward_passes=spec.forward_passes * len(rows))


def replay_local_epoch(
    model: nn.Module,
    upload: Upload,
    spec: EstimatorSpec,
    dirs: DirectionScheme,
    optimizer: torch.optim.Optimizer,
    clip: float | None,
) -> list[torch.Tensor]:
    """Server side: rebuild a client's local model from its seeds and scalars alone.

    ``model`` starts at the weights the client started from and is stepped in place by
    ``optimizer``, which must start where the client's did (fresh, or the same state);
    it ends where the client's ended.
    """
    assert upload.diffs is not None
    for seed, diffs in zip(upload.seeds, upload.diffs, strict=True):
        local_step(model, optimizer, seed, diffs, spec, dirs, clip)
    return [p.detach().clone() for p in trainable_params(model).values()]
