"""scikit-learn's bundled 8x8 digits: 1,797 images, no download, for quick runs and tests."""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from baffle.data.dataset import ArrayDataset, DataBundle

TEST_FRACTION = 0.2
SPLIT_SEED = 20230128  # fixed forever, so the carved test set never changes
VAL_PER_CLASS = 10


def stratified_test_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) positions with ``round(fraction * n_c)`` of each class in test."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: round(fraction * len(members))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) with values 0..16, labels (1797,)) from the CSV file that ships
    inside scikit-learn, read without importing it (an import costs a second, paid by every
    Flower ClientApp process); through ``sklearn.datasets.load_digits`` if the file moved."""
    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec is not None else None
    path = Path(list(roots)[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        raw = load_digits()
        return raw.images, raw.target
    with gzip.open(path, "rt") as f:  # 64 pixel columns, then the label
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


@lru_cache(maxsize=1)
def _digits() -> DataBundle:
    images, labels = read_digits()
    x = torch.from_numpy((images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    train_idx, test_idx = stratified_test_split(labels, TEST_FRACTION, SPLIT_SEED)
    full = ArrayDataset(x, y)
    return DataBundle(
        name="digits",
        train=full.subset(train_idx),
        test=full.subset(test_idx),
        num_classes=10,
        in_channels=1,
        image_size=8,
        augment=None,
        val_per_class=VAL_PER_CLASS,
    )


def load_digits_bundle(data_dir: str | Path | None = None, download: bool = False) -> DataBundle:
    """The digits set scaled to [0, 1], with a fixed stratified 20% test set.

    ``data_dir`` and ``download`` are accepted for a uniform loader signature and ignored:
    the data ships inside scikit-learn.
    """
    del data_dir, download
    return _digits()
