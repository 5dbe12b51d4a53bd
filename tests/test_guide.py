"""Server-guided directions (--guide-dims): exact U z directions, an estimate unbiased for
the gradient's part in the span, the server's basis and history, errors, and training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baffle import TrainConfig, train
from baffle.config import from_dict
from baffle.directions import GUIDE_TENSOR, Basis, DirectionCache, DirectionScheme, directions
from baffle.errors import ConfigError, SchemeMismatchError
from baffle.estimator import EstimatorSpec, loss_differences
from baffle.flower.wire import config_from_run_config
from baffle.guide import GuideState, flat_gradient, history_basis, public_batch
from baffle.reconstruct import rebuild_gradient
from baffle.simulator import setup

SIZES = [30, 6, 15, 3]  # the tiny MLP's tensors: 6x5 weight, bias, 3x5 weight, bias


def _orthonormal(d, r, seed=0):
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed))).Q


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))  # 30+6+18+3


MLP_SIZES = [30, 6, 18, 3]


def _batch(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_a_guided_direction_is_u_times_the_schemes_own_draw_of_z():
    u = _orthonormal(sum(SIZES), 4)
    dirs = DirectionScheme(basis=Basis(u, SIZES))
    z = directions(DirectionScheme(), 9, range(6), GUIDE_TENSOR, (4,))  # the free draw
    offset = 0
    for p, n in enumerate(SIZES):
        eps = directions(dirs, 9, range(6), p, (n,))
        torch.testing.assert_close(eps, z @ u[offset:offset + n].T, rtol=0, atol=1e-6)
        offset += n
    whole = torch.cat([directions(dirs, 9, range(6), p, (n,)) for p, n in enumerate(SIZES)], 1)
    # every direction lies in the span: projecting on it changes nothing
    torch.testing.assert_close(whole @ u @ u.T, whole, rtol=0, atol=1e-5)


def test_guided_directions_do_not_depend_on_what_is_drawn_with_them():
    dirs = DirectionScheme(basis=Basis(_orthonormal(sum(SIZES), 4), SIZES))
    together = directions(dirs, 2, range(10), 2, (3, 5))
    alone = torch.stack([directions(dirs, 2, range(k, k + 1), 2, (3, 5))[0] for k in range(10)])
    assert torch.equal(together, alone)
    cache = DirectionCache(dirs)
    first = cache.directions(2, range(10), 2, (3, 5))
    again = cache.directions(2, range(3, 7), 2, (3, 5))
    assert torch.equal(first, together) and torch.equal(again, together[3:7])


def test_a_basis_is_named_by_its_numbers_and_the_fingerprint_tells_bases_apart():
    u = _orthonormal(sum(SIZES), 4)
    same, other = Basis(u.clone(), SIZES), Basis(_orthonormal(sum(SIZES), 4, seed=1), SIZES)
    assert Basis(u, SIZES) == same and Basis(u, SIZES) != other
    a, b = DirectionScheme(basis=same), DirectionScheme(basis=other)
    prints = {DirectionScheme().fingerprint(), a.fingerprint(), b.fingerprint()}
    assert len(prints) == 3
    DirectionScheme(basis=Basis(u, SIZES)).check(a.version, a.fingerprint())
    with pytest.raises(SchemeMismatchError, match="basis") as e:
        a.check(b.version, b.fingerprint())
    assert "\n" not in str(e.value)


def test_a_basis_for_another_model_is_refused():
    with pytest.raises(ValueError, match="rows"):
        Basis(_orthonormal(50, 3), SIZES)
    dirs = DirectionScheme(basis=Basis(_orthonormal(sum(SIZES), 3), SIZES))
    with pytest.raises(ValueError, match="another model"):
        directions(dirs, 0, range(2), 0, (31,))
    with pytest.raises(ValueError, match="blocks"):
        DirectionScheme(blocks=(0, 0, 1, 1), basis=Basis(_orthonormal(sum(SIZES), 3), SIZES))


@pytest.mark.parametrize("engine", ["batched", "sequential", "inplace"])
def test_engines_agree_and_restore_the_weights_exactly(engine):
    model, (x, y) = _mlp(), _batch()
    dirs = DirectionScheme(basis=Basis(_orthonormal(sum(MLP_SIZES), 3), MLP_SIZES))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = EstimatorSpec(12, 1e-3, "forward")
    got = loss_differences(model, F.cross_entropy, x, y, 5, spec, dirs, engine).diffs
    ref = loss_differences(model, F.cross_entropy, x, y, 5, spec, dirs, "sequential").diffs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-7)


def test_the_estimate_is_unbiased_for_the_gradients_part_in_the_span():
    """With every direction U z, the rebuilt estimate tends to U (1/K sum z z^T) U^T g: it
    lies in the span, and its error about U U^T g is ~ sqrt((r+1)/K) of that vector's norm
    (against sqrt((d+1)/K) for directions that move every weight)."""
    model, (x, y) = _mlp(), _batch()
    g = flat_gradient(model, F.cross_entropy, x, y)
    r, K, d = 4, 4000, sum(MLP_SIZES)
    u = _orthonormal(d, r - 1)
    u = torch.linalg.qr(torch.cat([u, g[:, None]], 1)).Q  # a span that holds g in part
    dirs = DirectionScheme(basis=Basis(u, MLP_SIZES))
    spec = EstimatorSpec(K, 1e-3, "central")
    est = loss_differences(model, F.cross_entropy, x, y, 11, spec, dirs, "batched")
    shapes = [p.shape for p in model.parameters()]
    g_hat = torch.cat([t.reshape(-1) for t in rebuild_gradient(shapes, 11, est.diffs, spec, dirs)])
    target = u @ (u.T @ g)
    assert (g_hat - u @ (u.T @ g_hat)).norm() < 1e-4 * g_hat.norm()  # nothing outside
    err = float((g_hat - target).norm() / target.norm())
    assert err < 3 * math.sqrt((r + 1) / K), err  # 0.106 against an expected 0.035
    dense = DirectionScheme()
    est = loss_differences(model, F.cross_entropy, x, y, 11, spec, dense, "batched")
    full = torch.cat([t.reshape(-1) for t in rebuild_gradient(shapes, 11, est.diffs, spec, dense)])
    assert err < float((full - g).norm() / g.norm())  # the span's estimate is the finer


def test_history_basis_is_orthonormal_and_holds_the_top_directions():
    gen = torch.Generator().manual_seed(3)
    top = _orthonormal(200, 3, seed=4)
    # 40 rows: large components along 3 directions, small noise elsewhere
    noise = 0.01 * torch.randn(40, 200, generator=gen)
    rows = torch.randn(40, 3, generator=gen) * 10 @ top.T + noise
    u = history_basis(rows, 3)
    torch.testing.assert_close(u.T @ u, torch.eye(3), rtol=0, atol=1e-5)
    assert (top - u @ (u.T @ top)).norm() < 0.01  # the same span
    # the 3 columns from 40 rows: as good as the SVD's top 3 at holding the rows
    svd = torch.linalg.svd(rows, full_matrices=False).Vh[:3].T
    kept = (rows @ u).norm() / (rows @ svd).norm()
    assert abs(float(kept) - 1) < 1e-5


def test_the_server_refreshes_its_basis_on_schedule_and_keeps_its_last_gradients():
    state, gen = GuideState(), torch.Generator().manual_seed(0)
    refreshed = [state.observe(torch.randn(20, generator=gen), r, dims=3, keep=5, refresh=4)
                 for r in range(13)]
    # a basis once 3 rows are held, on rounds 0 mod 4: rounds 4, 8 and 12
    assert [r for r, new in enumerate(refreshed) if new] == [4, 8, 12]
    assert len(state.history) == 5 and state.basis.shape == (20, 3)
    again = GuideState.from_state(state.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.history, state.history))
    assert torch.equal(again.basis, state.basis)


def test_the_servers_batch_is_a_seeded_draw_without_repeats():
    a, b = public_batch(0, 7, 100, 32), public_batch(0, 7, 100, 32)
    assert (a == b).all() and len(set(a.tolist())) == 32 and a.max() < 100
    assert not (public_batch(0, 8, 100, 32) == a).all()
    assert sorted(public_batch(0, 7, 10, 32).tolist()) == list(range(10))  # capped at the pool


def test_the_servers_gradient_is_backprops_and_leaves_the_model_alone():
    model, (x, y) = _mlp(), _batch()
    g = flat_gradient(model, F.cross_entropy, x, y)
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))


@pytest.mark.parametrize("change,match", [
    (dict(perturb="layer"), "--perturb all"),
    (dict(method="bp-fedsgd"), "BAFFLE FedSGD"),
    (dict(mode="epoch"), "BAFFLE FedSGD"),
    (dict(guide_history=3), "--guide-history 3"),
    (dict(guide_refresh=0), "guide_refresh"),
    (dict(guide_dims=-1), "guide_dims"),
])
def test_bad_guide_settings_are_refused_in_one_line(change, match):
    with pytest.raises(ConfigError, match=match) as e:
        TrainConfig(**{"guide_dims": 5, **change})
    assert "\n" not in str(e.value)


def test_more_server_images_than_the_split_holds_is_refused():
    with pytest.raises(ConfigError, match="--guide-images 100000") as e:
        setup(TrainConfig(dataset="digits", guide_dims=3, guide_history=5,
                          guide_images=100_000, rounds=1))
    assert "\n" not in str(e.value)


def test_secure_aggregation_takes_guided_directions_in_shared_seed_fedsgd_only():
    from baffle.flower.secagg import check_secagg_config

    cfg, _ = config_from_run_config({"dataset": "digits", "guide-dims": 3, "guide-history": 5,
                                     "guide-images": 100, "rounds": 1})
    check_secagg_config(setup(cfg))  # tests/test_flower_secagg.py sends the basis
    with pytest.raises(ConfigError, match="--seed-sharing round") as e:
        check_secagg_config(setup(cfg.replace(seed_sharing="client")))
    assert "\n" not in str(e.value)


def test_a_guided_run_counts_the_basis_downloads(tmp_path):
    cfg = from_dict(dict(dataset="digits", clients=4, K=10, rounds=24, guide_dims=4,
                         guide_history=6, guide_refresh=5, guide_images=100, lr=3e-2,
                         ema=False, seed=1))
    result = train(cfg, run_dir=tmp_path / "run")
    d = sum(p.numel() for p in result.model.parameters())
    down = [m["bytes_down_per_client"] for m in result.metrics]
    plain = 4 * d + 8
    # dense directions until the first basis (round 5: the first refresh round holding at
    # least 4 gradients),
    # then U (4 d r bytes) down on each refresh round, as every client takes part
    assert down[:5] == [plain] * 5
    assert [r for r, b in enumerate(down) if b != plain] == [5, 10, 15, 20]
    assert all(down[r] == plain + 4 * d * 4 for r in (5, 10, 15, 20))


def test_a_basis_crosses_the_wire_exactly_and_a_wrong_copy_is_refused_in_one_line():
    from baffle.flower.wire import basis_record, record_basis

    basis = Basis(_orthonormal(sum(SIZES), 3), SIZES)
    back = record_basis(basis_record(basis), SIZES, basis.digest)
    assert back == basis and all(torch.equal(a, b) for a, b in zip(back.blocks, basis.blocks))
    damaged = basis_record(Basis(torch.cat(basis.blocks) * (1 + 1e-7), SIZES))
    for record, sizes in ((damaged, SIZES), (None, SIZES), (basis_record(basis), [54, 1])):
        with pytest.raises(ConfigError, match=f"does not hold the server's basis {basis.digest}"
                           ) as e:
            record_basis(record, sizes, basis.digest)
        assert "\n" not in str(e.value)


def test_a_client_whose_upload_was_rejected_is_charged_the_basis_again(tmp_path):
    """Client 1's upload in round 5 (the first basis) is non-finite, so rejected: the server
    cannot tell it holds U, and round 6 sends (and charges) U to it alone."""
    from dataclasses import replace as swap

    def hook(r, u):
        return swap(u, diffs=u.diffs * float("nan")) if (r, u.client) == (5, 1) else u

    cfg = from_dict(dict(dataset="digits", clients=4, K=10, rounds=8, guide_dims=4,
                         guide_history=6, guide_refresh=5, guide_images=100, lr=3e-2,
                         ema=False, seed=1))
    result = train(cfg, run_dir=tmp_path / "run", upload_hook=hook)
    d = sum(p.numel() for p in result.model.parameters())
    plain, basis = 4 * d + 8, 4 * d * 4
    assert [m["accepted"] for m in result.metrics] == [4] * 5 + [3, 4, 4]
    assert [m["bytes_down_per_client"] for m in result.metrics] == \
        [plain] * 5 + [plain + basis, plain + basis / 4, plain]


def _flat(grads):
    return torch.cat([t.reshape(-1) for t in grads])


@pytest.mark.parametrize("scheme,s", [("forward", 1e-3), ("central", 2e-3)])
def test_the_least_squares_rebuild_returns_the_gradients_part_in_the_span_exactly(scheme, s):
    """Noise-free measurements d_k = s (a + z_k^T U^T g), with any offset a: the solve gives
    U U^T g to float32 rounding, where the mean misses it by about sqrt((r+1)/K)."""
    r, K, d = 5, 8, sum(MLP_SIZES)
    u = _orthonormal(d, r)
    dirs = DirectionScheme(basis=Basis(u, MLP_SIZES))
    g = torch.randn(d, generator=torch.Generator().manual_seed(2))
    z = directions(DirectionScheme(), 4, range(K), GUIDE_TENSOR, (r,))
    diffs = s * (0.7 + z @ (u.T @ g))
    shapes = [torch.Size([n]) for n in MLP_SIZES]
    target = u @ (u.T @ g)
    solved = _flat(rebuild_gradient(shapes, 4, diffs, EstimatorSpec(K, 1e-3, scheme, True), dirs))
    assert float((solved - target).norm() / target.norm()) < 1e-5
    mean = _flat(rebuild_gradient(shapes, 4, diffs, EstimatorSpec(K, 1e-3, scheme), dirs))
    assert float((mean - target).norm() / target.norm()) > 0.2


def test_on_a_model_the_solve_is_as_close_as_the_finite_difference_allows():
    """Real loss differences of the MLP (forward, sigma 1e-3, K = 12 in a 4-dimensional span
    that holds g in part): the solve's error is the difference's own, far below the mean's."""
    model, (x, y) = _mlp(), _batch()
    g = flat_gradient(model, F.cross_entropy, x, y)
    r, K, d = 4, 12, sum(MLP_SIZES)
    u = torch.linalg.qr(torch.cat([_orthonormal(d, r - 1), g[:, None]], 1)).Q
    dirs = DirectionScheme(basis=Basis(u, MLP_SIZES))
    shapes = [p.shape for p in model.parameters()]
    target = u @ (u.T @ g)
    for spec in (EstimatorSpec(K, 1e-3, "forward", True), EstimatorSpec(K, 1e-3)):
        est = loss_differences(model, F.cross_entropy, x, y, 3, spec, dirs, "batched")
        g_hat = _flat(rebuild_gradient(shapes, 3, est.diffs, spec, dirs))
        err = float((g_hat - target).norm() / target.norm())
        assert err < 0.01 if spec.solve else err > 0.2, (spec, err)


