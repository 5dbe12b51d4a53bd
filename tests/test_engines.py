"""Engines: grouped, vmap and in-place equal sequential; weights bit-identical; auto and budgets."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baffle import engines as eng
from baffle.directions import DirectionScheme, layer_blocks
from baffle.errors import ConfigError
from baffle.estimator import EstimatorSpec, choose_engine, grouped_plan, loss_differences
from baffle.models import build_model

DIRS = DirectionScheme()


def _model(name):
    cin, norm = (1, "none") if name == "lenet" else (3, "group")
    model = build_model(name, num_classes=10, in_channels=cin, norm=norm,
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, cin, 12, 12, generator=g)
    return model, x, torch.randint(0, 10, (6,), generator=g)


@pytest.mark.parametrize("name", ["lenet", "wrn-10-2"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("perturb", ["all", "layer"])
def test_every_engine_equals_sequential(name, scheme, perturb):
    _every_engine_equals_sequential(name, scheme, perturb, "torch")


@pytest.mark.parametrize("name", ["lenet", "wrn-10-2"])
@pytest.mark.parametrize("perturb", ["all", "layer"])
def test_every_engine_equals_sequential_with_the_counter_sampler(name, perturb):
    _every_engine_equals_sequential(name, "forward", perturb, "counter")


def _every_engine_equals_sequential(name, scheme, perturb, sampler):
    model, x, y = _model(name)
    assert grouped_plan(model) is not None  # the fast path really runs on the registry models
    blocks = layer_blocks([n for n, _ in model.named_parameters()]) if perturb == "layer" else ()
    dirs = DirectionScheme(blocks=blocks, sampler=sampler)
    before = [p.clone() for p in model.parameters()]
    spec = EstimatorSpec(9, 1e-3, scheme)
    ref = loss_differences(model, F.cross_entropy, x, y, 4, spec, dirs, "sequential")
    for engine, chunk in [("batched", 1), ("batched", 4), ("batched", 9), ("inplace", 1),
                          ("vmap", 5), ("auto", 32)]:
        est = loss_differences(model, F.cross_entropy, x, y, 4, spec, dirs, engine, chunk)
        # each loss (~2.3) is exact to float32 rounding, a few 1e-7; d_k is ~1e-3
        assert torch.allclose(est.diffs, ref.diffs, atol=2e-6, rtol=0), (engine, chunk)
        assert est.loss == pytest.approx(ref.loss, abs=1e-6)
        assert est.forward_passes == ref.forward_passes
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_inplace_restores_parameters_bit_identically(scheme):
    """Large sigma makes a +s/-s round trip inexact; the snapshot restore must not be."""
    model, x, y = _model("wrn-10-2")
    before = [p.detach().clone() for p in model.parameters()]
    versions = loss_differences(model, F.cross_entropy, x, y, 2, EstimatorSpec(3, 0.37, scheme),
                                DIRS, "inplace")
    assert torch.isfinite(versions.diffs).all()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_inplace_restores_even_when_the_loss_raises():
    model, x, y = _model("lenet")
    before = [p.detach().clone() for p in model.parameters()]

    def bad_loss(out, _):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loss_differences(model, bad_loss, x, y, 2, EstimatorSpec(3, 0.5), DIRS, "inplace")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class Unusual(nn.Module):
    """An op the grouped path does not know (a channel mean mixes the stacked models)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(1, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(1, 2, 3)).unsqueeze(1))


def test_unknown_ops_fall_back_and_stay_exact():
    model = Unusual()
    assert grouped_plan(model) is None
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 3, (4,))
    spec = EstimatorSpec(5, 1e-2)
    ref = loss_differences(model, F.cross_entropy, x, y, 1, spec, DIRS, "sequential")
    for engine in ("batched", "delta", "auto"):
        est = loss_differences(model, F.cross_entropy, x, y, 1, spec, DIRS, engine)
        assert torch.allclose(est.diffs, ref.diffs, atol=2e-6, rtol=0)


