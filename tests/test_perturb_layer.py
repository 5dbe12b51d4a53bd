"""Layerwise directions (--perturb layer): each direction moves one layer; each layer
averages its own directions. Exact against an independent rebuild, unbiased, with the
per-layer error the theory predicts, and refused where a layer would get no direction."""

import math

import pytest
import torch
from torch import nn

from baffle import engines as eng
from baffle.config import TrainConfig
from baffle.directions import DirectionCache, DirectionScheme, direction, directions, layer_blocks
from baffle.errors import ConfigError, SchemeMismatchError
from baffle.estimator import (EstimatorSpec, choose_engine, grouped_plan, loss_differences,
                              trainable_params)
from baffle.models import build_model
from baffle.reconstruct import rebuild_gradient
from baffle.simulator import setup


class TwoLayers(nn.Module):
    """A linear loss L = a1.w1 + a2.w2 over a small layer with a large gradient (n1 = 4)
    and a large layer with a small one (n2 = 200): the shape LeNet's gradient has."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.small, self.big = nn.Module(), nn.Module()
        self.small.w = nn.Parameter(torch.randn(4, generator=g))
        self.big.w = nn.Parameter(torch.randn(200, generator=g))
        self.a1 = 3.0 * torch.randn(4, generator=g)
        self.a2 = 0.05 * torch.randn(200, generator=g)

    def forward(self, x):
        return self.a1 @ self.small.w + self.a2 @ self.big.w


LAYERED = DirectionScheme(blocks=(0, 1))


def _estimate(model, K, seed, dirs, sigma=1e-2):
    spec = EstimatorSpec(K, sigma)
    est = loss_differences(model, lambda out, _: out, torch.zeros(1), torch.zeros(1), seed, spec,
                           dirs, "sequential")
    return rebuild_gradient([model.small.w.shape, model.big.w.shape], seed, est.diffs, spec, dirs)


def test_layer_blocks_group_a_module_weight_and_bias():
    names = ["conv1.weight", "conv1.bias", "block.0.conv.weight", "fc.weight", "fc.bias"]
    assert layer_blocks(names) == (0, 0, 1, 2, 2)


def test_a_layer_direction_is_the_dense_draw_on_its_layer_and_zero_elsewhere():
    dense, cache = DirectionScheme(), DirectionCache(LAYERED)
    for k in range(6):
        for p in (0, 1):
            full = direction(dense, 3, k, p, (5, 7))
            want = full if k % 2 == p else torch.zeros_like(full)
            assert torch.equal(direction(LAYERED, 3, k, p, (5, 7)), want)
            assert torch.equal(directions(LAYERED, 3, range(k, k + 1), p, (5, 7))[0], want)
            assert torch.equal(cache.directions(3, range(k, k + 1), p, (5, 7))[0], want)


def test_the_rebuild_averages_each_layer_over_its_own_directions():
    """An independent rebuild from dense draws: g_b = 1/(K_b sigma) sum_{k in b} d_k eps_k,
    with K_0 = 3 and K_1 = 2 directions for K = 5."""
    model, K, seed, sigma = TwoLayers(), 5, 11, 1e-2
    g1, g2 = _estimate(model, K, seed, LAYERED, sigma)
    dense = DirectionScheme()
    ref = [torch.zeros(4), torch.zeros(200)]
    for k in range(K):
        b = k % 2
        eps = direction(dense, seed, k, b, ref[b].shape)
        d = sigma * float((model.a1, model.a2)[b] @ eps)  # the exact difference of a linear loss
        ref[b] += d * eps / (len(range(b, K, 2)) * sigma)
    assert torch.allclose(g1, ref[0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(g2, ref[1], rtol=1e-4, atol=1e-5)


def test_layer_estimates_are_unbiased_and_cut_the_small_gradient_layers_error():
    """Gaussian directions on a linear loss give E|g_b - a_b|^2 = (n_b |a|^2 + |a_b|^2) / K
    on layer b when every direction moves everything, and (n_b + 1)|a_b|^2 / K_b when layer
    b has K_b directions of its own. Over 300 seeds at K = 20: the mean is within 4 standard
    errors of a, and each RMS error is within 15% of its prediction."""
    model, K, n = TwoLayers(), 20, 300
    a1, a2 = model.a1, model.a2
    total = float(a1 @ a1 + a2 @ a2)
    runs = {name: [_estimate(model, K, s, dirs) for s in range(n)]
            for name, dirs in (("all", DirectionScheme()), ("layer", LAYERED))}
    predicted = {
        "all": [(4 * total + float(a1 @ a1)) / K, (200 * total + float(a2 @ a2)) / K],
        "layer": [5 * float(a1 @ a1) / (K / 2), 201 * float(a2 @ a2) / (K / 2)],
    }
    measured = {}
    for name, gs in runs.items():
        for b, a in enumerate((a1, a2)):
            est = torch.stack([g[b] for g in gs])
            measured[name, b] = float(((est - a) ** 2).sum(1).mean())
            assert math.sqrt(measured[name, b]) == pytest.approx(
                math.sqrt(predicted[name][b]), rel=0.15), (name, b)
            se = est.std(0) / math.sqrt(n)
            assert bool(((est.mean(0) - a).abs() <= 4 * se + 1e-6).all()), (name, b)
    # the big, flat layer no longer carries the small layer's gradient: predicted 3.9x less
    # error variance there for these a1, a2
    assert measured["all", 1] / measured["layer", 1] > 3


def test_blocks_change_the_fingerprint_and_a_mismatch_is_refused():
    dense = DirectionScheme()
    assert LAYERED.fingerprint() != dense.fingerprint()
    assert DirectionScheme(blocks=(0, 1, 1)).fingerprint() != LAYERED.fingerprint()
    with pytest.raises(SchemeMismatchError, match="--perturb"):
        LAYERED.check(dense.version, dense.fingerprint())


def test_bad_blocks_and_too_few_directions_are_refused():
    with pytest.raises(ValueError, match="none skipped"):
        DirectionScheme(blocks=(0, 2))
    assert LAYERED.weights(5) == [5 / 3, 5 / 2, 5 / 3, 5 / 2, 5 / 3]
    with pytest.raises(ConfigError, match="K >= 2"):
        LAYERED.weights(1)


def test_a_run_refuses_a_k_below_the_layer_count():
    cfg = TrainConfig(dataset="digits", clients=2, rounds=1, perturb="layer", K=2)
    with pytest.raises(ConfigError, match="K >= 3"):  # LeNet: conv1, conv2, classifier
        setup(cfg)
    with pytest.raises(ConfigError, match="K >= 3"):  # a K schedule is checked too
        setup(cfg.replace(K=5, K_milestones=(1,), K_values=(2,)))
    assert setup(cfg.replace(K=3)).dirs.blocks == (0, 0, 1, 1, 2, 2)
    with pytest.raises(ConfigError, match="unknown perturb"):
        TrainConfig(perturb="every")


def test_the_rebuild_refuses_a_cache_drawn_for_another_layout():
    with pytest.raises(ValueError, match="another scheme"):
        rebuild_gradient([torch.Size([4]), torch.Size([200])], 1, torch.zeros(5),
                         EstimatorSpec(5, 1e-2), LAYERED, cache=DirectionCache(DirectionScheme()))


def _lenet_batch():
    model = build_model("lenet", num_classes=10, in_channels=1, norm="none",
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(5, 1, 12, 12, generator=g), torch.randint(0, 10, (5,), generator=g)


def _calls(module: nn.Module, box: list[int]):
    return module.register_forward_hook(lambda *_: box.__setitem__(0, box[0] + 1))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_layers_below_a_perturbed_one_run_once_per_estimate(chunk):
    """Grouped engine, layer directions: conv1 and conv2 run unperturbed once (recorded)
    and never again; without reuse they rerun for every chunk that does not perturb them,
    and both give the same losses."""
    model, x, y = _lenet_batch()
    params = trainable_params(model)
    dirs = DirectionScheme(blocks=layer_blocks(list(params)))
    draw = eng.drawer(dirs, 3)
    conv1, conv2 = [0], [0]
    hooks = [_calls(model.features[0], conv1), _calls(model.features[4], conv2)]
    K, plan = 12, grouped_plan(model)
    chunks = eng.block_chunks(K, chunk, dirs.blocks, len(params))
    above = {b: sum(1 for _, moved in chunks if min(dirs.blocks[i] for i in moved) > b)
             for b in (0, 1)}  # chunks that perturb only layers above conv1 / conv2
    with torch.no_grad():
        plain = eng.grouped_losses(plan, nn.functional.cross_entropy, x, y, params, draw, K,
                                   1e-3, chunk, dirs.blocks, reuse=False)
        assert (conv1[0], conv2[0]) == (above[0], above[1]) and above[0] > 1
        conv1[0] = conv2[0] = 0
        reused = eng.grouped_losses(plan, nn.functional.cross_entropy, x, y, params, draw, K,
                                    1e-3, chunk, dirs.blocks, reuse=True)
    for h in hooks:
        h.remove()
    assert (conv1[0], conv2[0]) == (1, 1)
    torch.testing.assert_close(reused, plain, rtol=0, atol=1e-6)
    for k in (0, 4, 11):
        point = {n: p + 1e-3 * directions(dirs, 3, range(k, k + 1), i, p.shape)[0]
                 for i, (n, p) in enumerate(params.items())}
        with torch.no_grad():
            want = nn.functional.cross_entropy(torch.func.functional_call(model, point, (x,)), y)
        assert abs(float(reused[k]) - float(want)) < 1e-6, k


def test_block_chunks_cover_every_direction_once_within_one_block():
    blocks = (0, 0, 1, 2, 2)
    chunks = eng.block_chunks(10, 2, blocks, 5)
    seen = sorted(k for ks, _ in chunks for k in ks)
    assert seen == list(range(10))
    for ks, moved in chunks:
        assert len(ks) <= 2 and {k % 3 for k in ks} == {blocks[min(moved)]}
        assert moved == {i for i, b in enumerate(blocks) if b == ks[0] % 3}
    assert eng.block_chunks(5, 2, (), 3) == [(range(0, 2), {0, 1, 2}), (range(2, 4), {0, 1, 2}),
                                             (range(4, 5), {0, 1, 2})]


def test_reuse_is_chosen_only_when_the_recorded_pass_fits_the_budget():
    model, x, _ = _lenet_batch()
    blocks = layer_blocks([n for n, _ in model.named_parameters()])
    roomy = choose_engine(model, x, 30, "auto", 32, "1GiB", blocks)
    assert roomy.engine == "grouped" and roomy.reuse and "reused" in roomy.reason
    assert not choose_engine(model, x, 30, "auto", 32, "1GiB").reuse  # dense: nothing to reuse
    peak, total = eng.activation_bytes(grouped_plan(model), x)
    per = eng.per_perturbation_bytes(peak, sum(p.numel() * 4 for p in model.parameters()))
    tight = choose_engine(model, x, 30, "auto", 1, f"{per + total - 1}B", blocks)
    assert tight.engine == "grouped" and tight.chunk == 1 and not tight.reuse


class Fork(nn.Module):
    """A tensor read by a conv and then, last, by an in-place-able ReLU: the ReLU must not
    overwrite the value the recorded pass keeps for the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        a = self.side(h)
        return self.fc(torch.flatten(self.pool(a + self.act(h)), 1))


