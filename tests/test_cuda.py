"""On a CUDA device: every engine against a float64 reference, exact restore, the
fingerprint of GPU-drawn directions, and training (learns, resumes bit-identically).

Skipped without a GPU; run on one with ``pytest tests/test_cuda.py``.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from baffle import TrainConfig, train
from baffle.client import local_epoch_update, local_optimizer, replay_local_epoch
from baffle.directions import GUIDE_TENSOR, Basis, DirectionScheme, directions, layer_blocks
from baffle.errors import SchemeMismatchError
from baffle.estimator import EstimatorSpec, choose_engine, loss_differences
from baffle.models import build_model
from baffle.reconstruct import rebuild_gradient
from baffle.server import make_optimizer
from benchmarks.gpu import float64_diffs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU = DirectionScheme(device="cuda")


def _model(name, batch=16):
    cin, norm = (1, "none") if name == "lenet" else (3, "group")
    model = build_model(name, num_classes=10, in_channels=cin, norm=norm,
                        generator=torch.Generator().manual_seed(0)).cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, cin, 32, 32, generator=g)
    return model, x.cuda(), torch.randint(0, 10, (batch,), generator=g).cuda()


@pytest.fixture
def tf32_on():
    """cuDNN's default on this GPU generation: float32 convs in TF32."""
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, mm.fp32_precision
    conv.fp32_precision = mm.fp32_precision = "tf32"
    yield
    conv.fp32_precision, mm.fp32_precision = saved


@pytest.mark.parametrize("name", ["lenet", "wrn-10-2"])
@pytest.mark.parametrize("perturb", ["all", "layer"])
def test_every_engine_matches_float64_on_the_gpu(name, perturb, tf32_on):
    model, x, y = _model(name)
    dirs = GPU if perturb == "all" else DirectionScheme(
        device="cuda", blocks=layer_blocks([n for n, _ in model.named_parameters()]))
    spec = EstimatorSpec(12, 1e-3)
    ref = float64_diffs(model, x, y, 5, spec, dirs)
    before = [p.detach().clone() for p in model.parameters()]
    for engine, chunk in [("sequential", 1), ("batched", 5), ("delta", 4), ("inplace", 1),
                          ("vmap", 4), ("auto", 32)]:
        est = loss_differences(model, F.cross_entropy, x, y, 5, spec, dirs, engine, chunk)
        rel = float((est.diffs.double() - ref).norm() / ref.norm())
        # float32 rounding of a loss near 2.3 is ~1e-6 against d_k ~ 1e-3: rel ~ 1e-3.
        # TF32 (10-bit mantissas) would put ~1e-3 into every loss: rel ~ 1.
        assert rel < 0.03, (engine, chunk, rel)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the caller's setting is back


def test_auto_runs_the_grouped_engine_on_the_gpu():
    model, x, _ = _model("lenet", batch=32)
    choice = choose_engine(model, x, 100, "auto")  # --chunk's default (32) binds batched only
    assert choice.engine == "grouped" and choice.chunk == 100, choice
    assert choose_engine(model, x, 100, "auto", max_memory="64MiB").chunk < 100


def test_gpu_directions_have_their_own_fingerprint():
    cpu = DirectionScheme()
    assert GPU.fingerprint() != cpu.fingerprint()
    GPU.check(GPU.version, GPU.fingerprint())
    with pytest.raises(SchemeMismatchError, match="device cuda"):
        GPU.check(cpu.version, cpu.fingerprint())
    a = directions(GPU, 3, range(2), 0, (5, 7))
    assert a.device.type == "cuda" and torch.equal(a, directions(GPU, 3, range(2), 0, (5, 7)))


def test_stacked_gpu_draws_are_each_directions_own_fresh_generator_draw():
    """``directions`` re-seeds one CUDA generator per direction: the same numbers as a new
    generator per direction (manual_seed also resets the Philox offset)."""
    from baffle.directions import SCHEME_VERSION, derive_seed

    ks = [4, 0, 7]
    for p, shape in enumerate([(3,), (64, 16, 5, 5)]):
        stacked = directions(GPU, 11, ks, p, shape)
        for i, k in enumerate(ks):
            g = torch.Generator(device="cuda").manual_seed(
                derive_seed(SCHEME_VERSION, 11, k, p))
            assert torch.equal(stacked[i], torch.randn(shape, generator=g, device="cuda"))


def test_counter_sampler_on_the_gpu_is_the_cpus_formula():
    """The integer hash wraps alike on both devices; only float32 log/cos may differ by a
    few ulp. Every engine stays exact with it."""
    gpu, cpu = (DirectionScheme(device=d, sampler="counter") for d in ("cuda", "cpu"))
    a = directions(gpu, 3, range(100), 2, (64, 16, 5, 5)).cpu()
    b = directions(cpu, 3, range(100), 2, (64, 16, 5, 5))
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    model, x, y = _model("lenet")
    spec = EstimatorSpec(12, 1e-3)
    ref = float64_diffs(model, x, y, 5, spec, gpu)
    for engine, chunk in [("sequential", 1), ("batched", 5), ("inplace", 1), ("auto", 100)]:
        est = loss_differences(model, F.cross_entropy, x, y, 5, spec, gpu, engine, chunk)
        rel = float((est.diffs.double() - ref).norm() / ref.norm())
        assert rel < 0.03, (engine, chunk, rel)


