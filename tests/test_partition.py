"""Client partitioners: one battery over every registered partitioner, then per-kind checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from baffle.data import PARTITIONERS, Partition, available_partitioners, partition
from baffle.errors import ConfigError

NUM_CLASSES = 10


def make_labels(n: int = 3000, seed: int = 123) -> np.ndarray:
    """Imbalanced labels: class c is drawn with probability proportional to c + 1."""
    p = np.arange(1, NUM_CLASSES + 1) / np.arange(1, NUM_CLASSES + 1).sum()
    return np.random.default_rng(seed).choice(NUM_CLASSES, size=n, p=p)


LABELS = make_labels()


def label_tv(part: Partition, labels: np.ndarray) -> float:
    """Mean over clients of the total-variation distance from the global label mix."""
    glob = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(labels[c], minlength=NUM_CLASSES) / len(c) - glob).sum()
                for c in part.clients
            ]
        )
    )


# --- one battery, every partitioner -------------------------------------------------------


@pytest.mark.parametrize("val_per_class", [0, 20])
@pytest.mark.parametrize("num_clients", [1, 7, 50])
@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_exact_cover_and_sane_sizes(name: str, num_clients: int, val_per_class: int) -> None:
    part = partition(name, LABELS, num_clients, seed=3, val_per_class=val_per_class)
    assert len(part.clients) == num_clients
    everything = np.concatenate([*part.clients, part.val])
    assert all(c.dtype == np.int64 for c in (*part.clients, part.val))
    assert len(everything) == len(LABELS)  # no duplicates ...
    assert np.array_equal(np.sort(everything), np.arange(len(LABELS)))  # ... and nothing lost
    assert all(len(c) > 0 for c in part.clients)
    # validation holds exactly val_per_class of each class
    assert np.array_equal(
        np.bincount(LABELS[part.val], minlength=NUM_CLASSES),
        np.full(NUM_CLASSES, val_per_class),
    )


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_reproducible_for_a_seed_and_different_for_another(name: str) -> None:
    a = partition(name, LABELS, 10, seed=5, val_per_class=10)
    b = partition(name, LABELS, 10, seed=5, val_per_class=10)
    c = partition(name, LABELS, 10, seed=6, val_per_class=10)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients, strict=True))
    assert np.array_equal(a.val, b.val)
    assert not all(np.array_equal(x, y) for x, y in zip(a.clients, c.clients, strict=True))
    assert not np.array_equal(a.val, c.val)


def test_validation_hold_out_is_the_same_for_every_partitioner() -> None:
    vals = [partition(n, LABELS, 4, seed=9, val_per_class=15).val for n in PARTITIONERS]
    assert all(np.array_equal(vals[0], v) for v in vals[1:])


def test_registry_names_are_listed() -> None:
    assert available_partitioners() == sorted(PARTITIONERS)
    assert {"iid", "dirichlet", "shards"} <= set(PARTITIONERS)


# --- per kind --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients", [3, 7, 10, 64])
def test_iid_clients_share_class_histograms_within_one(num_clients: int) -> None:
    part = partition("iid", LABELS, num_clients, seed=1, val_per_class=20)
    hists = np.stack([np.bincount(LABELS[c], minlength=NUM_CLASSES) for c in part.clients])
    assert (hists.max(axis=0) - hists.min(axis=0)).max() <= 1
    sizes = np.array([len(c) for c in part.clients])
    assert sizes.max() - sizes.min() <= 1


def test_iid_matches_global_label_mix() -> None:
    # measured 0.004 for 10 clients of ~290 examples; a label-skewed split is far above 0.05
    assert label_tv(partition("iid", LABELS, 10, seed=0), LABELS) < 0.05


def test_dirichlet_skew_responds_to_alpha() -> None:
    # Measured on these labels with 10 clients, seeds 0..4: mean TV 0.61..0.73 at alpha=0.1,
    # 0.32..0.36 at alpha=1, 0.03..0.04 at alpha=100.
    def mean_tv(alpha: float) -> float:
        parts = [partition("dirichlet", LABELS, 10, s, alpha=alpha) for s in range(5)]
        return float(np.mean([label_tv(p, LABELS) for p in parts]))

    skewed, middle, even = mean_tv(0.1), mean_tv(1.0), mean_tv(100.0)
    assert skewed > 0.5
    assert 0.15 < middle < 0.5
    assert even < 0.1


def test_dirichlet_never_leaves_a_client_empty() -> None:
    # alpha this small gives almost every class to one client, so most clients start empty
    labels = make_labels(n=300, seed=4)
    for seed in range(3):
        part = partition("dirichlet", labels, 100, seed, alpha=1e-3)
        assert all(len(c) > 0 for c in part.clients)
        everything = np.concatenate(part.clients)
        assert np.array_equal(np.sort(everything), np.arange(len(labels)))


def test_dirichlet_with_as_many_clients_as_examples_gives_one_each() -> None:
    labels = make_labels(n=40, seed=2)
    part = partition("dirichlet", labels, 40, seed=0, alpha=0.1)
    assert [len(c) for c in part.clients] == [1] * 40


@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
def test_shards_give_few_classes_per_client(shards_per_client: int) -> None:
    part = partition("shards", LABELS, 20, seed=2, shards_per_client=shards_per_client)
    classes = [len(np.unique(LABELS[c])) for c in part.clients]
    # Class sizes here are 55..511 and shards hold 150, 75 or 50 examples, so a shard spans
    # at most two classes. Measured over seeds 0..4: at most 2, 4, 5 classes per client and
    # mean TV 0.83, 0.73, 0.64 for 1, 2, 3 shards per client.
    assert max(classes) <= 2 * shards_per_client
    sizes = np.array([len(c) for c in part.clients])
    assert sizes.max() - sizes.min() <= shards_per_client  # shards differ by at most one
    # far from the global mix, where an iid split of the same data measures 0.004
    assert label_tv(part, LABELS) > 0.4


# --- bad arguments ---------------------------------------------------------------------------


def one_line_config_error(match: str, **kwargs: object) -> None:
    args = {"name": "iid", "labels": LABELS, "num_clients": 4, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=match) as info:
        partition(**args)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("num_clients", [0, -3])
def test_too_few_clients_is_refused(num_clients: int) -> None:
    one_line_config_error("num_clients", num_clients=num_clients)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_more_clients_than_examples_is_refused(name: str) -> None:
    labels = np.arange(30) % 3
    one_line_config_error("clients", name=name, labels=labels, num_clients=31)
    # and counting the validation hold-out: 30 - 3 * 2 = 24 left for 25 clients
    one_line_config_error("clients", name=name, labels=labels, num_clients=25, val_per_class=2)
    assert len(partition(name, labels, 24, 0, val_per_class=2, shards_per_client=1).clients) == 24


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.nan, math.inf])
def test_bad_alpha_is_refused(alpha: float) -> None:
    one_line_config_error("alpha", name="dirichlet", alpha=alpha)


def test_unknown_partitioner_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        partition("label-skew", LABELS, 4, 0)
    message = str(info.value)
    assert "label-skew" in message and "\n" not in message
    assert all(n in message for n in ("iid", "dirichlet", "shards"))


def test_hold_out_larger_than_a_class_is_refused() -> None:
    smallest = int(np.bincount(LABELS).min())
    one_line_config_error("val_per_class", val_per_class=smallest)
    one_line_config_error("val_per_class", val_per_class=-1)


def test_too_many_shards_is_refused() -> None:
    one_line_config_error("shards", name="shards", num_clients=100, shards_per_client=40)
    one_line_config_error("shards_per_client", name="shards", shards_per_client=0)


def test_bad_seed_and_labels_are_refused() -> None:
    one_line_config_error("seed", seed=-1)
    one_line_config_error("labels", labels=LABELS.astype(np.float64))
