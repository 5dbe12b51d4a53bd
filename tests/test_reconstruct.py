"""Reconstruction: unbiasedness with 1/sqrt(K) error, linearity, exact replay."""

import copy
import functools
import math

import pytest
import torch
from torch import nn

from baffle.aggregate import Upload, aggregate_gradient, mean_diffs
from baffle.client import local_epoch_update, local_optimizer, replay_local_epoch
from baffle.directions import DirectionScheme
from baffle.estimator import EstimatorSpec, loss_differences
from baffle.reconstruct import rebuild_gradient, rescale_inf_norm, scan_sum, write_grads
from baffle.server import make_optimizer

DIRS = DirectionScheme()
N = 40


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w + b^T w (A = 0 gives a linear loss); gradient A w + b."""

    def __init__(self, curvature: float):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(N, N, generator=g)
        self.register_buffer("A", curvature * (m @ m.T) / N)
        self.register_buffer("b", torch.randn(N, generator=g))
        self.w = nn.Parameter(torch.randn(N, generator=g))

    def forward(self, x):
        return 0.5 * self.w @ self.A @ self.w + self.b @ self.w

    def grad(self):
        return (self.A @ self.w + self.b).detach()


def _estimate(model, K, seed, scheme="forward", sigma=1e-2, dirs=DIRS):
    spec = EstimatorSpec(K, sigma, scheme)
    est = loss_differences(model, lambda out, _: out, torch.zeros(1), torch.zeros(1), seed, spec,
                           dirs)
    (g,) = rebuild_gradient([model.w.shape], seed, est.diffs, spec, dirs)
    return g


def _rel_error(model, K, seeds, scheme="forward", dirs=DIRS):
    g = model.grad()
    errs = [float((_estimate(model, K, s, scheme, dirs=dirs) - g).norm() / g.norm())
            for s in seeds]
    return math.sqrt(sum(e * e for e in errs) / len(errs))


@pytest.mark.parametrize("curvature", [0.0, 1.0], ids=["linear", "quadratic"])
@pytest.mark.parametrize("scheme,sampler", [("forward", "torch"), ("central", "torch"),
                                            ("forward", "counter")])
def test_error_falls_as_one_over_sqrt_k(curvature, scheme, sampler):
    """For Gaussian directions E|g_hat - g|^2 = (n + 1)|g|^2 / K (forward and central on
    quadratics, where the O(sigma) bias vanishes), so the RMS relative error is
    sqrt((n+1)/K): 0.64 at K=100, 0.16 at K=1600 for n=40. Tolerances: the RMS over 12
    seeds is within 30% of theory, and quadrupling K halves it to within [1.6, 2.5]."""
    model = Quadratic(curvature)
    seeds = range(12)
    dirs = DirectionScheme(sampler=sampler)
    errs = {K: _rel_error(model, K, seeds, scheme, dirs) for K in (100, 400, 1600)}
    for K, e in errs.items():
        assert e == pytest.approx(math.sqrt((N + 1) / K), rel=0.3), errs
    assert 1.6 < errs[100] / errs[400] < 2.5, errs
    assert 1.6 < errs[400] / errs[1600] < 2.5, errs


@pytest.mark.parametrize("sampler", ["torch", "counter"])
def test_mean_of_estimates_approaches_gradient(sampler):
    """Unbiased: the mean of 40 independent K=100 estimates has error sqrt(41/4000) = 0.10."""
    model = Quadratic(1.0)
    dirs = DirectionScheme(sampler=sampler)
    mean = torch.stack([_estimate(model, 100, s, dirs=dirs) for s in range(40)]).mean(0)
    rel = float((mean - model.grad()).norm() / model.grad().norm())
    assert rel < 0.2


def test_rebuild_from_averaged_scalars_equals_average_of_rebuilds():
    shapes = [torch.Size((6, 3)), torch.Size((5,))]
    spec = EstimatorSpec(30, 1e-3)
    g = torch.Generator().manual_seed(4)
    uploads = [Upload(c, n, (77,), torch.randn(30, generator=g)) for c, n in enumerate((5, 9, 2))]
    once = aggregate_gradient(uploads, shapes, spec, DIRS, shared_seed=True)
    per_client = [rebuild_gradient(shapes, 77, u.diffs, spec, DIRS) for u in uploads]
    w = [u.num_examples / 16 for u in uploads]
    for i in range(2):
        avg = sum(wc * pc[i] for wc, pc in zip(w, per_client))
        assert torch.allclose(once[i], avg, rtol=1e-5, atol=1e-6)
    assert torch.allclose(mean_diffs(uploads), sum(wc * u.diffs for wc, u in zip(w, uploads)))


def test_central_uses_half_the_scale():
    shapes = [torch.Size((10,))]
    d = torch.arange(8.0)
    fwd = rebuild_gradient(shapes, 1, d, EstimatorSpec(8, 0.1, "forward"), DIRS)[0]
    cen = rebuild_gradient(shapes, 1, d, EstimatorSpec(8, 0.1, "central"), DIRS)[0]
    assert torch.allclose(fwd, 2 * cen)


def test_inf_norm_rescale_keeps_direction():
    g = [torch.tensor([0.6, -1.2]), torch.tensor([0.3])]
    out = rescale_inf_norm(g, 0.3)
    assert float(max(t.abs().max() for t in out)) == pytest.approx(0.3)
    assert torch.allclose(out[0] / out[1], g[0] / g[1])
    assert rescale_inf_norm(g, None)[0] is g[0]


def test_write_grads_then_stock_optimizer_step():
    model = Quadratic(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w0 = model.w.detach().clone()
    write_grads([model.w], [torch.ones(N)])
    opt.step()
    assert torch.allclose(model.w.detach(), w0 - 0.5)


@pytest.mark.parametrize("keep", [False, True])
def test_epoch_level_replay_reproduces_the_client_model(keep):
    """The server rebuilds a client's whole local trajectory from (seeds, scalars) alone;
    with a kept optimizer it also ends with the client's optimizer state, round after round."""
    from baffle.models import build_model
    import torch.nn.functional as F

    def fresh():
        return build_model("lenet", num_classes=10, in_channels=1,
                           generator=torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(4)]
    spec = EstimatorSpec(12, 1e-3)
    make_opt = functools.partial(make_optimizer, "adam", lr=1e-2)
    client_model, server_model = fresh(), fresh()
    kept = None  # the optimizer state both sides carry into the next round
    for rnd in range(2):
        start = [p.detach().clone() for p in client_model.parameters()]
        state_before = copy.deepcopy(kept)
        client_opt = local_optimizer(make_opt, client_model, kept)
        upload = local_epoch_update(3, client_model, F.cross_entropy, batches,
                                    [11 + 4 * rnd + i for i in range(4)], spec, DIRS, client_opt,
                                    0.3)
        assert upload.diffs.shape == (4, 12)
        assert any(not torch.equal(a, b) for a, b in zip(start, client_model.parameters()))
        if kept is not None:  # the client stepped a copy: the kept state is untouched
            for a, b in zip(_tensors(kept), _tensors(state_before), strict=True):
                assert torch.equal(a, b)
        server_opt = local_optimizer(make_opt, server_model, kept)
        replayed = replay_local_epoch(server_model, upload, spec, DIRS, server_opt, 0.3)
        for r, c in zip(replayed, client_model.parameters(), strict=True):
            assert torch.equal(r, c.detach())
        mine, theirs = client_opt.state_dict(), server_opt.state_dict()
        for a, b in zip(_tensors(mine), _tensors(theirs), strict=True):
            assert torch.equal(a, b)
        if keep:
            kept = theirs
            assert int(_tensors({"s": kept["state"][0]["step"]})[0]) == 4 * (rnd + 1)
        else:
            client_model, server_model = fresh(), fresh()


