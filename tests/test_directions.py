"""Directions: bit-identical regeneration (also in another process), fingerprints."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from baffle.directions import SCHEME_VERSION, DirectionScheme, derive_seed, direction, directions
from baffle.errors import SchemeMismatchError

SHAPES = [(16, 1, 5, 5), (16,), (64, 16, 5, 5), (64,), (10, 64), (10,)]


def _draw(seed: int) -> list[torch.Tensor]:
    s = DirectionScheme()
    return [direction(s, seed, k, p, shape) for k in range(3) for p, shape in enumerate(SHAPES)]


def test_same_seed_same_directions_and_no_global_rng_use():
    state = torch.get_rng_state()
    a, b = _draw(7), _draw(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(x.dtype == torch.float32 for x in a)


def test_other_seed_direction_or_parameter_differs():
    s = DirectionScheme()
    base = direction(s, 7, 0, 0, (100,))
    for other in (direction(s, 8, 0, 0, (100,)), direction(s, 7, 1, 0, (100,)),
                  direction(s, 7, 0, 1, (100,))):
        assert not torch.equal(base, other)


def test_stacked_directions_equal_single_draws():
    s = DirectionScheme()
    stacked = directions(s, 3, range(2, 7), 4, (64,))
    for i, k in enumerate(range(2, 7)):
        assert torch.equal(stacked[i], direction(s, 3, k, 4, (64,)))


def test_stacked_directions_are_each_directions_own_fresh_generator_draw():
    """The definition: direction k of tensor p is torch.randn from a new generator seeded
    derive_seed(version, seed, k, p); the stacked draw re-seeds one generator instead."""
    s = DirectionScheme()
    ks = [5, 0, 9, 2]  # any order; small shapes take torch's scalar path, the rest its vector one
    for p, shape in enumerate([(1,), (3,), (15,), (16,), (7, 5), (64, 16, 5, 5)]):
        stacked = directions(s, 11, ks, p, shape)
        for i, k in enumerate(ks):
            g = torch.Generator().manual_seed(derive_seed(SCHEME_VERSION, 11, k, p))
            assert torch.equal(stacked[i], torch.randn(shape, generator=g)), (p, k)


def test_directions_are_standard_normal():
    d = torch.cat([direction(DirectionScheme(), 1, k, 0, (4096,)) for k in range(50)])
    # n = 204,800 draws: the sample mean has sd 0.0022 and the sample sd about 0.0016.
    assert abs(float(d.mean())) < 0.011
    assert abs(float(d.std()) - 1) < 0.008


def test_regenerate_bit_identically_in_another_process():
    code = (
        "import torch, sys\n"
        "from baffle.directions import DirectionScheme, direction\n"
        f"SHAPES = {SHAPES!r}\n"
        "s = DirectionScheme()\n"
        "ts = [direction(s, 7, k, p, sh) for k in range(3) for p, sh in enumerate(SHAPES)]\n"
        "sys.stdout.write(torch.cat([t.flatten() for t in ts]).numpy().tobytes().hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = torch.cat([t.flatten() for t in _draw(7)]).numpy().tobytes().hex()
    assert out.stdout == here
    fp = subprocess.run([sys.executable, "-c", "from baffle.directions import DirectionScheme;"
                         "print(DirectionScheme().fingerprint())"], capture_output=True,
                        text=True, check=True)
    assert fp.stdout.strip() == DirectionScheme().fingerprint()


def test_fingerprint_is_short_and_matches_itself():
    s = DirectionScheme()
    fp = s.fingerprint()
    assert len(fp) == 12 and int(fp, 16) >= 0
    s.check(SCHEME_VERSION, fp)  # no error


def test_fingerprint_mismatch_raises_one_line():
    s = DirectionScheme()
    with pytest.raises(SchemeMismatchError) as e:
        s.check(SCHEME_VERSION, "000000000000")
    assert "\n" not in str(e.value) and "fingerprint" in str(e.value)
    with pytest.raises(SchemeMismatchError, match="version"):
        s.check("baffle-dirs/0", s.fingerprint())


def test_other_version_draws_other_numbers_and_fingerprint():
    old = DirectionScheme(version="baffle-dirs/0")
    assert old.fingerprint() != DirectionScheme().fingerprint()
    assert not torch.equal(direction(old, 1, 0, 0, (32,)), direction(DirectionScheme(), 1, 0, 0, (32,)))
    with pytest.raises(SchemeMismatchError):
        DirectionScheme().check(old.version, old.fingerprint())


def test_derive_seed_is_stable_and_63_bit():
    assert derive_seed(1, "round", 2) == derive_seed(1, "round", 2)
    assert derive_seed(1, "round", 2) != derive_seed(1, "round", 3)
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(-5, "x") < 2**63


# -- the counter sampler ---------------------------------------------------------------

COUNTER = DirectionScheme(sampler="counter")


def _splitmix_reference(key: int, ks, n: int) -> np.ndarray:
    """The counter sampler's formula in numpy uint64 (wrapping by definition) and float64,
    written independently of baffle's torch int64 version."""
    with np.errstate(over="ignore"):
        z = np.array(list(ks), dtype=np.uint64)[:, None] * np.uint64(n) \
            + np.arange(n, dtype=np.uint64)
        z = z * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u1 = ((z >> np.uint64(40)) + np.uint64(1)).astype(np.float64) / 2**24
    u2 = ((z >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float64) / 2**24
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def test_counter_sampler_follows_its_formula():
    ks = [0, 3, 4, 99]
    got = directions(COUNTER, 11, ks, 2, (7, 13)).reshape(len(ks), -1).double().numpy()
    want = _splitmix_reference(COUNTER.counter_key(11, 2), ks, 7 * 13)
    # float32 log/cos against float64: a few ulp of values up to ~5.8
    assert np.allclose(got, want, rtol=0, atol=2e-5)


def test_counter_sampler_draws_any_subset_alike_and_depends_on_all_indices():
    together = directions(COUNTER, 3, range(0, 9), 4, (64,))
    for k in range(9):
        assert torch.equal(together[k], direction(COUNTER, 3, k, 4, (64,)))
    assert torch.equal(directions(COUNTER, 3, [7, 2], 4, (64,)), together[[7, 2]])
    big = directions(COUNTER, 3, range(100), 4, (5000,))  # drawn in cache-sized batches
    for k in (0, 52, 99):
        assert torch.equal(big[k], direction(COUNTER, 3, k, 4, (5000,)))
    base = direction(COUNTER, 7, 0, 0, (100,))
    for other in (direction(COUNTER, 8, 0, 0, (100,)), direction(COUNTER, 7, 1, 0, (100,)),
                  direction(COUNTER, 7, 0, 1, (100,)),
                  direction(DirectionScheme(), 7, 0, 0, (100,))):
        assert not torch.equal(base, other)
    state = torch.get_rng_state()
    direction(COUNTER, 7, 0, 0, (100,))
    assert torch.equal(torch.get_rng_state(), state)


def test_counter_sampler_is_standard_normal_and_uncorrelated():
    """n = 409,600 draws: mean sd 0.0016, sd's sd 0.0011; a Kolmogorov-Smirnov distance
    above 1.95/sqrt(n) = 0.003 has probability 0.001 for a true N(0, 1) sample. Neighbours
    in the counter (next entry, next direction, next tensor) must look independent:
    |correlation| < 5/sqrt(m)."""
    d = directions(COUNTER, 5, range(100), 0, (4096,)).double()
    x = d.flatten()
    n = x.numel()
    assert abs(float(x.mean())) < 0.008
    assert abs(float(x.std()) - 1) < 0.006
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks_dist = float((torch.special.ndtr(x.sort().values) - ecdf).abs().max())
    assert ks_dist < 1.95 / n ** 0.5, ks_dist
    assert float(x.abs().max()) < 5.8  # 24-bit uniforms: the tails stop at 5.77

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    other_tensor = directions(COUNTER, 5, range(100), 1, (4096,)).double()
    for a, b in [(d[:, :-1], d[:, 1:]), (d[:-1], d[1:]), (d, other_tensor)]:
        assert abs(corr(a, b)) < 5 / a.numel() ** 0.5


def test_counter_fingerprint_is_its_own_and_refuses_the_torch_sampler():
    torch_fp, counter_fp = DirectionScheme().fingerprint(), COUNTER.fingerprint()
    assert counter_fp != torch_fp
    COUNTER.check(SCHEME_VERSION, counter_fp)
    with pytest.raises(SchemeMismatchError, match="counter sampler"):
        COUNTER.check(SCHEME_VERSION, torch_fp)
    with pytest.raises(ValueError, match="sampler"):
        DirectionScheme(sampler="mersenne")


def test_counter_sampler_with_layer_blocks_zeroes_exactly_the_other_layers():
    layered = DirectionScheme(sampler="counter", blocks=(0, 0, 1, 1, 2, 2))
    for ks in (range(0, 10), range(3, 17), range(2, 10, 3), [5, 1, 2, 9]):
        for p in range(6):
            got = directions(layered, 5, ks, p, (3, 4))
            for i, k in enumerate(ks):
                assert torch.equal(got[i], direction(layered, 5, k, p, (3, 4)))
                assert bool((got[i] != 0).any()) == layered.perturbs(k, p), (ks, p, k)


@pytest.mark.parametrize("sampler", ["torch", "counter"])
def test_a_cache_hands_back_a_range_it_drew_whole_in_one_copy(sampler):
    """Asked again for a range it drew in one batch, the cache returns that batch's values,
    as a tensor of the caller's own, and counts every direction as a hit."""
    from baffle.directions import DirectionCache

    dirs = DirectionScheme(sampler=sampler)
    cache = DirectionCache(dirs)
    fresh = directions(dirs, 4, range(6), 1, (3, 5))
    first = cache.directions(4, range(6), 1, (3, 5))
    assert cache.misses == 6 and cache.hits == 0 and torch.equal(first, fresh)
    first.mul_(0)  # engines scale what they get in place: the cache must not see it
    again = cache.directions(4, range(6), 1, (3, 5))
    assert cache.hits == 6 and torch.equal(again, fresh)
    again.mul_(0)
    assert torch.equal(cache.directions(4, range(6), 1, (3, 5)), fresh)
    assert torch.equal(cache.directions(4, range(2, 5), 1, (3, 5)), fresh[2:5])  # per k
    assert not torch.equal(cache.directions(5, range(6), 1, (3, 5)), fresh)  # other seed
    tiny = DirectionCache(dirs, max_bytes=3 * 15 * 4)  # room for half the range
    tiny.directions(4, range(6), 1, (3, 5))
    assert torch.equal(tiny.directions(4, range(6), 1, (3, 5)), fresh)
    assert tiny.hits == 3  # kept in part: only the stored half hits, never a whole batch
