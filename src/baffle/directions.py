"""Seed -> perturbation directions: versioned, fingerprinted, regenerable anywhere.

Direction ``k`` of parameter tensor ``p`` for round seed ``s`` is

    eps[s, k, p] = randn(shape_p; Generator(device).manual_seed(H(s, k, p)))

with ``H`` a fixed 63-bit hash. Every (seed, direction, parameter) triple has its own
``torch.Generator``, so any single tensor of any direction can be regenerated without
drawing the ones before it (the in-place engine needs that), and no global RNG state
is ever touched. Values are float32, drawn on ``DirectionScheme.device`` and then moved.

A scheme may restrict each direction to one *block* of parameter tensors (``blocks[p]``
is the block of tensor ``p``; ``layer_blocks`` makes one block per layer). With L blocks,
direction ``k`` moves only block ``b(k) = c[k mod len(c)]`` and is zero elsewhere, for a
fixed *cycle* ``c`` that names every block at least once (by default ``0, 1, ..., L-1``,
so ``b(k) = k mod L``; a cycle such as ``0, 1, 1, 2`` gives block 1 half the directions).
Its nonzero entries are the very draws above. Block b then gets
``K_b = #{k < K : b(k) = b}`` directions of its own and the reconstruction averages
within each block:

    g_b = 1/(K_b sigma) * sum_{k: b(k) = b} d_k eps_k      (forward; central halves it)

which is unbiased for the block's gradient by Stein's identity applied to that block
alone. ``weights(K)`` gives the factors K / K_b(k) that turn the usual 1/(K sigma) into
this. Restricting the support removes the cross-talk between layers: the error on a layer
with a small gradient no longer carries the other layers' gradients.

Sampler ``counter`` (``--sampler counter``) replaces the per-tensor generators by a
counter-based hash, so every direction of a tensor comes from one batch of elementwise
ops instead of one generator and one launch per (direction, tensor), which is what bounds
a GPU step. Entry i of eps[s, k, p], with n_p entries in tensor p, is

    z = mix64(key(s, p) + (k n_p + i) * 0x9E3779B97F4A7C15)     (splitmix64's finaliser)
    u1 = (bits 40..63 of z + 1) / 2^24,   u2 = (bits 16..39 of z) / 2^24
    eps = sqrt(-2 ln u1) cos(2 pi u2)                             (Box-Muller)

a standard normal truncated at |eps| <= sqrt(48 ln 2) = 5.77; any subset of directions
is drawn without the others. On a CPU its draw takes about 3x torch's (a LeNet step runs
at 0.89x; BENCHMARKS.md, samplers), so ``torch`` stays the default.

A scheme may instead confine every direction to an r-dimensional subspace of the weights,
the column span of an orthonormal ``Basis`` U (d x r) that the server sends (``--guide-dims``,
``baffle.guide``). Direction k is then

    eps[s, k] = U z_k,   z_k = the draw above for a tensor of shape (r,) at index GUIDE_TENSOR

so eps[s, k, p] = U_p z_k with U_p the rows of U that belong to tensor p, computed one
direction at a time (the same bits whichever directions are drawn with it). The forward
estimate then tends, as sigma -> 0, to U (1/K sum z z^T) U^T g: unbiased for U U^T g, the
gradient's part in the span, with an error that grows with r instead of d. With K > r
measurements the server may instead solve for the span's r coordinates by least squares
(``--guide-solve``, ``baffle.reconstruct.solve_in_span``): then which directions were
drawn no longer adds any error.

Two parties agree on directions only if they share ``SCHEME_VERSION``, the sampler, the
block layout, the basis *and* their torch draws the same numbers on the same generation device.
``DirectionScheme.fingerprint`` hashes the sampler, the layout, the basis's digest and a
probe draw, so a mismatch (other torch release, device, sampler, layout or basis) is caught by
``DirectionScheme.check`` before anyone trains on garbage.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from baffle.errors import ConfigError, SchemeMismatchError

SCHEME_VERSION = "baffle-dirs/1"
SAMPLERS = ("torch", "counter")
_MASK63 = (1 << 63) - 1
# Probe shapes for the fingerprint: torch's CPU normal sampler takes a scalar path below
# 16 elements and a vectorised one from 16 on, so both are covered.
_PROBE_SHAPES = ((7,), (3, 11), (64,))
# the tensor index whose draws are a guided direction's coordinates z_k in its basis
GUIDE_TENSOR = 1 << 30


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and machines)."""
    return _seed_of(_hashed(None, parts))


