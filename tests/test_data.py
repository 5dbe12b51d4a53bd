"""Data sets: digits, the real MNIST in ../shared/data/mnist, CIFAR in its real file format."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from baffle.data import (
    CIFAR10,
    DATASETS,
    ArrayDataset,
    available_datasets,
    load_cifar,
    load_dataset,
    random_crop_flip,
)
from baffle.data import cifar as cifar_module
from baffle.data import digits as digits_module
from baffle.data import mnist as mnist_module
from baffle.data.cifar import download_cifar
from baffle.data.mnist import download_mnist
from baffle.errors import ConfigError, DataError

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Published MNIST class counts (LeCun et al.), independent of any code here.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def assert_one_line_data_error(exc: pytest.ExceptionInfo[DataError], *names: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"


# --- registry ----------------------------------------------------------------------------------


def test_registry_lists_the_data_sets() -> None:
    assert {"digits", "mnist", "cifar10", "cifar100"} <= set(DATASETS)
    assert available_datasets() == sorted(DATASETS)


def test_unknown_dataset_is_a_config_error_listing_the_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("imagenet")
    message = str(info.value)
    assert "imagenet" in message and "\n" not in message
    assert all(n in message for n in ("digits", "mnist", "cifar10", "cifar100"))


# --- ArrayDataset ----------------------------------------------------------------------------


def test_subset_takes_rows_in_order_from_numpy_or_torch_indices() -> None:
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    ds = ArrayDataset(x, torch.tensor([10, 11, 12, 13, 14]))
    for idx in (np.array([3, 0, 3]), torch.tensor([3, 0, 3])):
        sub = ds.subset(idx)
        assert len(sub) == 3
        assert sub.y.tolist() == [13, 10, 13]
        assert sub.x[:, 0, 0, 0].tolist() == [3.0, 0.0, 3.0]


def test_array_dataset_refuses_mismatched_tensors() -> None:
    with pytest.raises(DataError):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DataError):
        ArrayDataset(torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(DataError):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(3))


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_classes_and_scaling() -> None:
    raw = load_digits()
    bundle = load_dataset("digits")
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 8)
    assert bundle.augment is None and 0 < bundle.val_per_class < 100
    assert len(bundle.train) + len(bundle.test) == len(raw.target) == 1797
    assert bundle.train.x.shape[1:] == (1, 8, 8) and bundle.train.x.dtype == torch.float32
    for ds in (bundle.train, bundle.test):
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0  # raw values span 0..16
    # the test set is stratified: round(20%) of each class
    want = [round(0.2 * n) for n in np.bincount(raw.target)]
    assert np.bincount(bundle.test.y.numpy(), minlength=10).tolist() == want


def test_digits_train_and_test_partition_the_original_images() -> None:
    raw = load_digits()
    bundle = load_dataset("digits")
    original = {(row.tobytes(), int(t)) for row, t in zip(raw.images * 1.0, raw.target)}
    split = [
        ((ds.x[i, 0].double() * 16).round().numpy().tobytes(), int(ds.y[i]))
        for ds in (bundle.train, bundle.test)
        for i in range(len(ds))
    ]
    assert set(split) == original
    train = {s for s in split[: len(bundle.train)]}
    test = {s for s in split[len(bundle.train) :]}
    assert not train & test


def test_digits_are_read_as_scikit_learn_loads_them_without_importing_it() -> None:
    raw = load_digits()
    images, labels = digits_module.read_digits()
    assert np.array_equal(images, raw.images) and np.array_equal(labels, raw.target)
    # a fresh interpreter loads the set without importing scikit-learn (a second per process)
    code = ("import sys; from baffle.data import load_dataset; b = load_dataset('digits'); "
            "print(len(b.train) + len(b.test), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["1797", "False"]


def test_digits_test_set_is_fixed() -> None:
    first = load_dataset("digits")
    digits_module._digits.cache_clear()
    second = load_dataset("digits")
    assert first is not second
    assert torch.equal(first.test.x, second.test.x) and torch.equal(first.test.y, second.test.y)


# --- MNIST, real files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if not all((path / f"{name}.gz").is_file() for name in MNIST_FILES):
        pytest.skip(f"the full MNIST is not at {path} (expected ../shared/data/mnist)")
    return path


def idx_bytes(mnist_dir: Path, name: str) -> bytes:
    return gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())


def test_mnist_checksum_constants_match_the_published_sums(mnist_dir: Path) -> None:
    sums = mnist_dir / "SHA256SUMS.uncompressed"
    published = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line)
    assert mnist_module.SHA256 == published


def test_mnist_real_data(mnist_dir: Path) -> None:
    bundle = load_dataset("mnist", mnist_dir)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 32)
    assert bundle.augment is None and bundle.val_per_class == 500
    assert bundle.train.x.shape == (60_000, 1, 32, 32)
    assert bundle.test.x.shape == (10_000, 1, 32, 32)
    assert bundle.train.x.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    for ds in (bundle.train, bundle.test):
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert torch.bincount(bundle.train.y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(bundle.test.y).tolist() == MNIST_TEST_COUNTS


def test_mnist_pixels_are_the_resized_idx_images(mnist_dir: Path) -> None:
    # decode a few images straight from the IDX bytes: 16-byte header, then 28x28 uint8 rows
    raw = idx_bytes(mnist_dir, "t10k-images-idx3-ubyte")
    picks = [0, 1, 4321, 9999]
    images = np.stack(
        [np.frombuffer(raw, np.uint8, 784, 16 + 784 * i).reshape(28, 28) for i in picks]
    )
    labels = np.frombuffer(idx_bytes(mnist_dir, "t10k-labels-idx1-ubyte"), np.uint8, offset=8)
    want = F.interpolate(
        torch.tensor(images, dtype=torch.float32)[:, None] / 255.0,
        size=(32, 32),
        mode="bilinear",
        align_corners=False,
    )
    bundle = load_dataset("mnist", mnist_dir)
    torch.testing.assert_close(bundle.test.x[picks], want)
    assert bundle.test.y[picks].tolist() == labels[picks].tolist()
    assert labels[:3].tolist() == [7, 2, 1]  # the well-known first test digits


def test_mnist_uncompressed_copy_loads_the_same(mnist_dir: Path, tmp_path: Path) -> None:
    for name in MNIST_FILES:
        (tmp_path / name).write_bytes(idx_bytes(mnist_dir, name))
    plain = load_dataset("mnist", tmp_path)
    gz = load_dataset("mnist", mnist_dir)
    assert torch.equal(plain.train.x, gz.train.x) and torch.equal(plain.test.y, gz.test.y)


def _fresh_mnist(folder: Path, cache: object) -> object:
    """MNIST from ``folder`` in this process as a new process would load it: the
    in-process cache cleared, ``cache`` as the decoded-data cache folder (or "off")."""
    os.environ["BAFFLE_DECODED_CACHE"] = str(cache)
    mnist_module._load.cache_clear()
    return load_dataset("mnist", folder)


def _same(a: object, b: object) -> bool:
    return all(torch.equal(getattr(a, s).x, getattr(b, s).x)
               and torch.equal(getattr(a, s).y, getattr(b, s).y) for s in ("train", "test"))


def test_mnist_is_decoded_once_then_mapped_bit_identically(
        mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAFFLE_DECODED_CACHE", "off")  # restored after the test
    plain = _fresh_mnist(mnist_dir, "off")
    assert not tmp_path.joinpath("c").exists()
    first = _fresh_mnist(mnist_dir, tmp_path / "c")  # builds and writes the entry
    (entry,) = (tmp_path / "c").iterdir()
    assert (entry / "complete.json").is_file() and _same(first, plain)

    def no_resize(_: np.ndarray) -> np.ndarray:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(mnist_module, "resize", no_resize)
    again = _fresh_mnist(mnist_dir, tmp_path / "c")  # mapped, not decoded
    assert _same(again, plain) and again.train.x.shape == (60000, 1, 32, 32)
    mnist_module._load.cache_clear()


def test_a_damaged_cache_entry_is_rebuilt_and_a_corrupt_source_still_refused(
        mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BAFFLE_DECODED_CACHE", "off")
    folder = tmp_path / "m"
    folder.mkdir()
    for name in MNIST_FILES:
        (folder / f"{name}.gz").write_bytes((mnist_dir / f"{name}.gz").read_bytes())
    want = _fresh_mnist(folder, tmp_path / "c")
    (entry,) = (tmp_path / "c").iterdir()
    with open(entry / "train_x.npy", "r+b") as f:  # cut short, as by a full disk
        f.truncate(1000)
    with caplog.at_level("WARNING", logger="baffle.data"):
        rebuilt = _fresh_mnist(folder, tmp_path / "c")
    assert _same(rebuilt, want) and "damaged" in caplog.text
    assert (entry / "train_x.npy").stat().st_size > 200 << 20  # written whole again
    # a source file replaced by a corrupt one: another key, so it is verified, and refused
    name = "t10k-images-idx3-ubyte"
    data = bytearray(idx_bytes(mnist_dir, name))
    data[5000] ^= 0x01
    (folder / f"{name}.gz").write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError, match="SHA-256") as info:
        _fresh_mnist(folder, tmp_path / "c")
    assert_one_line_data_error(info, name)
    mnist_module._load.cache_clear()


def test_an_unwritable_cache_is_skipped(mnist_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAFFLE_DECODED_CACHE", "off")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    data = _fresh_mnist(mnist_dir, blocker / "cache")  # mkdir fails: built, not cached
    assert data.train.x.shape == (60000, 1, 32, 32) and blocker.is_file()
    mnist_module._load.cache_clear()


def test_the_cache_keeps_the_newest_entries_of_a_data_set(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from baffle.data import cache

    monkeypatch.setenv("BAFFLE_DECODED_CACHE", str(tmp_path))
    for i in range(cache.KEEP + 2):
        got = cache.cached_arrays("toy", i, lambda i=i: {"a": np.full(3, i, np.float32)})
        assert got["a"].tolist() == [i] * 3
        os.utime(tmp_path / cache.entry_key("toy", i) / "complete.json", (i + 1e9, i + 1e9))
    cache.cached_arrays("other", 0, lambda: {"a": np.zeros(1)})
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len([k for k in kept if k.startswith("toy-")]) == cache.KEEP
    assert cache.entry_key("toy", cache.KEEP + 1) in kept and cache.entry_key("toy", 0) not in kept
    assert cache.entry_key("other", 0) in kept
    hit = cache.cached_arrays("toy", cache.KEEP + 1, lambda: {"a": np.zeros(3, np.float32)})
    assert hit["a"].tolist() == [cache.KEEP + 1] * 3  # read back, not rebuilt


def copy_with(mnist_dir: Path, dest: Path, name: str, data: bytes, gz: bool) -> None:
    """A folder of links to the real files, except ``name``, written as ``data``."""
    dest.mkdir()
    for other in MNIST_FILES:
        if other != name:
            os.symlink(mnist_dir / f"{other}.gz", dest / f"{other}.gz")
    (dest / (f"{name}.gz" if gz else name)).write_bytes(data)


def test_mnist_flipped_byte_fails_the_checksum(mnist_dir: Path, tmp_path: Path) -> None:
    name = "t10k-images-idx3-ubyte"
    data = bytearray(idx_bytes(mnist_dir, name))
    data[5000] ^= 0x01  # a pixel: the file still parses
    copy_with(mnist_dir, tmp_path / "m", name, bytes(data), gz=False)
    with pytest.raises(DataError, match="SHA-256") as info:
        load_dataset("mnist", tmp_path / "m")
    assert_one_line_data_error(info, name)


def test_mnist_flipped_byte_in_gzip_is_refused(mnist_dir: Path, tmp_path: Path) -> None:
    name = "train-labels-idx1-ubyte"
    data = bytearray((mnist_dir / f"{name}.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy_with(mnist_dir, tmp_path / "m", name, bytes(data), gz=True)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path / "m")
    assert_one_line_data_error(info, name)


def test_mnist_truncated_gzip_is_refused(mnist_dir: Path, tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte"
    data = (mnist_dir / f"{name}.gz").read_bytes()
    copy_with(mnist_dir, tmp_path / "m", name, data[: len(data) // 2], gz=True)
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", tmp_path / "m")
    assert_one_line_data_error(info, name)


@pytest.mark.parametrize("keep", [100, 10])  # cut in the pixels; cut inside the header
def test_mnist_truncated_plain_file_is_refused(mnist_dir: Path, tmp_path: Path, keep: int) -> None:
    name = "t10k-images-idx3-ubyte"
    copy_with(mnist_dir, tmp_path / "m", name, idx_bytes(mnist_dir, name)[:keep], gz=False)
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", tmp_path / "m")
    assert_one_line_data_error(info, name)


def test_mnist_bad_magic_is_refused(mnist_dir: Path, tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte"
    data = bytearray(idx_bytes(mnist_dir, name))
    data[3] = 0x03  # claims 3 dimensions: an images file where labels belong
    copy_with(mnist_dir, tmp_path / "m", name, bytes(data), gz=False)
    with pytest.raises(DataError, match="magic") as info:
        load_dataset("mnist", tmp_path / "m")
    assert_one_line_data_error(info, name)


def test_mnist_missing_folder_and_missing_file(mnist_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("mnist", tmp_path / "nowhere")
    assert_one_line_data_error(info, "nowhere", "--download")
    (tmp_path / "m").mkdir()
    for name in MNIST_FILES[:3]:
        os.symlink(mnist_dir / f"{name}.gz", tmp_path / "m" / f"{name}.gz")
    with pytest.raises(DataError, match="missing") as info:
        load_dataset("mnist", tmp_path / "m")
    assert_one_line_data_error(info, MNIST_FILES[3], "--data-dir", "--download")


def test_mnist_download_tries_mirrors_in_turn(mnist_dir: Path, tmp_path: Path) -> None:
    # file:// mirrors exercise the real urllib path offline; the first one is dead
    dead = (tmp_path / "dead").as_uri()
    download_mnist(tmp_path / "cache", mirrors=[dead, mnist_dir.as_uri()])
    for name in MNIST_FILES:
        got = (tmp_path / "cache" / f"{name}.gz").read_bytes()
        assert got == (mnist_dir / f"{name}.gz").read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{n}.gz" for n in MNIST_FILES
    )  # no temporary files left behind


def test_mnist_download_refuses_a_bad_mirror(mnist_dir: Path, tmp_path: Path) -> None:
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    cache.mkdir()
    name = "train-labels-idx1-ubyte"
    for other in MNIST_FILES:  # the cache already holds the others: only `name` is fetched
        if other != name:
            os.symlink(mnist_dir / f"{other}.gz", cache / f"{other}.gz")
    data = idx_bytes(mnist_dir, name)
    data = data[:-1] + bytes([data[-1] ^ 1])  # same size, one label off
    (mirror / f"{name}.gz").write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="could not download") as info:
        download_mnist(cache, mirrors=[mirror.as_uri()])
    assert_one_line_data_error(info, name, "SHA-256")
    assert not any(name in p.name for p in cache.iterdir())


def test_mnist_download_failure_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist_module, "MIRRORS", ("http://127.0.0.1:9/",))  # nothing listens
    with pytest.raises(DataError, match="could not download") as info:
        load_dataset("mnist", tmp_path / "cache", download=True)
    assert_one_line_data_error(info, "--data-dir")


# --- CIFAR, tiny files in the real format ----------------------------------------------------


def fake_batches(
    rng: np.random.Generator, names: list[str], per_file: int, num_classes: int, label_key: bytes
) -> dict[str, dict[bytes, object]]:
    out: dict[str, dict[bytes, object]] = {}
    for name in names:
        batch: dict[bytes, object] = {
            b"batch_label": f"fake {name}".encode(),
            b"data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, size=per_file).tolist(),
            b"filenames": [f"img_{i}.png".encode() for i in range(per_file)],
        }
        if label_key == b"fine_labels":
            batch[b"coarse_labels"] = rng.integers(0, 20, size=per_file).tolist()
        out[name] = batch
    return out


def write_cifar10(root: Path, seed: int = 0) -> dict[str, dict[bytes, object]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = fake_batches(np.random.default_rng(seed), names, 4, 10, b"labels")
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def write_cifar100(root: Path, seed: int = 0) -> dict[str, dict[bytes, object]]:
    batches = fake_batches(np.random.default_rng(seed), ["train", "test"], 6, 100, b"fine_labels")
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [b"x"] * 100, b"coarse_label_names": [b"y"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def tar_folder(root: Path, folder: str, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / folder, arcname=folder)


def expected_images(batches: list[dict[bytes, object]], mean: tuple, std: tuple) -> torch.Tensor:
    """Rows are 1024 red, 1024 green, 1024 blue bytes, each plane row-major 32x32."""
    out = []
    for batch in batches:
        data = np.asarray(batch[b"data"], dtype=np.float64)
        for row in data:
            planes = [
                (row[c * 1024 : (c + 1) * 1024].reshape(32, 32) / 255 - mean[c]) / std[c]
                for c in range(3)
            ]
            out.append(np.stack(planes))
    return torch.tensor(np.stack(out), dtype=torch.float32)


def test_cifar10_folder_loads_and_normalizes(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    bundle = load_dataset("cifar10", tmp_path)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, 32)
    assert bundle.val_per_class == 500 and bundle.augment is not None
    assert bundle.train.x.shape == (20, 3, 32, 32) and bundle.test.x.shape == (4, 3, 32, 32)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    torch.testing.assert_close(bundle.train.x, expected_images(train, mean, std))
    torch.testing.assert_close(
        bundle.test.x, expected_images([batches["test_batch"]], mean, std)
    )
    assert bundle.train.y.tolist() == sum((b[b"labels"] for b in train), [])
    assert bundle.test.y.tolist() == batches["test_batch"][b"labels"]
    assert bundle.train.y.dtype == torch.int64


def test_cifar_channel_layout(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    first = batches["data_batch_1"][b"data"]
    assert isinstance(first, np.ndarray)
    first[0, :1024], first[0, 1024:2048], first[0, 2048:] = 255, 0, 51  # red=1, green=0, b=0.2
    first[0, 1024 + 32 * 3 + 7] = 255  # one green pixel at row 3, column 7
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps(batches["data_batch_1"]))
    image = load_dataset("cifar10", tmp_path).train.x[0]
    std = torch.tensor([0.2470, 0.2435, 0.2616])
    raw = image * std[:, None, None] + torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    torch.testing.assert_close(raw[0], torch.ones(32, 32))
    torch.testing.assert_close(raw[2], torch.full((32, 32), 0.2))
    green = torch.zeros(32, 32)
    green[3, 7] = 1.0
    torch.testing.assert_close(raw[1], green)


def test_cifar_reads_pickles_that_name_numpy_core(tmp_path: Path) -> None:
    # The published files were written by Python 2 with numpy 1: their arrays are rebuilt by
    # numpy.core.multiarray._reconstruct, which numpy 2 calls numpy._core.multiarray.
    batches = write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    old = pickle.dumps(batches["data_batch_2"], protocol=2)
    old = old.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old
    path.write_bytes(old)
    bundle = load_dataset("cifar10", tmp_path)
    assert bundle.train.y[4:8].tolist() == batches["data_batch_2"][b"labels"]
    data = batches["data_batch_2"][b"data"]
    assert isinstance(data, np.ndarray)
    red = torch.tensor(data[:, :1024].reshape(4, 32, 32) / 255.0, dtype=torch.float32)
    torch.testing.assert_close(bundle.train.x[4:8, 0], (red - 0.4914) / 0.2470)


def test_cifar_is_decoded_once_then_mapped_and_a_changed_file_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load writes the normalized arrays to the decoded-data cache; a new
    process (the in-process cache cleared) maps them bit for bit without unpickling; a
    file replaced afterwards changes the key, so it is read, and a corrupt one refused."""
    batches = write_cifar10(tmp_path / "data")
    monkeypatch.setenv("BAFFLE_DECODED_CACHE", str(tmp_path / "c"))
    cifar_module._load.cache_clear()
    first = load_dataset("cifar10", tmp_path / "data")
    (entry,) = (tmp_path / "c").iterdir()
    assert entry.name.startswith("cifar10-") and (entry / "complete.json").is_file()
    unpickle = cifar_module._unpickle

    def no_unpickle(data: bytes, where: str) -> dict[bytes, object]:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cifar_module, "_unpickle", no_unpickle)
    cifar_module._load.cache_clear()
    again = load_dataset("cifar10", tmp_path / "data")
    assert _same(again, first) and again.train.x.shape == (20, 3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    torch.testing.assert_close(again.test.x, expected_images([batches["test_batch"]], mean, std))

    monkeypatch.setattr(cifar_module, "_unpickle", unpickle)
    path = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])  # cut short: a new stamp, so read again
    cifar_module._load.cache_clear()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path / "data")
    cifar_module._load.cache_clear()


