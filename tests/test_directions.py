"""Directions: bit-identical regeneration (also in another process), fingerprints."""

import subprocess
import sys

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
