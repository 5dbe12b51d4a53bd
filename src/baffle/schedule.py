"""Learning-rate schedule as a pure function of the epoch (nothing to checkpoint).

    lr(e) = warmup_lr                          if e == 0 and warm-up is on
          = lr * gamma ** #{m in milestones : m <= e}   otherwise

This is the authors' schedule: a first-epoch warm-up LR and a multi-step decay.
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