def _hashed(prefix: hashlib._Hash | None, parts: Sequence[int | str]) -> hashlib._Hash:
    """The seed hash after ``parts``, continuing a copy of ``prefix`` (a hash of earlier
    parts) if given: derive_seed(*a, *b) == _seed_of(_hashed(_hashed(None, a), b))."""
    h = hashlib.blake2b(digest_size=8, person=b"baffle-seed") if prefix is None else prefix.copy()
    for part in parts:
        if isinstance(part, str):
            h.update(b"s" + part.encode())
        else:
            h.update(b"i" + struct.pack("<q", int(part) & _MASK63))
    return h


def _seed_of(h: hashlib._Hash) -> int:
    return int.from_bytes(h.digest(), "little") & _MASK63


def layer_blocks(names: Sequence[str]) -> tuple[int, ...]:
    """One block per layer: parameter tensors named ``a.b.weight`` and ``a.b.bias`` share
    the block of module ``a.b``; blocks are numbered in order of first appearance."""
    ids: dict[str, int] = {}
    return tuple(ids.setdefault(n.rpartition(".")[0], len(ids)) for n in names)


class Basis:
    """An orthonormal basis U (d x r) of a subspace of the trainable weights, split by
    rows into one (n_p x r) block per parameter tensor; equal (and hashed) by a digest of
    its float32 bytes, so two parties holding the same numbers hold the same basis."""

    def __init__(self, columns: torch.Tensor, sizes: Sequence[int]) -> None:
        if columns.ndim != 2 or columns.shape[0] != sum(sizes):
            raise ValueError(f"a basis of {sum(sizes)} weights needs {sum(sizes)} rows "
                             f"(got shape {tuple(columns.shape)})")
        u = columns.detach().to("cpu", torch.float32).contiguous()
        self.dims = u.shape[1]
        self.blocks = tuple(b.contiguous() for b in u.split(list(sizes)))
        self.digest = hashlib.sha256(u.numpy().tobytes()).hexdigest()[:16]
        self._moved: dict[tuple[str, int], torch.Tensor] = {}  # blocks on other devices

    def block(self, p: int, device: torch.device) -> torch.Tensor:
        """U_p (n_p x r) on ``device``, copied there once."""
        if device.type == "cpu":
            return self.blocks[p]
        key = (str(device), p)
        if key not in self._moved:
            self._moved[key] = self.blocks[p].to(device)
        return self._moved[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Basis) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Basis(d={sum(len(b) for b in self.blocks)}, r={self.dims}, {self.digest})"


