"""Backprop baselines on the same data, split, model, optimizer and round structure.

- bp-fedsgd: each client uploads the gradient of its batch loss (model-sized); the
  server averages and steps, exactly where BAFFLE would step with its estimate.
- bp-fedavg: each client runs E local backprop steps and uploads its model (model-sized).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from baffle.aggregate import Upload
from baffle.client import Batch
from baffle.estimator import LossFn, trainable_params


def bp_gradient_update(client: int, model: nn.Module, loss_fn: LossFn, batch: Batch) -> Upload:
    """One forward and one backward pass; upload the gradient."""
    x, y = batch
    params = list(trainable_params(model).values())
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return Upload(client, len(y), tensors=tuple(g.detach() for g in grads), loss=float(loss.detach()),
                  forward_passes=1)


def bp_local_epoch_update(
    client: int,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
) -> Upload:
    """E local backprop steps on the client's copy, stepping ``optimizer`` (over that copy's
    parameters, see ``client.local_optimizer``); upload the resulting model."""
    params = list(trainable_params(model).values())
    losses = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return Upload(client, sum(len(y) for _, y in batches),
                  tensors=tuple(p.detach().clone() for p in params),
                  loss=sum(losses) / len(losses), forward_passes=len(batches))
