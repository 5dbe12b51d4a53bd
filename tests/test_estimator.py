"""Estimator: exact d_k, untouched parameters, engines agree, buffers never perturbed."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baffle.directions import DirectionScheme, direction
from baffle.errors import ConfigError
from baffle.estimator import EstimatorSpec, loss_differences
from baffle.models import build_model

DIRS = DirectionScheme()


def _lenet():
    return build_model("lenet", num_classes=10, in_channels=1,
                       generator=torch.Generator().manual_seed(0))


def _batch(n=8, size=12):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("engine", ["batched", "sequential"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_parameters_bit_identical_after_call(engine, scheme):
    model = _lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    loss_differences(model, F.cross_entropy, x, y, 3, EstimatorSpec(7, 1e-3, scheme), DIRS, engine)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_differences_match_a_hand_computed_reference(scheme):
    """d_k recomputed by loading W + sigma*eps_k into a copy of the model by hand."""
    model = _lenet()
    x, y = _batch()
    spec = EstimatorSpec(5, 1e-2, scheme)
    est = loss_differences(model, F.cross_entropy, x, y, 11, spec, DIRS, "sequential")

    def loss_with(sign, k):
        m = _lenet()
        with torch.no_grad():
            for p_i, p in enumerate(m.parameters()):
                p.add_(sign * spec.sigma * direction(DIRS, 11, k, p_i, p.shape))
        return F.cross_entropy(m(x), y)

    with torch.no_grad():
        base = F.cross_entropy(model(x), y)
        for k in range(spec.K):
            ref = loss_with(1, k) - (base if scheme == "forward" else loss_with(-1, k))
            assert float(est.diffs[k]) == pytest.approx(float(ref), abs=2e-6)
    assert est.forward_passes == (6 if scheme == "forward" else 10)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_batched_equals_sequential(scheme):
    model = _lenet()
    x, y = _batch(16, 32)
    spec = EstimatorSpec(40, 1e-3, scheme)
    a = loss_differences(model, F.cross_entropy, x, y, 5, spec, DIRS, "sequential")
    for chunk in (1, 7, 64):
        b = loss_differences(model, F.cross_entropy, x, y, 5, spec, DIRS, "batched", chunk)
        # d_k ~ 1e-3; each loss ~2.3 is exact to float32 rounding (~2.4e-7 per loss)
        assert torch.allclose(a.diffs, b.diffs, atol=2e-6, rtol=0)
        assert a.loss == pytest.approx(b.loss, abs=1e-6)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        return (x * self.w * self.scale).sum(dim=1, keepdim=True)


def test_buffers_are_not_perturbed():
    """With loss = sum(x * w * scale), d_k = sigma * sum(x * eps_k * scale) exactly (linear)."""
    model = WithBuffer()
    x, y = torch.ones(1, 4), torch.zeros(1)
    spec = EstimatorSpec(6, 0.5)
    est = loss_differences(model, lambda out, _: out.sum(), x, y, 2, spec, DIRS)
    for k in range(6):
        expect = 0.5 * float((direction(DIRS, 2, k, 0, (4,)) * 2.0).sum())
        assert float(est.diffs[k]) == pytest.approx(expect, abs=1e-5)


def test_frozen_parameters_are_not_perturbed():
    model = WithBuffer()
    model.w.requires_grad_(False)
    est = loss_differences(model, lambda out, _: out.sum(), torch.ones(1, 4), torch.zeros(1), 2,
                           EstimatorSpec(3, 0.5), DIRS)
    assert torch.equal(est.diffs, torch.zeros(3))


def test_batchnorm_is_refused_with_a_reason():
    model = build_model("lenet", num_classes=10, in_channels=1, norm="batch")
    x, y = _batch()
    with pytest.raises(ConfigError, match="BatchNorm") as e:
        loss_differences(model, F.cross_entropy, x, y, 0, EstimatorSpec(2), DIRS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("K,sigma,scheme,match", [
    (0, 1e-4, "forward", "K must be"), (-3, 1e-4, "forward", "K must be"),
    (10, 0.0, "forward", "sigma"), (10, -1e-4, "forward", "sigma"),
    (10, float("nan"), "forward", "sigma"), (10, float("inf"), "forward", "sigma"),
    (10, 1e-4, "backward", "scheme"),
])
def test_bad_spec(K, sigma, scheme, match):
    with pytest.raises(ConfigError, match=match):
        EstimatorSpec(K, sigma, scheme)