def test_the_recorded_pass_survives_in_place_activations():
    torch.manual_seed(0)
    model = Fork()
    assert grouped_plan(model) is not None
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 1])
    dirs = DirectionScheme(blocks=layer_blocks([n for n, _ in model.named_parameters()]))
    _assert_batched_is_sequential(model, x, y, dirs, EstimatorSpec(9, 1e-3), seed=2)


def _assert_batched_is_sequential(model, x, y, dirs, spec, seed):
    """The grouped engine at chunks 1 and 3 against one functional_call per direction."""
    ref = loss_differences(model, nn.functional.cross_entropy, x, y, seed, spec, dirs,
                           "sequential")
    for chunk in (1, 3):
        est = loss_differences(model, nn.functional.cross_entropy, x, y, seed, spec, dirs,
                               "batched", chunk)
        torch.testing.assert_close(est.diffs, ref.diffs, rtol=0, atol=2e-6)


# --layer-cycle: direction k moves layer cycle[k mod len(cycle)]

CYCLED = DirectionScheme(blocks=(0, 1), cycle=(0, 1, 1, 1))  # the big layer gets 3 in 4


def test_a_cycle_gives_each_layer_its_share_and_each_direction_its_dense_draw():
    scheme = DirectionScheme(blocks=(0, 0, 1, 2, 2), cycle=(2, 1, 1, 0))
    assert [scheme.block_of(k) for k in range(6)] == [2, 1, 1, 0, 2, 1]
    assert list(scheme.moving(2, 10)) == [1, 2, 5, 6, 9]  # tensor 2 is block 1
    assert list(scheme.moving(0, 10)) == [3, 7]
    w = scheme.weights(10)  # K / K_b: blocks 2, 1, 0 get 3, 5, 2 of the 10 directions
    assert [w[k] for k in (0, 1, 3)] == [10 / 3, 10 / 5, 10 / 2]
    dense = DirectionScheme()
    for k in range(8):
        for p in range(5):
            full = direction(dense, 3, k, p, (4, 3))
            want = full if scheme.block_of(k) == scheme.blocks[p] else torch.zeros_like(full)
            assert torch.equal(direction(scheme, 3, k, p, (4, 3)), want)
            assert torch.equal(directions(scheme, 3, [k], p, (4, 3))[0], want)