def test_cifar10_tarball_equals_folder(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "src")
    tar_folder(tmp_path / "src", "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    from_tar = load_dataset("cifar10", tmp_path)
    from_folder = load_dataset("cifar10", tmp_path / "src")
    assert torch.equal(from_tar.train.x, from_folder.train.x)
    assert torch.equal(from_tar.test.y, from_folder.test.y)
    # the extracted folder itself is accepted as data_dir too
    itself = load_dataset("cifar10", tmp_path / "src" / "cifar-10-batches-py")
    assert torch.equal(itself.train.x, from_folder.train.x)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    batches = write_cifar100(tmp_path / "src")
    tar_folder(tmp_path / "src", "cifar-100-python", tmp_path / "cifar-100-python.tar.gz")
    for root in (tmp_path, tmp_path / "src"):
        bundle = load_dataset("cifar100", root)
        assert bundle.num_classes == 100 and bundle.val_per_class == 50
        assert bundle.train.x.shape == (6, 3, 32, 32) and bundle.test.x.shape == (6, 3, 32, 32)
        assert bundle.train.y.tolist() == batches["train"][b"fine_labels"]
        assert bundle.test.y.tolist() == batches["test"][b"fine_labels"]
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
        torch.testing.assert_close(bundle.train.x, expected_images([batches["train"]], mean, std))


@pytest.mark.parametrize(
    "content",
    [b"not a pickle at all", None, b"cos\nsystem\n(S'true'\ntR."],
    ids=["garbage", "truncated", "code"],
)
def test_cifar_corrupt_pickle_is_refused(tmp_path: Path, content: bytes | None) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500] if content is None else content)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path)
    assert_one_line_data_error(info, "data_batch_3")
    if content is not None and b"system" in content:
        assert "os.system" in str(info.value)  # refused by name, never called


