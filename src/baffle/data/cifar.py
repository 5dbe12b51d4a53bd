"""CIFAR-10 and CIFAR-100 from the "python version" archives, tarball or extracted folder.

Images are normalized with the usual per-channel mean/std; training batches get pad-4
random crops and horizontal flips (``random_crop_flip``), as in the authors' code.
The normalized arrays are built once per machine and memory-mapped by later processes
(``baffle.data.cache``; a CIFAR-10 entry is 703 MiB), as a Flower node's process per
message needs.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baffle.data.cache import cached_arrays
from baffle.data.dataset import ArrayDataset, DataBundle, download_file, file_digest, one_line
from baffle.errors import DataError

DEFAULT_DIR = Path("~/.cache/baffle/cifar")
IMAGE_SIZE = 32


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant's files live and how to read and normalize them."""

    name: str
    archive: str  # the published tarball
    folder: str  # the folder the tarball extracts to
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    md5: str  # of the published tarball
    url: str
    val_per_class: int


CIFAR10 = CifarSpec(
    name="cifar10",
    archive="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    md5="c58f30108f718f92721af3b95e74349a",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    val_per_class=500,
)

CIFAR100 = CifarSpec(
    name="cifar100",
    archive="cifar-100-python.tar.gz",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    val_per_class=50,
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a pickle cannot run arbitrary code."""

    _ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {
        ("numpy", "ndarray"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[bytes, object]:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # corrupt bytes raise many types; all mean the same thing here
        raise DataError(
            f"CIFAR file {where} is not a readable pickle ({type(exc).__name__}: "
            f"{one_line(exc)}): it is truncated or corrupt; re-extract or re-download it"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"CIFAR file {where} holds a {type(obj).__name__}, not a dict: "
            "replace it with the file from the python-version archive"
        )
    return obj


def _decode(
    batch: dict[bytes, object], spec: CifarSpec, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 3, 32, 32) and int64 labels (n,) from one unpickled batch."""
    data, labels = batch.get(b"data"), batch.get(spec.label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(
            f"CIFAR file {where} lacks b'data' or {spec.label_key!r}: "
            f"it is not a {spec.name} batch; use the python-version archive"
        )
    y = np.asarray(labels, dtype=np.int64)
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    shape_ok = data.ndim == 2 and data.shape[1] == pixels and y.shape == (len(data),)
    if data.dtype != np.uint8 or not shape_ok:
        raise DataError(
            f"CIFAR file {where} holds data {data.dtype}{tuple(data.shape)} with {y.size} "
            f"labels, want uint8 (n, {pixels}) with n labels: it is corrupt; re-extract or "
            "re-download it"
        )
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise DataError(
            f"CIFAR file {where} has labels outside 0..{spec.num_classes - 1}: "
            f"it is not a {spec.name} batch; use the python-version archive"
        )
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), y


def _read_folder(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name in names:
        path = folder / name
        try:
            out[name] = path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"cannot read CIFAR file {path} ({one_line(exc)}): re-extract the archive "
                "or pass --download"
            ) from None
    return out


def _read_tar(archive: Path, folder: str, names: tuple[str, ...]) -> dict[str, bytes]:
    wanted = {f"{folder}/{name}": name for name in names}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    f = tar.extractfile(member)
                    if f is not None:
                        out[name] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"CIFAR archive {archive} cannot be read ({one_line(exc)}): it is truncated or "
            "corrupt; re-download it or pass --download"
        ) from None
    missing = [f"{folder}/{n}" for n in names if n not in out]
    if missing:
        raise DataError(
            f"CIFAR archive {archive} lacks {', '.join(missing)}: it is not the python-version "
            "archive; re-download it or pass --download"
        )
    return out


def _normalize(images: np.ndarray, spec: CifarSpec) -> torch.Tensor:
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _stamp(spec: CifarSpec, source: Path, is_archive: bool) -> tuple[tuple[int, int], ...]:
    """(size, mtime) of every file read, so that the cache sees files replaced in place."""
    paths = [source] if is_archive else [source / n for n in (*spec.train_files, spec.test_file)]
    return tuple((st.st_size, st.st_mtime_ns) for st in (p.stat() for p in paths))


def _decoded(spec: CifarSpec, source: Path, is_archive: bool) -> dict[str, np.ndarray]:
    """The normalized float32 images and int64 labels of the train and test files."""
    names = (*spec.train_files, spec.test_file)
    raw = _read_tar(source, spec.folder, names) if is_archive else _read_folder(source, names)
    decoded = {n: _decode(_unpickle(raw[n], f"{source}/{n}"), spec, f"{source}/{n}") for n in names}
    test_x, test_y = decoded[spec.test_file]
    return {"train_x": _normalize(np.concatenate([decoded[n][0] for n in spec.train_files]),
                                  spec).numpy(),
            "train_y": np.concatenate([decoded[n][1] for n in spec.train_files]),
            "test_x": _normalize(test_x, spec).numpy(), "test_y": test_y}