@dataclass(frozen=True)
class DirectionScheme:
    """How directions are drawn: the scheme version, the generation device and the block
    of each parameter tensor (empty: every direction moves every tensor, as in the paper)."""

    version: str = SCHEME_VERSION
    device: str = "cpu"
    blocks: tuple[int, ...] = ()
    sampler: str = "torch"  # torch: one generator per (direction, tensor) | counter
    cycle: tuple[int, ...] = ()  # direction k moves block cycle[k % len]; () = 0..L-1
    basis: Basis | None = None  # every direction U z in the span of U (None: all of R^d)

    def __post_init__(self) -> None:
        if self.basis is not None and self.blocks:
            raise ValueError("a basis confines directions to a subspace of every weight; "
                             "it cannot be combined with blocks (layer directions)")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} (got {self.sampler!r})")
        if self.blocks and sorted(set(self.blocks)) != list(range(max(self.blocks) + 1)):
            raise ValueError(f"blocks must number 0..L-1 with none skipped (got {self.blocks})")
        if self.cycle and not self.blocks:
            raise ValueError("a cycle of blocks needs blocks (layer directions)")
        if self.cycle and sorted(set(self.cycle)) != list(range(self.n_blocks)):
            raise ValueError(f"the cycle must name each of the {self.n_blocks} block(s) "
                             f"0..{self.n_blocks - 1} at least once and no other "
                             f"(got {self.cycle})")
        if self.cycle == tuple(range(self.n_blocks)):  # the default, spelled out
            object.__setattr__(self, "cycle", ())

    @functools.cached_property
    def n_blocks(self) -> int:  # cached: ``perturbs`` asks once per (direction, tensor)
        return max(self.blocks) + 1 if self.blocks else 1

    @functools.cached_property
    def _cycle(self) -> tuple[int, ...]:
        return self.cycle or tuple(range(self.n_blocks))

    def block_of(self, k: int) -> int:
        """The block direction ``k`` moves: ``cycle[k mod len(cycle)]`` (0 without blocks)."""
        return self._cycle[k % len(self._cycle)] if self.blocks else 0

    def perturbs(self, k: int, p: int) -> bool:
        """Whether direction ``k`` moves parameter tensor ``p`` (else it is zero there)."""
        return not self.blocks or self.block_of(k) == self.blocks[p]

    def moving(self, p: int, K: int) -> Sequence[int]:
        """The directions k < K that move tensor ``p``, ascending: all, or its block's
        (b, b+L, ... under the default cycle)."""
        if not self.blocks:
            return range(K)
        if not self.cycle:
            return range(self.blocks[p], K, self.n_blocks)
        return [k for k in range(K) if self.block_of(k) == self.blocks[p]]

    def weights(self, K: int) -> list[float]:
        """K / K_b(k) for k < K: the per-direction factors of the blockwise average (all
        1 without blocks). Raises ``ConfigError`` if some block would get no direction."""
        cycle = self._cycle
        need = max(cycle.index(b) for b in range(self.n_blocks)) + 1  # first K covering all
        if K < need:
            raise ConfigError(f"K={K} leaves some of the {self.n_blocks} perturbed layers "
                              f"without a direction: use K >= {need} or --perturb all")
        counts = [0] * self.n_blocks
        for k in range(K):
            counts[self.block_of(k)] += 1
        return [K / counts[self.block_of(k)] for k in range(K)]

    def direction_seeds(self, seed: int) -> Callable[[int, int], int]:
        """(k, p) -> derive_seed(version, seed, k, p): the seed of the torch sampler's
        generator for direction ``k``, parameter tensor ``p`` (the hash of (version, seed)
        computed once)."""
        prefix = _hashed(None, (self.version, seed))
        return lambda k, p: _seed_of(_hashed(prefix, (k, p)))

    def counter_key(self, seed: int, p: int) -> int:
        """key(s, p) of the counter sampler: one hash key per (seed, tensor)."""
        return derive_seed(self.version, "counter", seed, p)

    def fingerprint(self) -> str:
        """12 hex digits: a hash of the version, the device type, the sampler, the blocks,
        their cycle, the basis's digest and a probe draw."""
        return _fingerprint(self.version, torch.device(self.device).type, self.blocks,
                            self.sampler, self.cycle,
                            "" if self.basis is None else self.basis.digest)

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
                f"{self.device}, {self.sampler} sampler, {self.n_blocks} block(s), torch "
                f"{torch.__version__}): server and clients would draw different directions; "
                "use the same torch version, generation device, --sampler, model, --perturb "
                "and --layer-cycle, and the server's latest basis (--guide-dims)"
            )