def test_cifar_wrong_contents_are_refused(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = dict(batches["test_batch"]) | {b"labels": [0, 1, 2, 10]}  # 10 is not a class
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="labels") as info:
        load_dataset("cifar10", tmp_path)
    assert_one_line_data_error(info, "test_batch")
    batch = dict(batches["test_batch"]) | {b"data": np.zeros((4, 100), np.uint8)}
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path)
    assert_one_line_data_error(info, "test_batch")


def test_cifar_truncated_tarball_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    tar_folder(tmp_path / "src", "cifar-10-batches-py", archive)
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path)
    assert_one_line_data_error(info, "cifar-10-python.tar.gz")


def test_cifar_missing_data_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("cifar100", tmp_path)
    assert_one_line_data_error(info, "cifar-100-python", "--download")


def test_cifar_download_checks_md5_and_lands_atomically(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "src")
    served = tmp_path / "served.tar.gz"
    tar_folder(tmp_path / "src", "cifar-10-batches-py", served)
    cache = tmp_path / "cache"
    # the published MD5 does not match our tiny archive: refused, nothing left behind
    with pytest.raises(DataError, match="MD5") as info:
        download_cifar(CIFAR10, cache, url=served.as_uri())
    assert_one_line_data_error(info, "cifar-10-python.tar.gz")
    assert list(cache.iterdir()) == []
    # with the archive's own MD5 the download lands and loads
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    spec = dataclasses.replace(CIFAR10, md5=md5, url=served.as_uri())
    bundle = load_cifar(spec, cache, download=True)
    assert (cache / "cifar-10-python.tar.gz").read_bytes() == served.read_bytes()
    assert bundle.train.x.shape == (20, 3, 32, 32)


# --- augmentation ----------------------------------------------------------------------------


def test_augment_is_deterministic_and_keeps_shape(tmp_path: Path) -> None:
    batch = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = random_crop_flip(batch, torch.Generator().manual_seed(7))
    b = random_crop_flip(batch, torch.Generator().manual_seed(7))
    c = random_crop_flip(batch, torch.Generator().manual_seed(8))
    assert a.shape == batch.shape and a.dtype == batch.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    write_cifar10(tmp_path)
    assert load_dataset("cifar10", tmp_path).augment is random_crop_flip


def test_augment_is_a_padded_crop_possibly_flipped() -> None:
    # brute force: every output image must equal one of the 9x9 crops of the zero-padded
    # input, flipped or not; and over 64 images both flips and several offsets must occur
    batch = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = random_crop_flip(batch, torch.Generator().manual_seed(2))
    padded = F.pad(batch, (4, 4, 4, 4))
    seen = set()
    for i in range(len(batch)):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, dy : dy + 32, dx : dx + 32].flip(-1)
                if flip
                else padded[i, :, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert matches, f"image {i} is not a crop of its padded input"
        seen.add(matches[0])
    assert {m[2] for m in seen} == {False, True}
    assert len({m[:2] for m in seen}) > 20