def test_auto_picks_inplace_under_a_tiny_budget_and_logs_it(caplog):
    model, x, y = _model("wrn-10-2")
    assert choose_engine(model, x, 100, "auto", 32, "1GiB").engine == "grouped"
    tiny = choose_engine(model, x, 100, "auto", 32, "100KiB")
    assert tiny.engine == "inplace" and "budget" in tiny.reason
    with caplog.at_level(logging.DEBUG, logger="baffle.engines"):
        loss_differences(model, F.cross_entropy, x, y, 0, EstimatorSpec(2), DIRS, "auto",
                         max_memory="100KiB")
    assert any("inplace" in r.getMessage() for r in caplog.records)


def test_chunks_shrink_to_the_budget():
    model, x, _ = _model("lenet")
    big = choose_engine(model, x, 64, "batched", 64, "1GiB")
    small = choose_engine(model, x, 64, "batched", 64, "1MiB")
    assert big.chunk == 64 and 1 <= small.chunk < 64


@pytest.mark.parametrize("text,expect", [("512MiB", 512 << 20), ("2GiB", 2 << 30),
                                         ("1.5GB", 1_500_000_000), ("800", 800 << 20),
                                         (64, 64 << 20), ("10 kib", 10 << 10)])
def test_parse_memory(text, expect):
    assert eng.parse_memory(text) == expect


@pytest.mark.parametrize("text", ["", "two GiB", "3 parsecs", "0MiB", "-1GiB"])
def test_parse_memory_refuses_nonsense(text):
    with pytest.raises(ConfigError):
        eng.parse_memory(text)


@pytest.mark.parametrize("engine", ["batched", "inplace", "sequential"])
@pytest.mark.parametrize("sampler", ["torch", "counter"])
def test_a_shared_direction_cache_changes_nothing(engine, sampler):
    from baffle.directions import DirectionCache, directions

    dirs = DirectionScheme(sampler=sampler)
    model, x, y = _model("lenet")
    spec = EstimatorSpec(5, 1e-3)
    cache = DirectionCache(dirs)
    ref = loss_differences(model, F.cross_entropy, x, y, 9, spec, dirs, engine)
    for _ in range(2):  # first call fills the cache, second reads it
        est = loss_differences(model, F.cross_entropy, x, y, 9, spec, dirs, engine, cache=cache)
        assert torch.equal(est.diffs, ref.diffs)
    assert cache.hits > 0
    shape = next(model.parameters()).shape
    assert torch.equal(cache.directions(9, range(5), 0, shape),
                       directions(dirs, 9, range(5), 0, shape))


def test_exact_fp32_turns_tf32_off_inside_and_restores_the_callers_settings():
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, mm.fp32_precision, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a caller who allows TF32 matmuls (legacy API)
    try:
        with eng.exact_fp32():
            assert (conv.fp32_precision, mm.fp32_precision) == ("ieee", "ieee")
        assert mm.fp32_precision == "tf32" and conv.fp32_precision == before[0]
        # the legacy getters still read after the block
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 == (before[0] == "tf32")
    finally:
        torch.set_float32_matmul_precision(before[2])



def test_auto_caps_its_chunk_at_two_on_a_cpu_and_at_k_on_a_gpu():
    from baffle.estimator import auto_chunk_cap

    assert auto_chunk_cap(torch.device("cpu"), 32, 100) == 2
    assert auto_chunk_cap(torch.device("cpu"), 1, 100) == 1
    assert auto_chunk_cap(torch.device("cuda"), 32, 100) == 100  # a device object, no GPU needed
    model, x, _ = _model("lenet")
    assert choose_engine(model, x, 100, "auto").chunk == 2  # this machine's CPU


