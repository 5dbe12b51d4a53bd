"""scikit-learn's bundled 8x8 digits: 1,797 images, no download, for quick runs and tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

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


@lru_cache(maxsize=1)
def _digits() -> DataBundle:
    raw = load_digits()
    x = torch.from_numpy((raw.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(raw.target.astype(np.int64))
    train_idx, test_idx = stratified_test_split(raw.target, TEST_FRACTION, SPLIT_SEED)
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
