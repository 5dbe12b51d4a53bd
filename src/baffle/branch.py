"""Branch a run: start a new run from another run's last checkpoint, under a config that
changes only what has not happened yet.

Schedule ablations (an lr decay, a K schedule) share a long prefix with the run they vary;
a branch trains that prefix once. A branch is exact (the same weights, bit for bit, as
training the new config from round 0) when every round the source finished would have
run the same under the new config. Schedules are pure functions of the epoch
(``baffle.schedule``), so that holds when

  * the two configs differ only in ``BRANCHABLE`` fields, and
  * lr(e) and K(e) agree under both for every epoch e that the finished rounds touch:
    e <= (rounds_done - 1) // rounds_per_epoch.

``check`` refuses anything else with a one-line ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import fields

from baffle.config import TrainConfig
from baffle.errors import ConfigError
from baffle.schedule import k_at, lr_at

# length, schedules and cadences: nothing a finished round depended on
BRANCHABLE = ("epochs", "rounds", "lr_milestones", "lr_gamma", "warmup_lr", "K_milestones",
              "K_values", "eval_every", "checkpoint_every")


def changed(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[object, object]]:
    """Field -> (old, new) for every field the two configs set differently."""
    return {f.name: (getattr(old, f.name), getattr(new, f.name)) for f in fields(TrainConfig)
            if getattr(old, f.name) != getattr(new, f.name)}


def schedule(c: TrainConfig, epoch: int) -> tuple[float, int]:
    """(lr, K) during ``epoch`` under ``c``."""
    return (lr_at(epoch, c.lr, c.lr_milestones, c.lr_gamma, c.resolved_warmup_lr),
            k_at(epoch, c.K, c.K_milestones, c.K_values))


def check(old: TrainConfig, new: TrainConfig, rounds_done: int, rounds_per_epoch: int) -> None:
    """Raise ``ConfigError`` unless ``new`` branches exactly from ``old`` after
    ``rounds_done`` rounds."""
    fixed = sorted(set(changed(old, new)) - set(BRANCHABLE))
    if fixed:
        raise ConfigError(f"a branch may change only {', '.join(BRANCHABLE)}; "
                          f"{', '.join(fixed)} would change the rounds already trained "
                          "(start a new run instead)")
    touched = (rounds_done - 1) // rounds_per_epoch + 1 if rounds_done else 0
    for e in range(touched):
        (lr0, k0), (lr1, k1) = schedule(old, e), schedule(new, e)
        if (lr0, k0) != (lr1, k1):
            raise ConfigError(
                f"the new schedule differs in epoch {e} (lr {lr0:g} -> {lr1:g}, K {k0} -> "
                f"{k1}), which the source already trained ({rounds_done} rounds, epoch "
                f"{rounds_done / rounds_per_epoch:g}); branch from a run stopped before it")
    total = new.rounds or new.epochs * rounds_per_epoch
    if total < rounds_done:
        raise ConfigError(f"the branch would be {total} rounds long, fewer than the "
                          f"{rounds_done} the source has finished")
