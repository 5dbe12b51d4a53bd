"""Seed -> perturbation directions: versioned, fingerprinted, regenerable anywhere.

Direction ``k`` of parameter tensor ``p`` for round seed ``s`` is

    eps[s, k, p] = randn(shape_p; Generator(device).manual_seed(H(s, k, p)))

with ``H`` a fixed 63-bit hash. Every (seed, direction, parameter) triple has its own
``torch.Generator``, so any single tensor of any direction can be regenerated without
drawing the ones before it (the in-place engine needs that), and no global RNG state
is ever touched. Values are float32, drawn on ``DirectionScheme.device`` and then moved.

A scheme may restrict each direction to one *block* of parameter tensors (``blocks[p]``
is the block of tensor ``p``; ``layer_blocks`` makes one block per layer). With L blocks,
direction ``k`` moves only block ``b(k) = k mod L`` and is zero elsewhere; its nonzero
entries are the very draws above. Block b then gets ``K_b = #{k < K : k mod L = b}``
directions of its own and the reconstruction averages within each block:

    g_b = 1/(K_b sigma) * sum_{k: b(k) = b} d_k eps_k      (forward; central halves it)

which is unbiased for the block's gradient by Stein's identity applied to that block
alone. ``weights(K)`` gives the factors K / K_b(k) that turn the usual 1/(K sigma) into
this. Restricting the support removes the cross-talk between layers: the error on a layer
with a small gradient no longer carries the other layers' gradients.

Two parties agree on directions only if they share ``SCHEME_VERSION``, the block layout
*and* their torch draws the same numbers on the same generation device.
``DirectionScheme.fingerprint`` hashes the layout and a probe draw, so a mismatch (other
torch release, other device, other layout) is caught by ``DirectionScheme.check`` before
anyone trains on garbage.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baffle.errors import ConfigError, SchemeMismatchError

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


def layer_blocks(names: Sequence[str]) -> tuple[int, ...]:
    """One block per layer: parameter tensors named ``a.b.weight`` and ``a.b.bias`` share
    the block of module ``a.b``; blocks are numbered in order of first appearance."""
    ids: dict[str, int] = {}
    return tuple(ids.setdefault(n.rpartition(".")[0], len(ids)) for n in names)


@dataclass(frozen=True)
class DirectionScheme:
    """How directions are drawn: the scheme version, the generation device and the block
    of each parameter tensor (empty: every direction moves every tensor, as in the paper)."""

    version: str = SCHEME_VERSION
    device: str = "cpu"
    blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.blocks and sorted(set(self.blocks)) != list(range(max(self.blocks) + 1)):
            raise ValueError(f"blocks must number 0..L-1 with none skipped (got {self.blocks})")

    @functools.cached_property
    def n_blocks(self) -> int:  # cached: ``perturbs`` asks once per (direction, tensor)
        return max(self.blocks) + 1 if self.blocks else 1

    def perturbs(self, k: int, p: int) -> bool:
        """Whether direction ``k`` moves parameter tensor ``p`` (else it is zero there)."""
        return not self.blocks or k % self.n_blocks == self.blocks[p]

    def moving(self, p: int, K: int) -> range:
        """The directions k < K that move tensor ``p``: all, or its block's b, b+L, ..."""
        return range(self.blocks[p], K, self.n_blocks) if self.blocks else range(K)

    def weights(self, K: int) -> list[float]:
        """K / K_b(k) for k < K: the per-direction factors of the blockwise average (all
        1 without blocks). Raises ``ConfigError`` if some block would get no direction."""
        L = self.n_blocks
        if K < L:
            raise ConfigError(f"K={K} leaves some of the {L} perturbed layers without a "
                              f"direction: use K >= {L} or --perturb all")
        counts = [len(range(b, K, L)) for b in range(L)]
        return [K / counts[k % L] for k in range(K)]

    def generator(self, seed: int, k: int, p: int) -> torch.Generator:
        """The dedicated generator of direction ``k``, parameter tensor ``p``."""
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.version, seed, k, p))
        return g

    def fingerprint(self) -> str:
        """12 hex digits: a hash of the version, the device type, the blocks and a probe draw."""
        return _fingerprint(self.version, torch.device(self.device).type, self.blocks)

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
                f"{self.device}, {self.n_blocks} block(s), torch {torch.__version__}): server "
                "and clients would draw different directions; use the same torch version, "
                "generation device, model and --perturb"
            )


@functools.lru_cache(maxsize=8)
def _fingerprint(version: str, device: str, blocks: tuple[int, ...]) -> str:
    scheme = DirectionScheme(version, device)
    h = hashlib.sha256(version.encode() + b"|" + device.encode())
    if blocks:  # the dense scheme keeps the fingerprint it always had
        h.update(b"|blocks:" + ",".join(map(str, blocks)).encode())
    for p, shape in enumerate(_PROBE_SHAPES):
        draw = torch.randn(shape, generator=scheme.generator(12345, p, p), device=device)
        h.update(draw.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def direction(
    scheme: DirectionScheme, seed: int, k: int, p: int, shape: torch.Size | Sequence[int]
) -> torch.Tensor:
    """eps[seed, k, p]: one float32 tensor of shape ``shape`` on the generation device
    (zeros where the scheme's blocks say direction ``k`` does not move tensor ``p``)."""
    if not scheme.perturbs(k, p):
        return torch.zeros(tuple(shape), device=scheme.device, dtype=torch.float32)
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
    make = torch.zeros if scheme.blocks else torch.empty
    out = make((len(ks), *shape), dtype=torch.float32, device=scheme.device)
    for i, k in enumerate(ks):
        if scheme.perturbs(k, p):
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
        make = torch.zeros if self.scheme.blocks else torch.empty
        out = make((len(ks), *shape), dtype=torch.float32, device=self.scheme.device)
        for i, k in enumerate(ks):
            if not self.scheme.perturbs(k, p):
                continue
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
