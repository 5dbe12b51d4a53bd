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
              "K_values", "eval_every", "checkpoint_every", "keep_every")
# where a resumed run trains, not what: it may move to another machine
MOVABLE = ("data_dir", "download", "device")


def changed(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[object, object]]:
    """Field -> (old, new) for every field the two configs set differently."""
    return {f.name: (getattr(old, f.name), getattr(new, f.name)) for f in fields(TrainConfig)
            if getattr(old, f.name) != getattr(new, f.name)}


def schedule(c: TrainConfig, epoch: int) -> tuple[float, int]:
    """(lr, K) during ``epoch`` under ``c``."""
    return (lr_at(epoch, c.lr, c.lr_milestones, c.lr_gamma, c.resolved_warmup_lr),
            k_at(epoch, c.K, c.K_milestones, c.K_values))


def check(old: TrainConfig, new: TrainConfig, rounds_done: int, rounds_per_epoch: int,
          what: str = "a branch", also: tuple[str, ...] = ()) -> None:
    """Raise ``ConfigError`` unless ``new`` continues ``old`` exactly after ``rounds_done``
    rounds. ``what`` names the continuation in the message; ``also`` are further fields
    it may change (a resumed server may move to another data folder or device)."""
    fixed = sorted(set(changed(old, new)) - set(BRANCHABLE) - set(also))
    if fixed:
        raise ConfigError(f"{what} may change only {', '.join(BRANCHABLE + also)}; "
                          f"{', '.join(fixed)} would change the rounds already trained "
                          "(start a new run instead)")
    touched = (rounds_done - 1) // rounds_per_epoch + 1 if rounds_done else 0
    for e in range(touched):
        (lr0, k0), (lr1, k1) = schedule(old, e), schedule(new, e)
        if (lr0, k0) != (lr1, k1):
            raise ConfigError(
                f"the new schedule differs in epoch {e} (lr {lr0:g} -> {lr1:g}, K {k0} -> "
                f"{k1}), which the source already trained ({rounds_done} rounds, epoch "
                f"{rounds_done / rounds_per_epoch:g}); change only epochs after it")
    total = new.rounds or new.epochs * rounds_per_epoch
    if total < rounds_done:
        raise ConfigError(f"{what} would be {total} rounds long, fewer than the "
                          f"{rounds_done} the source has finished")
