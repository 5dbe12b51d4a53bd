"""Client partitioners: split a training set's indices across clients, seeded and reproducible.

Every partitioner first holds out ``val_per_class`` examples of each class for validation
(the same hold-out for every partitioner, given the seed), then splits the rest:

- ``iid``: per class, shuffle and deal out equal parts (the authors' split), so clients get
  the same class proportions and sizes that differ by at most one.
- ``dirichlet``: per class, client shares drawn from Dirichlet(alpha) (label skew; small
  alpha means few classes per client).
- ``shards``: McMahan et al.'s split: sort by label, cut into
  ``num_clients * shards_per_client`` shards, give each client ``shards_per_client`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from baffle.errors import ConfigError


@dataclass(frozen=True, eq=False)  # arrays have no truth value: compare by identity
class Partition:
    """Per-client sorted int64 indices into the train set, and the held-out validation ones."""

    clients: list[np.ndarray]
    val: np.ndarray


Splitter = Callable[[np.ndarray, int, np.random.Generator, float, int], list[np.ndarray]]
"""``(pool_labels, num_clients, rng, alpha, shards_per_client) -> positions into the pool``."""


def split_iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float, shards: int
) -> list[np.ndarray]:
    """Per class, shuffle and deal equal parts; the remainders rotate over clients so that
    both sizes and per-class counts differ by at most one."""
    del alpha, shards
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    start = 0  # the client that gets the next class's first leftover example
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        base, extra = divmod(len(members), num_clients)
        sizes = np.full(num_clients, base)
        sizes[(start + np.arange(extra)) % num_clients] += 1
        start = (start + extra) % num_clients
        for client, chunk in enumerate(np.split(members, np.cumsum(sizes)[:-1])):
            parts[client].append(chunk)
    return [np.concatenate(p) for p in parts]


def split_dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float, shards: int
) -> list[np.ndarray]:
    """Per class, client shares ~ Dirichlet(alpha * 1).

    No client is left empty: while one is, it takes one random example from the currently
    largest client (which then has at least two, since there are at least as many examples
    as clients). This changes at most ``num_clients - 1`` examples.
    """
    del shards
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    clients = [np.concatenate(p) for p in parts]
    for empty in range(num_clients):
        if len(clients[empty]) == 0:
            donor = int(np.argmax([len(cl) for cl in clients]))
            take = int(rng.integers(len(clients[donor])))
            clients[empty] = clients[donor][take : take + 1]
            clients[donor] = np.delete(clients[donor], take)
    return clients


def split_shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float, shards: int
) -> list[np.ndarray]:
    """Sort by label (random order within a class), cut into ``num_clients * shards``
    near-equal shards, and give each client ``shards`` random ones."""
    del alpha
    total = num_clients * shards
    if total > len(labels):
        raise ConfigError(
            f"shards partition needs num_clients * shards_per_client = {total} shards but only "
            f"{len(labels)} examples remain after validation: use fewer clients or shards"
        )
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, total)
    order = rng.permutation(total).reshape(num_clients, shards)
    return [np.concatenate([pieces[s] for s in row]) for row in order]


PARTITIONERS: dict[str, Splitter] = {
    "iid": split_iid,
    "dirichlet": split_dirichlet,
    "shards": split_shards,
}


def available_partitioners() -> list[str]:
    """Names accepted by ``partition``."""
    return sorted(PARTITIONERS)


def hold_out(
    labels: np.ndarray, val_per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (pool, val) indices, with ``val_per_class`` random examples of each class in val."""
    val: list[np.ndarray] = []
    for c, count in zip(*np.unique(labels, return_counts=True), strict=True):
        if count <= val_per_class:
            raise ConfigError(
                f"val_per_class={val_per_class} leaves class {c} with no training examples "
                f"(it has {count}): lower val_per_class"
            )
        val.append(rng.choice(np.flatnonzero(labels == c), size=val_per_class, replace=False))
    val_idx = np.sort(np.concatenate(val)).astype(np.int64) if val else np.empty(0, np.int64)
    pool = np.setdiff1d(np.arange(len(labels), dtype=np.int64), val_idx)
    return pool, val_idx


def _check(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    val_per_class: int,
    alpha: float,
    spc: int,
) -> None:
    if name not in PARTITIONERS:
        raise ConfigError(
            f"unknown partitioner {name!r}: choose one of {', '.join(available_partitioners())}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"labels must be a 1-D integer array, got {labels.dtype} with shape {labels.shape}: "
            "pass the train set's class labels"
        )
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ConfigError(f"num_clients must be an integer, got {num_clients!r}")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {num_clients}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be an integer of 0 or more, got {seed!r}")
    if val_per_class < 0:
        raise ConfigError(f"val_per_class must be 0 or more, got {val_per_class}")
    if name == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"dirichlet alpha must be a finite number above 0, got {alpha}")
    if name == "shards" and spc < 1:
        raise ConfigError(f"shards_per_client must be at least 1, got {spc}")


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    val_per_class: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> Partition:
    """Split ``range(len(labels))`` into a validation hold-out and ``num_clients`` non-empty
    clients with partitioner ``name``; the same arguments always give the same split."""
    labels = np.asarray(labels)
    _check(name, labels, num_clients, seed, val_per_class, alpha, shards_per_client)
    val_seed, split_seed = np.random.SeedSequence(seed).spawn(2)
    pool, val = hold_out(labels, val_per_class, np.random.default_rng(val_seed))
    if num_clients > len(pool):
        raise ConfigError(
            f"{num_clients} clients but only {len(pool)} training examples after validation: "
            "use fewer clients or a smaller val_per_class"
        )
    positions = PARTITIONERS[name](
        labels[pool], num_clients, np.random.default_rng(split_seed), alpha, shards_per_client
    )
    return Partition(clients=[np.sort(pool[p]) for p in positions], val=val)