SMALL = TrainConfig(dataset="digits", clients=5, K=30, lr=0.03, epochs=12, device="cuda")


@pytest.mark.parametrize("extra", [dict(), dict(seed_sharing="client", perturb="layer"),
                                   dict(mode="epoch")])
def test_training_on_the_gpu_learns(extra):
    res = train(SMALL.replace(**extra))
    assert res.summary["rejected_uploads"] == 0
    assert next(res.model.parameters()).device.type == "cuda"
    assert res.summary["test_top1"] > 30.0  # chance is 10%; the CPU's end-to-end test's bar


@pytest.mark.parametrize("extra", [dict(), dict(mode="epoch", local_steps=4)])
def test_gpu_run_resumes_bit_identically(tmp_path, extra):
    cfg = SMALL.replace(rounds=6, epochs=0, **extra)
    ref = train(cfg, run_dir=tmp_path / "ref")
    train(cfg.replace(rounds=3), run_dir=tmp_path / "cut")
    # continue the 3-round run to 6 rounds from its checkpoint
    (tmp_path / "cut" / "config.json").write_text(
        (tmp_path / "ref" / "config.json").read_text())
    res = train(cfg, run_dir=tmp_path / "cut", resume=True)
    for a, b in zip(ref.model.state_dict().values(), res.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["torch", "counter"])
def test_gpu_rebuild_is_the_cpus_to_rounding_and_replays_exactly(sampler):
    """The GPU rebuild sums by a scan (``scan_sum``), not a loop: the CPU's result to
    float32 rounding, and the server's replay of a local epoch is the client's, bit for bit."""
    shapes = [torch.Size((64, 16, 5, 5)), torch.Size((10,))]
    spec = EstimatorSpec(100, 1e-4)
    d = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 1e-4
    dirs = DirectionScheme(sampler=sampler)  # drawn on the CPU: same directions on both
    cpu = rebuild_gradient(shapes, 7, d, spec, dirs)
    gpu = rebuild_gradient(shapes, 7, d, spec, dirs, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(gpu, rebuild_gradient(shapes, 7, d, spec,
                                                                        dirs, "cuda")))
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), rtol=0, atol=1e-5 * float(a.abs().max()))
    make_opt = functools.partial(make_optimizer, "adam", lr=1e-2)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(8, 1, 8, 8, generator=g).cuda(),
                torch.randint(0, 10, (8,), generator=g).cuda()) for _ in range(3)]
    client, server = (build_model("lenet", num_classes=10, in_channels=1,
                                  generator=torch.Generator().manual_seed(0)).cuda()
                      for _ in range(2))
    gdirs = DirectionScheme(device="cuda", sampler=sampler)
    upload = local_epoch_update(0, client, F.cross_entropy, batches, [11, 12, 13], spec, gdirs,
                                local_optimizer(make_opt, client), 0.3)
    replayed = replay_local_epoch(server, upload, spec, gdirs, local_optimizer(make_opt, server),
                                  0.3)
    for r, c in zip(replayed, client.parameters(), strict=True):
        assert torch.equal(r, c.detach())


@pytest.mark.parametrize("sharing", ["client", "round"])
def test_the_gpu_direction_cache_changes_no_bit(monkeypatch, sharing):
    """On a GPU the simulator caches counter directions of client seeds too: the server
    reads each client's K directions back in one copy per tensor."""
    import baffle.simulator as sim

    cfg = SMALL.replace(rounds=3, epochs=0, seed_sharing=sharing, sampler="counter")
    made = []
    real = sim.DirectionCache
    monkeypatch.setattr(sim, "DirectionCache", lambda scheme: made.append(real(scheme))
                        or made[-1])
    cached = train(cfg)
    monkeypatch.setattr(sim, "DirectionCache", lambda scheme: None)  # every draw afresh
    fresh = train(cfg)
    assert len(made) == 3 and all(c.hits >= c.misses > 0 for c in made)
    assert all(torch.equal(a, b) for a, b in
               zip(cached.model.parameters(), fresh.model.parameters(), strict=True))


def test_guided_directions_on_the_gpu_are_u_times_the_gpus_draw():
    u = torch.linalg.qr(torch.randn(40, 3, generator=torch.Generator().manual_seed(0))).Q
    dirs = DirectionScheme(device="cuda", basis=Basis(u, [25, 15]))
    z = directions(GPU, 4, range(8), GUIDE_TENSOR, (3,))
    eps = directions(dirs, 4, range(8), 1, (3, 5))
    assert eps.device.type == "cuda"
    torch.testing.assert_close(eps.reshape(8, -1), z @ u[25:].cuda().T, rtol=0, atol=1e-6)
    alone = torch.stack([directions(dirs, 4, range(k, k + 1), 1, (3, 5))[0] for k in range(8)])
    assert torch.equal(eps, alone)
