"""Decoded data sets on disk: arrays built once, then memory-mapped by every later process.

A Flower node starts a new ClientApp process for every message, and each one decoded,
verified and resized all 70,000 MNIST images (0.6 s of one core) to read one client's
shard. ``cached_arrays`` keeps what a loader builds as ``.npy`` files under a key that
hashes the loader's inputs (its source files' paths, sizes and modification times, the
preprocessing, torch's version); a later process maps them copy-on-write, so it reads
only the pages it indexes, bit for bit what the loader built.

``BAFFLE_DECODED_CACHE`` names the folder (default ``~/.cache/baffle/decoded``);
``off`` (or ``0``, empty) turns the cache off. A cache that cannot be written is skipped
(the arrays are then built each time), a damaged entry (a file cut short, a missing
array) is rebuilt, and only the newest ``KEEP`` entries of a data set stay (each MNIST
entry is 274 MiB). The entries are not checksummed: the key covers the inputs, not the
bits on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger("baffle.data")

ENV = "BAFFLE_DECODED_CACHE"
DEFAULT_ROOT = Path("~/.cache/baffle/decoded")
FORMAT = 1  # bump when what an entry holds changes
KEEP = 3  # entries kept per data set (other files, paths or torch versions): the newest
_DONE = "complete.json"  # written last: an entry without it was cut short


def cache_root() -> Path | None:
    """The cache folder, or None if ``BAFFLE_DECODED_CACHE`` turns the cache off."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    return Path(value or DEFAULT_ROOT).expanduser()


def entry_key(name: str, parts: object) -> str:
    """A file-name-safe key for ``name`` built from ``parts`` (anything ``repr`` spells)."""
    return f"{name}-{hashlib.sha256(repr((FORMAT, name, parts)).encode()).hexdigest()[:32]}"


def name_of(entry: Path) -> str:
    return entry.name.rsplit("-", 1)[0]


def _age(entry: Path) -> float:
    """Newest first: by when the entry was written (its marker's modification time)."""
    try:
        return -(entry / _DONE).stat().st_mtime
    except OSError:
        return 0.0


def _read(entry: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a complete entry, memory-mapped copy-on-write; None if it is not."""
    try:
        names = json.loads((entry / _DONE).read_text())["arrays"]
        return {n: np.load(entry / f"{n}.npy", mmap_mode="c") for n in names}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("decoded-data cache entry %s is damaged (%s); rebuilding it", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write(root: Path, entry: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to a temporary folder beside ``entry`` and rename it into place
    (another process that got there first wins; both wrote the same arrays)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
    except OSError as exc:
        log.debug("decoded-data cache %s is not writable (%s); not caching", root, exc)
        return
    try:
        for n, a in arrays.items():
            np.save(tmp / f"{n}.npy", np.ascontiguousarray(a))
        (tmp / _DONE).write_text(json.dumps({"arrays": list(arrays)}))
        os.replace(tmp, entry)
        for old in sorted(root.glob(f"{name_of(entry)}-*"), key=_age)[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)  # the oldest entries of this data set
    except OSError as exc:
        log.debug("could not write decoded-data cache entry %s (%s)", entry, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_arrays(name: str, parts: object,
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from the cache entry for (``name``, ``parts``) if there is a
    complete one, else built and stored there. ``parts`` must name everything the arrays
    depend on: another value gives another entry."""
    root = cache_root()
    if root is None:
        return build()
    entry = root / entry_key(name, parts)
    hit = _read(entry)
    if hit is not None:
        return hit
    arrays = build()
    _write(root, entry, arrays)
    return arrays