def test_the_solve_is_linear_so_the_mean_of_the_uploads_rebuilds_the_mean():
    r, K, d = 3, 7, sum(MLP_SIZES)
    dirs = DirectionScheme(basis=Basis(_orthonormal(d, r), MLP_SIZES))
    spec, shapes = EstimatorSpec(K, 1e-4, "forward", True), [torch.Size([n]) for n in MLP_SIZES]
    ups = torch.randn(3, K, generator=torch.Generator().manual_seed(5)) * 1e-4
    each = torch.stack([_flat(rebuild_gradient(shapes, 6, u, spec, dirs)) for u in ups])
    once = _flat(rebuild_gradient(shapes, 6, ups.mean(0), spec, dirs))
    torch.testing.assert_close(once, each.mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(guide_dims=0), "set --guide-dims too"),
    (dict(K=5), "needs K > 5 at every round .got K=5"),
    (dict(K_milestones=(2,), K_values=(4,)), "got K=4"),
])
def test_a_solve_that_cannot_be_fitted_is_refused_in_one_line(change, match):
    with pytest.raises(ConfigError, match=match) as e:
        TrainConfig(**{"guide_dims": 5, "guide_solve": True, **change})
    assert "\n" not in str(e.value)


def test_a_solving_run_trains_as_the_mean_until_the_first_basis_then_apart(tmp_path):
    """Round 5 brings the first basis: up to it both rebuilds are the dense mean, bit for
    bit; from it on the solve's step differs. The config saved says which was used."""
    base = dict(dataset="digits", clients=4, K=10, guide_dims=4, guide_history=6,
                guide_refresh=5, guide_images=100, lr=3e-2, ema=False, seed=1)
    runs = {(solve, n): train(from_dict({**base, "guide_solve": solve, "rounds": n}),
                              run_dir=tmp_path / f"{solve}-{n}")
            for solve in (False, True) for n in (5, 6)}

    def weights(key):
        return _flat([p.detach() for p in runs[key].model.parameters()])
    assert torch.equal(weights((False, 5)), weights((True, 5)))
    # Adam's moments still hold the dense rounds' estimates, far longer than the span's
    # (their error grows with d, not r), so round 5's own gradient moves its update only a
    # little (measured 0.65% of it)
    step = (weights((False, 6)) - weights((False, 5))).norm()
    assert (weights((False, 6)) - weights((True, 6))).norm() > 1e-3 * step
    saved = from_dict(json.loads((tmp_path / "True-6" / "config.json").read_text()))
    assert saved.guide_solve is True
