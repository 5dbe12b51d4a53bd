"""Seed -> perturbation directions: versioned, fingerprinted, regenerable anywhere.

Direction ``k`` of parameter tensor ``p`` for round seed ``s`` is

    eps[s, k, p] = randn(shape_p; Generator(device).manual_seed(H(s, k, p)))

with ``H`` a fixed 63-bit hash. Every (seed, direction, parameter) triple has its own
``torch.Generator``, so any single tensor of any direction can be regenerated without
drawing the ones before it (the in-place engine needs that), and no global RNG state
is ever touched. Values are float32, drawn on ``DirectionScheme.device`` and then moved.

Two parties agree on directions only if they share ``SCHEME_VERSION`` *and* their torch
draws the same numbers on the same generation device. ``DirectionScheme.fingerprint``
hashes a probe draw, so a mismatch (other torch release, other device) is caught by
``DirectionScheme.check`` before anyone trains on garbage.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baffle.errors import SchemeMismatchError

SCHEME_VERSION = "baffle-dirs/1"
_MASK63 = (1 << 63) - 1
# Probe shapes for the fingerprint: torch's CPU normal sampler takes a scalar path below
# 16 elements and a vectorised one from 16 on, so both are covered.
_PROBE_SHAPES = ((7,), (3, 11), (64,))


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and machines)."""
    h = hashlib.blake2b(digest_size=8, person=b"baffle-seed")
    for part in parts:
        if isinstance(part, str):
            h.update(b"s" + part.encode())
        else:
            h.update(b"i" + struct.pack("<q", int(part) & _MASK63))
    return int.from_bytes(h.digest(), "little") & _MASK63


@dataclass(frozen=True)
class DirectionScheme:
    """How directions are drawn: the scheme version and the generation device."""

    version: str = SCHEME_VERSION
    device: str = "cpu"

    def generator(self, seed: int, k: int, p: int) -> torch.Generator:
        """The dedicated generator of direction ``k``, parameter tensor ``p``."""
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.version, seed, k, p))
        return g

    def fingerprint(self) -> str:
        """12 hex digits: a hash of the version, the device type and a probe draw."""
        return _fingerprint(self.version, torch.device(self.device).type)

    def check(self, version: str, fingerprint: str) -> None:
        """Raise ``SchemeMismatchError`` unless a peer's (version, fingerprint) is ours."""
        if version != self.version:
            raise SchemeMismatchError(
                f"direction scheme version {version!r} does not match ours ({self.version!r}): "
                "run the same baffle version on server and clients"
            )
        mine = self.fingerprint()
        if fingerprint != mine:
            raise SchemeMismatchError(
                f"direction fingerprint {fingerprint} does not match ours ({mine}, device "
                f"{self.device}, torch {torch.__version__}): server and clients would draw "
                "different directions; use the same torch version and generation device"
            )


@functools.lru_cache(maxsize=8)
def _fingerprint(version: str, device: str) -> str:
    scheme = DirectionScheme(version, device)
    h = hashlib.sha256(version.encode() + b"|" + device.encode())
    for p, shape in enumerate(_PROBE_SHAPES):
        draw = torch.randn(shape, generator=scheme.generator(12345, p, p), device=device)
        h.update(draw.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def direction(
    scheme: DirectionScheme, seed: int, k: int, p: int, shape: torch.Size | Sequence[int]
) -> torch.Tensor:
    """eps[seed, k, p]: one float32 tensor of shape ``shape`` on the generation device."""
    g = scheme.generator(seed, k, p)
    return torch.randn(tuple(shape), generator=g, device=scheme.device, dtype=torch.float32)


def directions(
    scheme: DirectionScheme,
    seed: int,
    ks: range,
    p: int,
    shape: torch.Size | Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Directions ``ks`` of parameter ``p`` stacked: shape ``(len(ks), *shape)``."""
    out = torch.empty((len(ks), *shape), dtype=torch.float32, device=scheme.device)
    for i, k in enumerate(ks):
        out[i].normal_(generator=scheme.generator(seed, k, p))  # same draw as ``direction``
    return out if device is None else out.to(device)


class DirectionCache:
    """Directions of one scheme kept for reuse, bit-identical to ``directions``.

    In a shared-seed round every client and the server draw the same K directions; an
    in-process simulator can hand one cache to all of them so each direction is drawn
    once. Entries are per (seed, direction, parameter); beyond ``max_bytes`` it draws
    without storing. Not thread-safe; make one per round and drop it.
    """

    def __init__(self, scheme: DirectionScheme, max_bytes: int = 512 << 20) -> None:
        self.scheme, self.max_bytes, self.bytes = scheme, max_bytes, 0
        self._store: dict[tuple[int, int, int], torch.Tensor] = {}
        self.hits = self.misses = 0

    def directions(
        self,
        seed: int,
        ks: range,
        p: int,
        shape: torch.Size | Sequence[int],
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Same values as ``directions(self.scheme, seed, ks, p, shape, device)``."""
        out = torch.empty((len(ks), *shape), dtype=torch.float32, device=self.scheme.device)
        for i, k in enumerate(ks):
            hit = self._store.get((seed, k, p))
            if hit is not None:
                self.hits += 1
                out[i].copy_(hit)
                continue
            self.misses += 1
            out[i].normal_(generator=self.scheme.generator(seed, k, p))
            size = out[i].numel() * 4
            if self.bytes + size <= self.max_bytes:
                self._store[(seed, k, p)] = out[i].clone()
                self.bytes += size
        return out if device is None else out.to(device)