def test_the_default_cycle_spelled_out_is_the_default_scheme():
    spelled = DirectionScheme(blocks=(0, 0, 1, 2, 2), cycle=(0, 1, 2))
    default = DirectionScheme(blocks=(0, 0, 1, 2, 2))
    assert spelled == default and spelled.fingerprint() == default.fingerprint()
    assert spelled.moving(3, 10) == range(2, 10, 3)


def test_a_cycled_rebuild_averages_each_layer_over_its_own_directions():
    # the loss is linear, so every sigma gives the exact directional derivative; sigma 1
    # keeps the float32 round-off of a loss difference (which varies with the CPU's dot
    # product kernel: at 1e-2 it reached 1.03x the tolerance on an AVX-512 Xeon) far below it
    model, K, seed, sigma = TwoLayers(), 7, 5, 1.0
    g1, g2 = _estimate(model, K, seed, CYCLED, sigma)
    dense, ref = DirectionScheme(), [torch.zeros(4), torch.zeros(200)]
    counts = [2, 5]  # k = 0, 4 move layer 0; k = 1, 2, 3, 5, 6 layer 1
    for k in range(K):
        b = 0 if k % 4 == 0 else 1
        eps = direction(dense, seed, k, b, ref[b].shape)
        d = sigma * float((model.a1, model.a2)[b] @ eps)
        ref[b] += d * eps / (counts[b] * sigma)
    assert torch.allclose(g1, ref[0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(g2, ref[1], rtol=1e-4, atol=1e-5)


def test_cycled_estimates_are_unbiased_with_the_error_of_each_layers_share():
    """K_0 = 5 and K_1 = 15 of K = 20: E|g_b - a_b|^2 = (n_b + 1)|a_b|^2 / K_b. Over 300
    seeds the mean is within 4 standard errors of a and each RMS error within 15% of its
    prediction; the big layer's error is 3x smaller than under the default cycle's 10."""
    model, K, n = TwoLayers(), 20, 300
    gs = [_estimate(model, K, s, CYCLED) for s in range(n)]
    for b, (a, size, K_b) in enumerate(((model.a1, 4, 5), (model.a2, 200, 15))):
        est = torch.stack([g[b] for g in gs])
        measured = float(((est - a) ** 2).sum(1).mean())
        assert math.sqrt(measured) == pytest.approx(
            math.sqrt((size + 1) * float(a @ a) / K_b), rel=0.15), b
        se = est.std(0) / math.sqrt(n)
        assert bool(((est.mean(0) - a).abs() <= 4 * se + 1e-6).all()), b


def test_the_grouped_engine_follows_the_cycle():
    """Batched (grouped, the unperturbed pass reused) against one functional_call per
    direction, on LeNet with a cycle that is neither sorted nor equal."""
    model, x, y = _lenet_batch()
    dirs = DirectionScheme(blocks=layer_blocks([n for n, _ in model.named_parameters()]),
                           cycle=(1, 0, 2, 1, 1))
    _assert_batched_is_sequential(model, x, y, dirs, EstimatorSpec(13, 1e-3), seed=4)
    chunks = eng.block_chunks(13, 3, dirs.blocks, 6, dirs.cycle)
    assert sorted(k for ks, _ in chunks for k in ks) == list(range(13))
    for ks, moved in chunks:
        assert {dirs.block_of(k) for k in ks} == {dirs.blocks[min(moved)]}


def test_a_cycle_changes_the_fingerprint_and_a_mismatch_names_the_flag():
    other = DirectionScheme(blocks=(0, 1), cycle=(0, 0, 1))
    assert len({CYCLED.fingerprint(), other.fingerprint(), LAYERED.fingerprint()}) == 3
    with pytest.raises(SchemeMismatchError, match="--layer-cycle"):
        CYCLED.check(LAYERED.version, LAYERED.fingerprint())


def test_bad_cycles_are_refused_with_one_line():
    with pytest.raises(ValueError, match="each of the 2 block"):
        DirectionScheme(blocks=(0, 1), cycle=(0, 0))
    with pytest.raises(ValueError, match="needs blocks"):
        DirectionScheme(cycle=(0,))
    with pytest.raises(ConfigError, match="K >= 4"):  # layer 0 first comes at k = 3
        DirectionScheme(blocks=(0, 1), cycle=(1, 1, 1, 0)).weights(3)
    cfg = TrainConfig(dataset="digits", clients=2, rounds=1, perturb="layer", K=6)
    with pytest.raises(ConfigError, match="applies to --perturb layer"):
        cfg.replace(perturb="all", layer_cycle=(0, 1, 2))
    with pytest.raises(ConfigError, match="model's 3 layers 0..2"):
        setup(cfg.replace(layer_cycle=(0, 1, 3)))
    with pytest.raises(ConfigError, match="model's 3 layers"):
        setup(cfg.replace(layer_cycle=(0, 1)))
    with pytest.raises(ConfigError, match="K >= 5"):
        setup(cfg.replace(K=4, layer_cycle=(1, 1, 1, 0, 2)))
    assert setup(cfg.replace(layer_cycle=(0, 1, 1, 2))).dirs.cycle == (0, 1, 1, 2)
