"""The delta engine: bfloat16 changes on a float32 unperturbed pass, held against float64."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from baffle import engines as eng
from baffle.config import TrainConfig, validate
from baffle.data.mnist import load_mnist
from baffle.directions import DirectionScheme, layer_blocks
from baffle.errors import ConfigError
from baffle.estimator import EstimatorSpec, choose_engine, float64_diffs, loss_differences
from baffle.models import build_model
from baffle.reconstruct import rebuild_gradient

ULP = 2.0 ** -23  # float32's spacing at 1: a loss near 2.3 is rounded to about 1.4e-7


def _model(name, batch=6, side=12):
    cin, norm = (1, "none") if name == "lenet" else (3, "group")
    model = build_model(name, num_classes=10, in_channels=cin, norm=norm,
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, cin, side, side, generator=g)
    return model, x, torch.randint(0, 10, (batch,), generator=g)


def _float64_diffs(model, x, y, seed, spec, dirs):
    """d_k in float64, along the same float32 directions: the reference both engines miss."""
    m64 = copy.deepcopy(model).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {n: p.detach().double() for n, p in m64.named_parameters()}
    draw = eng.drawer(dirs, seed)

    def loss(sign, k):
        point = {n: w[n] + sign * spec.sigma * draw(range(k, k + 1), i, w[n].shape,
                                                    torch.device("cpu"))[0].double()
                 for i, n in enumerate(names)}
        return F.cross_entropy(functional_call(m64, point, (x.double(),)), y)

    base = F.cross_entropy(m64(x.double()), y)
    other = (lambda k: base) if spec.scheme == "forward" else (lambda k: loss(-1.0, k))
    return torch.stack([loss(1.0, k) - other(k) for k in range(spec.K)])


@pytest.mark.parametrize("name", ["lenet", "wrn-10-2"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("perturb", ["all", "layer"])
@pytest.mark.parametrize("sigma", [1e-4, 0.1])
def test_delta_is_within_bfloat16_of_the_change_of_float64(name, scheme, perturb, sigma):
    """Each d_k within float32's rounding of the losses plus 2^-4 of the mean |d_k| (their
    mean error within 2^-6 of it); on LeNet at the paper's sigma, no worse in the mean
    than 2x the float32 engine's own error (there the losses' rounding dominates)."""
    model, x, y = _model(name)
    blocks = layer_blocks([n for n, _ in model.named_parameters()]) if perturb == "layer" else ()
    dirs = DirectionScheme(blocks=blocks)
    spec = EstimatorSpec(12, sigma, scheme)
    before = [p.clone() for p in model.parameters()]
    ref = _float64_diffs(model, x, y, 5, spec, dirs)
    delta = loss_differences(model, F.cross_entropy, x, y, 5, spec, dirs, "delta", 4)
    fp32 = loss_differences(model, F.cross_entropy, x, y, 5, spec, dirs, "batched", 4)
    err, err32 = (delta.diffs.double() - ref).abs(), (fp32.diffs.double() - ref).abs()
    floor, size = 8 * ULP * abs(delta.loss), ref.abs().mean()
    assert err.max() <= floor + 2.0 ** -4 * size, (err.max(), size)
    assert err.mean() <= floor + 2.0 ** -6 * size, (err.mean(), size)
    if name == "lenet" and sigma == 1e-4:
        assert err.mean() <= 2 * err32.mean() + ULP * abs(delta.loss), (err, err32)
    # forward: L(W) from one float32 pass; central: the mean of the perturbed losses
    tol = 1e-6 if scheme == "forward" else floor + 2.0 ** -6 * float(size)
    assert delta.loss == pytest.approx(fp32.loss, abs=tol)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["lenet", "wrn-10-2"])
def test_at_a_large_sigma_delta_shows_bfloat16_rounding_of_the_change_and_no_more(name):
    """sigma = 0.1 puts the losses' float32 rounding far below the changes: the float32
    engine's mean error is then under 2^-14 of the mean |d_k|, the delta engine's between
    that (the changes really ran in bfloat16) and 2^-6."""
    model, x, y = _model(name)
    spec = EstimatorSpec(12, 0.1)
    ref = _float64_diffs(model, x, y, 3, spec, DirectionScheme())
    err = {e: (loss_differences(model, F.cross_entropy, x, y, 3, spec, DirectionScheme(), e,
                                4).diffs.double() - ref).abs().mean() / ref.abs().mean()
           for e in ("batched", "delta")}
    assert err["batched"] < 2.0 ** -14, err
    assert 2.0 ** -14 < err["delta"] < 2.0 ** -6, err


def test_the_library_float64_reference_equals_the_tests_own():
    model, x, y = _model("lenet")
    for scheme in ("forward", "central"):
        spec = EstimatorSpec(5, 1e-3, scheme)
        ours = _float64_diffs(model, x, y, 2, spec, DirectionScheme())
        assert torch.allclose(float64_diffs(model, F.cross_entropy, x, y, 2, spec), ours,
                              rtol=1e-12, atol=1e-15)


def test_on_real_mnist_the_delta_gradient_is_the_float32_one(mnist_dir):
    """The paper's LeNet, batch 32 of real MNIST training images, K = 50, sigma = 1e-4:
    the gradients rebuilt from the two engines' differences agree to cosine 0.999, and the
    delta one is as close to the float64 one as the float32 one is (float32's own rounding
    of the losses moves it by as much)."""
    data = load_mnist(mnist_dir)
    model = build_model("lenet", num_classes=10, in_channels=1,
                        generator=torch.Generator().manual_seed(0))
    x, y = data.train.x[:32], data.train.y[:32]
    spec = EstimatorSpec(50, 1e-4)
    shapes = [p.shape for p in model.parameters()]

    def grad(diffs):
        return torch.cat([g.flatten() for g in rebuild_gradient(shapes, 9, diffs, spec)])

    g = {e: grad(loss_differences(model, F.cross_entropy, x, y, 9, spec, engine=e).diffs)
         for e in ("batched", "delta")}
    g64 = grad(float64_diffs(model, F.cross_entropy, x, y, 9, spec).float())
    cos = {k: float(F.cosine_similarity(a, b, dim=0)) for k, (a, b) in {
        "delta-fp32": (g["delta"], g["batched"]), "delta-fp64": (g["delta"], g64),
        "fp32-fp64": (g["batched"], g64)}.items()}
    assert min(cos.values()) > 0.999, cos  # measured: 0.99993, 0.99987, 0.99984
    assert cos["delta-fp64"] >= cos["fp32-fp64"] - 1e-4, cos


def test_the_config_accepts_delta_and_names_it_among_the_engines():
    validate(TrainConfig(engine="delta"))
    with pytest.raises(ConfigError, match="delta"):
        validate(TrainConfig(engine="fast"))


def test_delta_runs_convs_of_small_fan_in_in_float32(monkeypatch):
    """Below DELTA_MIN_FAN_IN every conv takes the float32 grouped path: the engine then
    equals the batched engine to float32 rounding."""
    model, x, y = _model("lenet")
    spec = EstimatorSpec(6, 0.1)
    ref = loss_differences(model, F.cross_entropy, x, y, 2, spec, DirectionScheme(), "batched", 4)
    monkeypatch.setattr(eng, "DELTA_MIN_FAN_IN", 10**9)
    est = loss_differences(model, F.cross_entropy, x, y, 2, spec, DirectionScheme(), "delta", 4)
    assert torch.allclose(est.diffs, ref.diffs, atol=2e-6, rtol=0)


def test_delta_chunks_at_the_cap_on_a_cpu_and_within_the_budget():
    model, x, _ = _model("lenet")
    choice = choose_engine(model, x, 100, "delta")
    assert (choice.engine, choice.chunk) == ("delta", eng.DELTA_CHUNK_CAP)
    assert choose_engine(model, x, 100, "delta", 2).chunk == 2
    small = choose_engine(model, x, 100, "delta", 32, "1MiB")
    assert small.engine == "delta" and 1 <= small.chunk < eng.DELTA_CHUNK_CAP


@pytest.mark.parametrize("fused", [True, False])
def test_conv_add_equals_a_conv_and_an_add(fused, monkeypatch):
    """The fused oneDNN conv + add (CPU), and the plain fallback, against F.conv2d,
    bfloat16 as the engine uses it."""
    if not fused:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 2 * 6, 7, 7, generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(2 * 5, 6, 3, 3, generator=g).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last)
    out = torch.randn(2, 10, 7, 7, generator=g).to(torch.bfloat16)
    out = out.contiguous(memory_format=torch.channels_last)
    want = out.float() + F.conv2d(x, w, None, 1, 1, 1, 2).float()
    if fused:  # the fused op must do it alone: no fallback to a separate conv

        def no_conv(*_args, **_kwargs):
            raise AssertionError("fell back to F.conv2d")

        monkeypatch.setattr(eng.F, "conv2d", no_conv)
    eng.conv_add_(out, x, w, m, 2)
    assert torch.allclose(out.float(), want, rtol=2.0 ** -7, atol=2.0 ** -5)


def test_steady_heap_stops_the_page_faults_of_repeated_delta_estimates():
    """glibc's default maps each multi-MiB activation of a chunk afresh and faults its pages
    in again on every estimate; after ``steady_heap`` (which the delta engine calls) a warm
    estimate reuses the freed blocks. Counted as minor page faults, in fresh processes."""
    code = """
import resource, sys, torch, torch.nn.functional as F
from baffle import engines as eng
if sys.argv[1] == "default":
    eng.steady_heap = lambda: False
from baffle.estimator import EstimatorSpec, loss_differences
from baffle.models import build_model
torch.set_num_threads(1)
model = build_model("lenet", num_classes=10, in_channels=1,
                    generator=torch.Generator().manual_seed(0))
x, y = torch.rand(32, 1, 32, 32), torch.randint(0, 10, (32,))
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss_differences(model, F.cross_entropy, x, y, 1, EstimatorSpec(K=12), engine="delta", chunk=4)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[2:]))
"""
    warm = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                                     text=True, check=True).stdout)
            for mode in ("steady", "default")}
    assert warm["steady"] * 5 < warm["default"], warm
    assert eng.steady_heap() is True and eng.steady_heap() is True  # glibc here; then a no-op
