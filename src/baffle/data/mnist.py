"""MNIST from the four standard IDX files (gzipped or not), checked against SHA-256 sums.

Preprocessing follows the authors: 28x28 -> 32x32 bilinear, scaled to [0, 1], no mean/std.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baffle.data.cache import cached_arrays
from baffle.data.dataset import ArrayDataset, DataBundle, digest, download_file, one_line
from baffle.errors import DataError

SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""SHA-256 of each file's uncompressed bytes."""

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
"""Base URLs, each serving ``<name>.gz``; tried in order."""

DEFAULT_DIR = Path("~/.cache/baffle/mnist")
IMAGE_SIZE = 32
VAL_PER_CLASS = 500
_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes, 1 or 3 dimensions
_FILES: tuple[tuple[str, int], ...] = (  # (name, ndim), in the order _load unpacks them
    ("train-images-idx3-ubyte", 3),
    ("train-labels-idx1-ubyte", 1),
    ("t10k-images-idx3-ubyte", 3),
    ("t10k-labels-idx1-ubyte", 1),
)


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` if present, else ``folder/name.gz``, else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> bytes:
    """The uncompressed contents of ``path``, gunzipped if it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(
            f"MNIST file {path} is not a complete gzip file ({one_line(exc)}): "
            "it is truncated or corrupt; re-download it or pass --download"
        ) from None
    except OSError as exc:
        raise DataError(
            f"cannot read MNIST file {path} ({one_line(exc)}): make it a readable file"
        ) from None


def parse_idx(data: bytes, ndim: int, where: Path) -> np.ndarray:
    """Decode an unsigned-byte IDX file with ``ndim`` dimensions into a uint8 array."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"MNIST file {where} is {len(data)} bytes, shorter than its {header}-byte header: "
            "it is truncated; re-download it or pass --download"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != _MAGIC[ndim]:
        raise DataError(
            f"MNIST file {where} has magic number {magic:#010x}, want {_MAGIC[ndim]:#010x}: "
            "it is not this IDX file; replace it with the standard one or pass --download"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    want = header + int(np.prod(dims))
    if len(data) != want:
        raise DataError(
            f"MNIST file {where} is {len(data)} bytes uncompressed but its header "
            f"{'x'.join(map(str, dims))} needs {want}: it is truncated or corrupt; "
            "re-download it or pass --download"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _verified(path: Path, name: str, ndim: int) -> np.ndarray:
    """The decoded array of IDX file ``name`` at ``path``, after its SHA-256 check."""
    data = read_bytes(path)
    array = parse_idx(data, ndim, path)
    got = digest(data)
    if got != SHA256[name]:
        raise DataError(
            f"MNIST file {path} fails its SHA-256 check (got {got[:12]}..., want "
            f"{SHA256[name][:12]}...): the file is truncated or corrupt; re-download it "
            "or pass --download"
        )
    return array


def download_mnist(folder: Path, mirrors: Sequence[str] | None = None) -> None:
    """Download each missing ``<name>.gz`` into ``folder``, verifying it before it lands."""
    for name, ndim in _FILES:
        if _find(folder, name) is not None:
            continue

        def check(tmp: Path, name: str = name, ndim: int = ndim) -> None:
            _verified(tmp, name, ndim)

        urls = [base.rstrip("/") + f"/{name}.gz" for base in (mirrors or MIRRORS)]
        download_file(urls, folder / f"{name}.gz", check)


def resize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32) in [0, 1], bilinear as the authors."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.contiguous().numpy()


def _decoded(files: tuple[tuple[Path, int, int], ...]) -> dict[str, np.ndarray]:
    """Decode, verify and preprocess the four files."""
    arrays = [
        _verified(path, name, ndim)
        for (path, _, _), (name, ndim) in zip(files, _FILES, strict=True)
    ]
    train_x, train_y, test_x, test_y = arrays
    for images, labels, path in ((train_x, train_y, files[0][0]), (test_x, test_y, files[2][0])):
        if len(images) != len(labels):
            raise DataError(
                f"MNIST file {path} holds {len(images)} images but its labels file holds "
                f"{len(labels)}: replace both with the standard files or pass --download"
            )
    return {"train_x": resize(train_x), "train_y": train_y.astype(np.int64),
            "test_x": resize(test_x), "test_y": test_y.astype(np.int64)}


@lru_cache(maxsize=2)
def _load(files: tuple[tuple[Path, int, int], ...]) -> DataBundle:
    """The data set, keyed on (path, size, mtime) so edits are seen; decoded once per
    machine (``baffle.data.cache``: later processes map the decoded arrays)."""
    a = cached_arrays("mnist", (tuple((str(p), n, t) for p, n, t in files), IMAGE_SIZE,
                                torch.__version__), lambda: _decoded(files))
    return DataBundle(
        name="mnist",
        train=ArrayDataset(torch.from_numpy(a["train_x"]), torch.from_numpy(a["train_y"])),
        test=ArrayDataset(torch.from_numpy(a["test_x"]), torch.from_numpy(a["test_y"])),
        num_classes=10,
        in_channels=1,
        image_size=IMAGE_SIZE,
        augment=None,
        val_per_class=VAL_PER_CLASS,
    )


def load_mnist(data_dir: str | Path | None = None, download: bool = False) -> DataBundle:
    """MNIST from ``data_dir`` (default ``~/.cache/baffle/mnist``), downloading if asked.

    Returns 60,000 train and 10,000 test images of 1x32x32 in [0, 1]. Results are cached
    per process; the tensors are shared, so do not modify them in place.
    """
    folder = Path(data_dir if data_dir is not None else DEFAULT_DIR).expanduser().resolve()
    if download:
        download_mnist(folder)
    if not folder.is_dir():
        raise DataError(
            f"MNIST folder {folder} does not exist: pass --data-dir DIR holding the four "
            "IDX files (gzipped or not), or --download"
        )
    files: list[tuple[Path, int, int]] = []
    for name, _ in _FILES:
        path = _find(folder, name)
        if path is None:
            raise DataError(
                f"MNIST file {name}[.gz] is missing from {folder}: pass --data-dir DIR "
                "holding the four IDX files, or --download"
            )
        stat = path.stat()
        files.append((path, stat.st_size, stat.st_mtime_ns))
    return _load(tuple(files))