@functools.lru_cache(maxsize=8)
def _fingerprint(version: str, device: str, blocks: tuple[int, ...], sampler: str,
                 cycle: tuple[int, ...] = (), basis: str = "") -> str:
    scheme = DirectionScheme(version, device, sampler=sampler)
    h = hashlib.sha256(version.encode() + b"|" + device.encode())
    if blocks:  # the dense scheme keeps the fingerprint it always had
        h.update(b"|blocks:" + ",".join(map(str, blocks)).encode())
    if sampler != "torch":  # and so does the default sampler
        h.update(b"|sampler:" + sampler.encode())
    if cycle:  # and the default cycle 0..L-1
        h.update(b"|cycle:" + ",".join(map(str, cycle)).encode())
    if basis:  # and so does every scheme without one
        h.update(b"|basis:" + basis.encode())
    for p, shape in enumerate(_PROBE_SHAPES):
        draw = directions(scheme, 12345, range(p, p + 1), p, shape)[0]
        h.update(draw.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _i64(c: int) -> int:
    """A 64-bit constant as torch's signed int64 (same bits)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


_GOLDEN, _MIX1, _MIX2 = (_i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9),
                         _i64(0x94D049BB133111EB))


_CPU_BLOCK = 1 << 18  # entries per batch on a CPU: the int64 intermediates stay in cache


def counter_normals(key: int, ks: Sequence[int], n: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The counter sampler: row r holds entries 0..n-1 of direction ``ks[r]`` under hash
    key ``key``, shape (len(ks), n), float32 (formula in the module docstring). Integer
    products wrap modulo 2^64, as splitmix64's do. Every entry depends on its own index
    only, so a CPU computes the rows in cache-sized batches (1.6x faster, same values)."""
    if torch.device(device).type != "cpu" or len(ks) * n <= _CPU_BLOCK:
        return _counter_rows(key, ks, n, device)
    rows = max(1, _CPU_BLOCK // n)
    return torch.cat([_counter_rows(key, ks[i:i + rows], n, device)
                      for i in range(0, len(ks), rows)])


def _counter_rows(key: int, ks: Sequence[int], n: int,
                  device: torch.device | str) -> torch.Tensor:
    if isinstance(ks, range):  # made on the device: no host-to-device copy
        k = torch.arange(ks.start, ks.stop, ks.step, dtype=torch.int64, device=device)
    else:
        k = torch.as_tensor(list(ks), dtype=torch.int64, device=device)
    z = (k * n)[:, None] + torch.arange(n, dtype=torch.int64, device=device)
    z = z * _GOLDEN + _i64(key)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u1 = (_shr(z, 40) + 1).to(torch.float32).mul_(2.0 ** -24)
    u2 = ((z >> 16) & 0xFFFFFF).to(torch.float32).mul_(2 * math.pi * 2.0 ** -24)
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.cos_())


def direction(
    scheme: DirectionScheme, seed: int, k: int, p: int, shape: torch.Size | Sequence[int]
) -> torch.Tensor:
    """eps[seed, k, p]: one float32 tensor of shape ``shape`` on the generation device
    (zeros where the scheme's blocks say direction ``k`` does not move tensor ``p``)."""
    return directions(scheme, seed, range(k, k + 1), p, shape)[0]


def directions(
    scheme: DirectionScheme,
    seed: int,
    ks: Sequence[int],
    p: int,
    shape: torch.Size | Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Directions ``ks`` of parameter ``p`` stacked: shape ``(len(ks), *shape)``."""
    if scheme.basis is not None:
        out = _guided_directions(scheme, seed, ks, p, shape)
        return out if device is None else out.to(device)
    if scheme.sampler == "counter":
        out = _counter_directions(scheme, seed, ks, p, math.prod(shape)).view(len(ks), *shape)
        return out if device is None else out.to(device)
    make = torch.zeros if scheme.blocks else torch.empty
    out = make((len(ks), *shape), dtype=torch.float32, device=scheme.device)
    # one generator per (direction, tensor): one object re-seeded (manual_seed resets all
    # of its state, so each draw is a fresh generator's)
    g, seed_of = torch.Generator(device=scheme.device), scheme.direction_seeds(seed)
    for i, k in enumerate(ks):
        if scheme.perturbs(k, p):
            g.manual_seed(seed_of(k, p))
            out[i].normal_(generator=g)
    return out if device is None else out.to(device)


def _guided_directions(scheme: DirectionScheme, seed: int, ks: Sequence[int], p: int,
                       shape: torch.Size | Sequence[int]) -> torch.Tensor:
    """U_p z_k for each k in ``ks``, one matrix-vector product a direction so that a
    direction's bits do not depend on the others drawn with it (an in-place engine
    subtracts exactly what it added, and the server rebuilds the clients' very values)."""
    z = guide_coordinates(scheme, seed, ks)
    block = scheme.basis.block(p, z.device)
    if block.shape[0] != math.prod(shape):
        raise ValueError(f"the basis holds {block.shape[0]} weights of tensor {p}, "
                         f"not {math.prod(shape)}: it was made for another model")
    out = torch.empty((len(ks), *shape), dtype=torch.float32, device=z.device)
    for i in range(len(ks)):
        torch.mv(block, z[i], out=out[i].view(-1))
    return out


def guide_coordinates(scheme: DirectionScheme, seed: int, ks: Sequence[int]) -> torch.Tensor:
    """z_k for each k in ``ks`` (len(ks) x r): guided direction k's coordinates in the basis,
    eps[s, k] = U z_k. As U is orthonormal, <eps_i, eps_j> = <z_i, z_j>."""
    assert scheme.basis is not None
    free = DirectionScheme(scheme.version, scheme.device, sampler=scheme.sampler)
    return directions(free, seed, ks, GUIDE_TENSOR, (scheme.basis.dims,))


def _counter_directions(scheme: DirectionScheme, seed: int, ks: Sequence[int], p: int,
                        n: int) -> torch.Tensor:
    """``directions`` under the counter sampler, flat: (len(ks), n)."""
    key = scheme.counter_key(seed, p)
    if not scheme.blocks:
        return counter_normals(key, ks, n, scheme.device)
    out = torch.zeros((len(ks), n), dtype=torch.float32, device=scheme.device)
    rows = [i for i, k in enumerate(ks) if scheme.perturbs(k, p)]
    if not rows:
        return out
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if rows == list(range(rows[0], rows[-1] + 1, step)):  # every L-th of a range: a view
        picked = slice(rows[0], rows[-1] + 1, step)
        out[picked] = counter_normals(key, ks[picked], n, scheme.device)
    else:
        out[rows] = counter_normals(key, [ks[i] for i in rows], n, scheme.device)
    return out


class DirectionCache:
    """Directions of one scheme kept for reuse, bit-identical to ``directions``.

    In a shared-seed round every client and the server draw the same K directions, and
    in any FedSGD round the server rebuilds from the directions its clients drew; an
    in-process simulator can hand one cache to all of them so each direction is drawn
    once. Entries are per (seed, direction, parameter), and a range of directions drawn
    together is also kept whole, so asking for that range again costs one copy, not one per
    direction (a GPU's launches). Beyond ``max_bytes`` it draws without storing. Not
    thread-safe; make one per round and drop it.
    """

    def __init__(self, scheme: DirectionScheme, max_bytes: int = 512 << 20) -> None:
        self.scheme, self.max_bytes, self.bytes = scheme, max_bytes, 0
        self._store: dict[tuple[int, int, int], torch.Tensor] = {}
        # (seed, p, start, stop, step) -> a whole batch drawn for that range of directions
        self._batches: dict[tuple[int, int, int, int, int], torch.Tensor] = {}
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
        key = (seed, p, ks.start, ks.stop, ks.step) if isinstance(ks, range) else None
        whole = self._batches.get(key) if key is not None else None
        if whole is not None and whole.shape[1:] == tuple(shape):  # one copy, not len(ks)
            self.hits += len(ks)
            return whole.clone() if device is None else whole.to(device, copy=True)
        hits, missing = [], []
        for i, k in enumerate(ks):
            if not self.scheme.perturbs(k, p):
                continue
            hit = self._store.get((seed, k, p))
            if hit is not None:
                hits.append((i, hit))
            else:
                missing.append((i, k))
        self.hits += len(hits)
        drawn = None
        if missing:  # drawn together: one batch for the counter sampler
            self.misses += len(missing)
            drawn = directions(self.scheme, seed, [k for _, k in missing], p, shape)
            stored = 0
            for (_, k), eps in zip(missing, drawn, strict=True):
                if self.bytes + eps.numel() * 4 <= self.max_bytes:
                    # a view of the batch, which only the store holds: no copy (a batch
                    # stored in part stays whole, so the bound can be passed by one batch)
                    self._store[(seed, k, p)] = eps
                    self.bytes += eps.numel() * 4
                    stored += 1
            if key is not None and stored == len(ks):  # the same request again: one copy
                self._batches[key] = drawn  # the very storage of the views above
        # the caller's own tensor (engines may scale it in place): one copy of a batch drawn
        # for every row, else a copy per row
        if drawn is not None and len(missing) == len(ks):
            out = drawn.clone()
        else:
            make = torch.zeros if self.scheme.blocks else torch.empty
            out = make((len(ks), *shape), dtype=torch.float32, device=self.scheme.device)
            for i, hit in hits:
                out[i].copy_(hit)
            for (i, _), eps in zip(missing, drawn if drawn is not None else (), strict=True):
                out[i].copy_(eps)
        return out if device is None else out.to(device)
