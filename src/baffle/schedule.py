"""Schedules as pure functions of the (0-based) epoch: nothing to checkpoint, and the
server and every client derive the same value from the round index alone.

    lr(e) = warmup_lr                          if e == 0 and warm-up is on
          = lr * gamma ** #{m in milestones : m <= e}   otherwise
    K(e)  = values[j] for the last j with milestones[j] <= e, else K

The lr schedule is the authors' (a first-epoch warm-up LR and a multi-step decay). The K
schedule is ours: few directions while any descent direction helps, more once the
estimator's noise limits progress.
"""

from __future__ import annotations

from collections.abc import Sequence


def lr_at(
    epoch: int,
    lr: float,
    milestones: Sequence[int] = (),
    gamma: float = 0.2,
    warmup_lr: float | None = None,
) -> float:
    """The learning rate during (0-based) epoch ``epoch``."""
    if epoch == 0 and warmup_lr:
        return warmup_lr
    return lr * gamma ** sum(1 for m in milestones if m <= epoch)


def k_at(epoch: int, K: int, milestones: Sequence[int] = (), values: Sequence[int] = ()) -> int:
    """The number of directions per estimate during (0-based) epoch ``epoch``."""
    k = K
    for m, v in zip(milestones, values, strict=True):
        if m <= epoch:
            k = v
    return k
