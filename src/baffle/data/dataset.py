"""In-memory data sets: tensors in, tensors out, plus the small file helpers the loaders share."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from baffle.errors import DataError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A per-batch training augmentation: ``(batch, generator) -> batch`` of the same shape."""


@dataclass(frozen=True, eq=False)  # tensors have no truth value: compare by identity
class ArrayDataset:
    """Images ``x`` (N, C, H, W) float32, already normalized, and labels ``y`` (N,) int64.

    Loaders cache their tensors per process, so treat ``x`` and ``y`` as read-only.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise DataError(
                f"ArrayDataset.x must be a float32 (N, C, H, W) tensor, got {self.x.dtype} "
                f"with shape {tuple(self.x.shape)}: convert the images before wrapping them"
            )
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise DataError(
                f"ArrayDataset.y must be an int64 (N,) tensor, got {self.y.dtype} with shape "
                f"{tuple(self.y.shape)}: convert the labels before wrapping them"
            )
        if len(self.x) != len(self.y):
            raise DataError(
                f"ArrayDataset has {len(self.x)} images but {len(self.y)} labels: "
                "pass one label per image"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray | torch.Tensor) -> ArrayDataset:
        """The examples at integer positions ``idx``, in that order."""
        index = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
        index = index.to(device=self.y.device, dtype=torch.int64)
        return ArrayDataset(self.x[index], self.y[index])


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A data set ready to train on: normalized train/test tensors and their facts."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    in_channels: int
    image_size: int
    augment: Augment | None  # applied per training batch; None where the data set has none
    val_per_class: int  # default per-class validation hold-out for the iid split


def one_line(text: object) -> str:
    """``text`` as a single line, for embedding an exception's message in ours."""
    return " ".join(str(text).split())


def digest(data: bytes, algorithm: str = "sha256") -> str:
    """Hex digest of ``data`` (``sha256`` or ``md5``)."""
    return hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of the file at ``path``, read in chunks."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(urls: Sequence[str], dest: Path, check: Callable[[Path], None]) -> None:
    """Fetch the first of ``urls`` that works into ``dest``, atomically.

    Each attempt goes to a temporary file beside ``dest``; ``check`` (which raises
    ``DataError`` on a bad file) must accept it before it is renamed into place.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
            check(tmp)
            os.replace(tmp, dest)
            return
        except (OSError, ValueError, http.client.HTTPException, DataError) as exc:
            errors.append(f"{url}: {one_line(exc)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {dest.name} from any mirror ({'; '.join(errors)}): check the "
        f"network, or fetch the file by hand into {dest.parent} and pass --data-dir"
    )