def _tensors(state):
    """Every tensor in a (nested) optimizer state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def test_a_kept_optimizer_takes_the_rounds_hyperparameters():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    again = local_optimizer(functools.partial(make_optimizer, "adam", lr=0.01), model,
                            opt.state_dict())
    assert again.param_groups[0]["lr"] == 0.01  # the round's lr, not the saved 0.5
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])


def test_rebuild_does_not_depend_on_the_thread_count():
    """A replaying server may have other cores than the client: the rebuild must be exact."""
    shapes = [torch.Size((300, 301)), torch.Size((7,))]
    spec = EstimatorSpec(40, 1e-3)
    d = torch.randn(40, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rebuild_gradient(shapes, 5, d, spec, DIRS)
        torch.set_num_threads(max(2, threads))
        many = rebuild_gradient(shapes, 5, d, spec, DIRS)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("n", [7, 25_600])
def test_scan_sum_is_the_ordered_sum_whatever_the_thread_count(n):
    """The GPU rebuild's accumulation (``scan_sum``), run here on the CPU: it equals the
    per-direction loop to float32 rounding and does not change with the thread count."""
    g = torch.Generator().manual_seed(3)
    eps, w = torch.randn(64, n, generator=g), torch.randn(64, generator=g)
    loop = torch.zeros(n)
    for i in range(64):
        loop.add_(eps[i], alpha=float(w[i]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = scan_sum(eps.clone(), w)
        torch.set_num_threads(max(2, threads))
        many = scan_sum(eps.clone(), w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.allclose(one, loop, atol=1e-5 * loop.abs().max().item(), rtol=0)
    assert torch.allclose(one.double(), (w.double() @ eps.double()), rtol=0,
                          atol=1e-5 * loop.abs().max().item())


def test_a_local_step_rebuilds_from_the_directions_its_estimate_drew(monkeypatch):
    """Each local step draws its K directions once: the rebuild reads them back from the
    step's cache (the replay above checks that this changes no bit)."""
    import baffle.client as client
    from baffle.directions import DirectionCache
    from baffle.models import build_model
    import torch.nn.functional as F

    made: list[DirectionCache] = []

    class Counting(DirectionCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(client, "DirectionCache", Counting)
    model = build_model("lenet", num_classes=10, in_channels=1,
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(3)]
    spec = EstimatorSpec(12, 1e-3)
    opt = local_optimizer(functools.partial(make_optimizer, "adam", lr=1e-2), model)
    local_epoch_update(0, model, F.cross_entropy, batches, [1, 2, 3], spec, DIRS, opt, 0.3)
    n_tensors = len(list(model.parameters()))
    assert len(made) == 3  # one per step
    assert all(c.misses == 12 * n_tensors and c.hits == 12 * n_tensors for c in made)
    n_params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(client, "STEP_CACHE", 12 * n_params * 4 - 1)  # one byte short
    local_epoch_update(0, model, F.cross_entropy, batches, [1, 2, 3], spec, DIRS, opt, 0.3)
    assert len(made) == 3  # K directions that do not fit: drawn again, nothing kept