def test_a_wide_chunk_takes_its_losses_in_one_vmap_call_and_equals_sequential():
    """From VMAP_LOSSES perturbations per pass the losses come from one batched call."""
    model, x, y = _model("lenet")
    K = eng.VMAP_LOSSES + 8
    spec = EstimatorSpec(K, 1e-3)
    calls = []

    def counted(logits, target):
        calls.append(logits.shape)
        return F.cross_entropy(logits, target)

    ref = loss_differences(model, F.cross_entropy, x, y, 4, spec, DIRS, "sequential")
    est = loss_differences(model, counted, x, y, 4, spec, DIRS, "batched", K)
    assert torch.allclose(est.diffs, ref.diffs, atol=2e-6, rtol=0)
    assert len(calls) == 2  # one batched call for the K losses, one for the base loss


def test_per_k_losses_fall_back_to_the_loop_for_a_loss_vmap_cannot_batch():
    g = torch.Generator().manual_seed(0)
    per_k = torch.randn(6, eng.VMAP_LOSSES, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)

    def data_dependent(logits, target):  # .item() is data-dependent control flow for vmap
        loss = F.cross_entropy(logits, target)
        return loss * 2 if loss.item() > 1e9 else loss

    loop = torch.stack([F.cross_entropy(per_k[:, j], y) for j in range(per_k.shape[1])])
    batched = eng.per_k_losses(F.cross_entropy, per_k, y)
    fallback = eng.per_k_losses(data_dependent, per_k, y)
    assert torch.equal(fallback, loop)  # the loop itself: same ops, same bits
    assert data_dependent in eng._UNBATCHABLE  # vmap is not tried again for it
    assert torch.equal(eng.per_k_losses(data_dependent, per_k, y), loop)
    assert torch.allclose(batched, loop, atol=1e-6, rtol=0)
    assert not torch.equal(batched, torch.zeros_like(batched))


@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), (2, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_pool_tiles_is_bit_identical_to_max_pool2d(kernel, layout):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 5, 13, 11, generator=g)  # odd sizes: floor mode drops the last tile
    h[0, 1, 2, 3], h[1, 2, 0, 0], h[2, 0, 4, 4] = float("nan"), float("-inf"), float("inf")
    h[3] = h[3].round()  # ties
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    ref = F.max_pool2d(h, kernel)
    out = eng.max_pool_tiles(h, *kernel)
    assert out.shape == ref.shape
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 1
    with pytest.raises(RuntimeError, match="too small"):  # as max_pool2d, not an empty map
        eng.max_pool_tiles(h[..., :1, :], *kernel)
    one = eng.max_pool_tiles(h[0], *kernel)  # unbatched (C, H, W), the NaN in it
    assert torch.equal(one.nan_to_num(7.0), ref[0].nan_to_num(7.0))


def test_tiled_max_pool_accepts_only_non_overlapping_tiles():
    assert eng.tiled_max_pool(nn.MaxPool2d(2)) == (2, 2)
    assert eng.tiled_max_pool(nn.MaxPool2d((2, 3))) == (2, 3)
    assert eng.tiled_max_pool(nn.MaxPool2d(3, stride=3)) == (3, 3)
    assert eng.tiled_max_pool(nn.MaxPool2d(1)) is None  # its "tiles" would alias the input
    for other in [nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2, padding=1),
                  nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(2, ceil_mode=True),
                  nn.MaxPool2d(2, return_indices=True)]:
        assert eng.tiled_max_pool(other) is None, other


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1)])
def test_grouped_engine_pools_tiles_by_maxima_and_others_by_max_pool2d(pool, monkeypatch):
    """LeNet's 2x2 pool takes the tiled path, an overlapping one the module; both exact."""
    model, x, y = _model("lenet")
    model.features[3] = pool
    calls = []
    tiles = eng.max_pool_tiles
    monkeypatch.setattr(eng, "max_pool_tiles", lambda *a: calls.append(1) or tiles(*a))
    spec = EstimatorSpec(6, 1e-3)
    ref = loss_differences(model, F.cross_entropy, x, y, 4, spec, DIRS, "sequential")
    est = loss_differences(model, F.cross_entropy, x, y, 4, spec, DIRS, "batched", 3)
    assert torch.allclose(est.diffs, ref.diffs, atol=2e-6, rtol=0)
    assert len(calls) == (2 if pool.padding == 0 else 0)  # K=6: two grouped passes of 3


