"""Data sets by name: adding one is one entry in ``DATASETS``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from baffle.data.cifar import load_cifar10, load_cifar100
from baffle.data.dataset import DataBundle
from baffle.data.digits import load_digits_bundle
from baffle.data.mnist import load_mnist
from baffle.errors import ConfigError

Loader = Callable[[str | Path | None, bool], DataBundle]
"""``(data_dir, download) -> DataBundle``."""

DATASETS: dict[str, Loader] = {
    "digits": load_digits_bundle,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}


def available_datasets() -> list[str]:
    """Names accepted by ``load_dataset``."""
    return sorted(DATASETS)


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = False
) -> DataBundle:
    """Load data set ``name`` from ``data_dir`` (each has a default), downloading if asked."""
    loader = DATASETS.get(name)
    if loader is None:
        raise ConfigError(
            f"unknown dataset {name!r}: choose one of {', '.join(available_datasets())}"
        )
    return loader(data_dir, download)