@lru_cache(maxsize=2)
def _load(
    spec: CifarSpec, source: Path, is_archive: bool, stamp: tuple[tuple[int, int], ...]
) -> DataBundle:
    """Read, decode and normalize, once per machine (``baffle.data.cache``); ``stamp``
    keys both caches to the files' state."""
    a = cached_arrays(spec.name, (str(source), is_archive, stamp, spec.mean, spec.std,
                                  torch.__version__), lambda: _decoded(spec, source, is_archive))
    return DataBundle(
        name=spec.name,
        train=ArrayDataset(torch.from_numpy(a["train_x"]), torch.from_numpy(a["train_y"])),
        test=ArrayDataset(torch.from_numpy(a["test_x"]), torch.from_numpy(a["test_y"])),
        num_classes=spec.num_classes,
        in_channels=3,
        image_size=IMAGE_SIZE,
        augment=random_crop_flip,
        val_per_class=spec.val_per_class,
    )


def download_cifar(spec: CifarSpec, folder: Path, url: str | None = None) -> Path:
    """Download ``spec.archive`` into ``folder`` (MD5-checked, atomic); returns its path."""
    dest = folder / spec.archive

    def check(path: Path) -> None:
        got = file_digest(path, "md5")
        if got != spec.md5:
            raise DataError(f"MD5 {got} differs from the published {spec.md5}")

    download_file([url or spec.url], dest, check)
    return dest


def _locate(spec: CifarSpec, folder: Path) -> tuple[Path, bool] | None:
    """(source, is_archive) for the extracted folder, ``folder`` itself, or the tarball."""
    for candidate in (folder / spec.folder, folder):
        if all((candidate / n).is_file() for n in (*spec.train_files, spec.test_file)):
            return candidate, False
    if (folder / spec.archive).is_file():
        return folder / spec.archive, True
    return None


def load_cifar(
    spec: CifarSpec, data_dir: str | Path | None = None, download: bool = False
) -> DataBundle:
    """``spec``'s data set from ``data_dir`` (default ``~/.cache/baffle/cifar``).

    ``data_dir`` may hold the extracted folder, be that folder, or hold the tarball; with
    ``download`` the tarball is fetched when none of these is there. Results are cached
    per process; the tensors are shared, so do not modify them in place.
    """
    folder = Path(data_dir if data_dir is not None else DEFAULT_DIR).expanduser().resolve()
    found = _locate(spec, folder)
    if found is None and download:
        found = download_cifar(spec, folder), True
    if found is None:
        where = (
            f"holds neither {spec.folder}/ nor {spec.archive}"
            if folder.is_dir()
            else "does not exist"
        )
        raise DataError(
            f"{spec.name} folder {folder} {where}: pass --data-dir DIR holding the "
            "python-version archive or its extracted folder, or --download"
        )
    source, is_archive = found
    return _load(spec, source, is_archive, _stamp(spec, source, is_archive))


def load_cifar10(data_dir: str | Path | None = None, download: bool = False) -> DataBundle:
    """CIFAR-10: 50,000 train and 10,000 test images, 3x32x32, normalized."""
    return load_cifar(CIFAR10, data_dir, download)


def load_cifar100(data_dir: str | Path | None = None, download: bool = False) -> DataBundle:
    """CIFAR-100 (fine labels): 50,000 train and 10,000 test images, 3x32x32, normalized."""
    return load_cifar(CIFAR100, data_dir, download)


def random_crop_flip(
    batch: torch.Tensor, generator: torch.Generator, padding: int = 4
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to the original size at a random offset, and flip
    horizontally with probability 1/2; one draw per image, all from ``generator``."""
    n, _, h, w = batch.shape
    gen, dev = generator, generator.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=gen, device=dev)
    flip = torch.randint(0, 2, (n,), generator=gen, device=dev).bool()
    offsets, flip = offsets.to(batch.device), flip.to(batch.device)
    padded = F.pad(batch, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=batch.device)  # (n, h)
    cols_fwd = torch.arange(w, device=batch.device)
    cols = offsets[1, :, None] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)  # (n, w)
    images = torch.arange(n, device=batch.device)[:, None, None]
    # Index (image, row, col) on a channels-last view: gives (n, h, w, c), then back to NCHW.
    out = padded.permute(0, 2, 3, 1)[images, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