class _SharedResiduals(nn.Module):
    """h feeds three sums, u two: a sum may write into an operand only where it dies."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a, self.b, self.c = (nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                  nn.Conv2d(4, 4, 1))
        self.act, self.pool, self.fc = nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = self.a(x)
        u = self.b(h) + h  # h lives on
        v = h + self.c(u)  # h lives on, u too
        w = (u + v) + h  # u, v die in the first sum, h in the second
        return self.fc(torch.flatten(self.pool(self.act(w)), 1))


@pytest.mark.parametrize("perturb", ["all", "layer"])
def test_sums_written_in_place_never_overwrite_a_live_operand(perturb):
    model = _SharedResiduals()
    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(5, 1, 6, 6, generator=g), torch.randint(0, 10, (5,), generator=g)
    blocks = layer_blocks([n for n, _ in model.named_parameters()]) if perturb == "layer" else ()
    dirs, spec = DirectionScheme(blocks=blocks), EstimatorSpec(8, 1e-3)
    ref = loss_differences(model, F.cross_entropy, x, y, 4, spec, dirs, "sequential")
    for chunk in (1, 3, 8):
        est = loss_differences(model, F.cross_entropy, x, y, 4, spec, dirs, "batched", chunk)
        assert torch.allclose(est.diffs, ref.diffs, atol=2e-6, rtol=0), chunk
    x0 = x.clone()
    loss_differences(model, F.cross_entropy, x, y, 4, spec, dirs, "batched", 8)
    assert torch.equal(x, x0)  # the input is never written


def test_a_sum_writes_into_the_stacked_operand_that_dies_and_keeps_its_bits():
    plan_ = eng.plan(_SharedResiduals())
    node = [n for n in plan_.graph.nodes if n.target in eng._ADDS][1]  # h + c(u)
    assert [a.name for a in plan_.last_use[node]] == ["c"]  # h lives on, c(u) dies here
    run = eng._Stacked(plan_, {}, 2)
    g = torch.Generator().manual_seed(7)
    h, c = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g)
    h0, want = h.clone(), h + c
    out, st = run.add(node, (h, True), (c, True))
    assert st and out.data_ptr() == c.data_ptr() and torch.equal(out, want)  # c + h: same bits
    assert torch.equal(h, h0)
    shared = torch.randn(3, 4, 4, 4, generator=g)  # the unperturbed h, c(u) stacked
    c = torch.randn(3, 8, 4, 4, generator=g)
    want = (c.unflatten(1, (2, -1)) + shared.unsqueeze(1)).flatten(1, 2)
    out, st = run.add(node, (shared, False), (c, True))
    assert st and out.data_ptr() == c.data_ptr() and torch.equal(out, want)
    h = torch.randn(3, 8, 4, 4, generator=g)  # stacked h, shared c(u): h must survive
    h0, want = h.clone(), (h.unflatten(1, (2, -1)) + shared.unsqueeze(1)).flatten(1, 2)
    out, st = run.add(node, (h, True), (shared, False))
    assert st and torch.equal(h, h0) and torch.equal(out, want)
    recording = eng._Stacked(plan_, {}, 2, record={})  # the recorded pass writes nothing
    c = torch.randn(3, 8, 4, 4, generator=g)
    c0 = c.clone()
    recording.add(node, (h, True), (c, True))
    assert torch.equal(c, c0)


def test_perturbed_weights_keep_the_dtype_of_w_plus_step_eps():
    g = torch.Generator().manual_seed(8)
    w32, eps = torch.randn(3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    want = w32.unsqueeze(0) + 1e-3 * eps
    got = eng._shifted(w32, eps.clone(), 1e-3)
    assert torch.equal(got, want)  # written into the draw, same bits
    w64 = w32.double()
    got = eng._shifted(w64, eps.clone(), 1e-3)
    assert got.dtype == torch.float64 and torch.equal(got, w64.unsqueeze(0) + 1e-3 * eps)
