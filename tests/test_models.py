"""One battery over every model x norm x activation in the registry, plus exact
parameter counts worked out by hand from the authors' architectures."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from baffle.errors import ConfigError
from baffle.models import (
    ACTIVATIONS,
    NORMS,
    available_models,
    build_model,
    make_activation,
    make_norm,
    uses_batchnorm,
)

MODEL_NAMES = ("lenet", "wrn-10-2")
ALL_NORMS = ("group", "batch", "none")
ALL_ACTIVATIONS = ("hardswish", "relu", "selu", "gelu")

# (in_channels, height/width, num_classes): 8x8 digits, MNIST at 32x32, CIFAR-10/100.
INPUTS = {
    "lenet": [(1, 8, 10), (1, 32, 10), (3, 32, 100)],
    "wrn-10-2": [(1, 8, 10), (1, 32, 10), (3, 32, 10)],
}

battery = pytest.mark.parametrize(
    ("name", "norm", "activation"),
    [(m, n, a) for m in MODEL_NAMES for n in ALL_NORMS for a in ALL_ACTIVATIONS],
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def expected_lenet(in_ch: int, classes: int, norm: str) -> int:
    c1, c2 = (32, 128) if classes == 100 else (16, 64)
    count = conv(in_ch, c1, 5, True) + conv(c1, c2, 5, True) + c2 * classes + classes
    return count + (2 * (c1 + c2) if norm == "batch" else 0)  # GroupNorm is affine-free


def expected_wrn_10_2(in_ch: int, classes: int, norm: str) -> int:
    count = conv(in_ch, 16, 3, True)  # stem: the only conv with a bias
    for c_in, c_out in ((16, 32), (32, 64), (64, 128)):  # one block per stage
        count += conv(c_in, c_out, 3, False) + conv(c_out, c_out, 3, False)
        count += conv(c_in, c_out, 1, False)  # 1x1 shortcut: every stage changes shape
    count += 128 * classes + classes
    norm_channels = 16 + 32 + 32 + 64 + 64 + 128 + 128  # two per block, one in the head
    return count + (2 * norm_channels if norm == "batch" else 0)


EXPECTED = {"lenet": expected_lenet, "wrn-10-2": expected_wrn_10_2}


def test_choices_are_the_documented_ones() -> None:
    assert NORMS == ALL_NORMS
    assert ACTIVATIONS == ALL_ACTIVATIONS
    assert available_models() == ["lenet", "wrn-D-W"]


def test_paper_parameter_counts() -> None:
    assert expected_lenet(1, 10, "none") == 26_730
    assert n_params(build_model("lenet", num_classes=10, in_channels=1)) == 26_730
    assert expected_lenet(3, 100, "none") == 117_860
    cifar100 = build_model("lenet", num_classes=100, in_channels=3)
    assert n_params(cifar100) == 117_860
    assert expected_wrn_10_2(3, 10, "group") == 302_794
    wrn = build_model("wrn-10-2", num_classes=10, in_channels=3, norm="group")
    assert n_params(wrn) == 302_794


@battery
def test_forward_backward_and_count(name: str, norm: str, activation: str) -> None:
    torch.manual_seed(0)
    for in_ch, size, classes in INPUTS[name]:
        model = build_model(
            name, num_classes=classes, in_channels=in_ch, norm=norm, activation=activation
        )
        assert n_params(model) == EXPECTED[name](in_ch, classes, norm)
        x = torch.randn(3, in_ch, size, size)
        out = model(x)
        assert out.shape == (3, classes)
        assert torch.isfinite(out).all()
        nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()


@battery
def test_norm_layers(name: str, norm: str, activation: str) -> None:
    model = build_model(name, num_classes=10, in_channels=3, norm=norm, activation=activation)
    assert uses_batchnorm(model) == (norm == "batch")
    groupnorms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert bool(groupnorms) == (norm == "group")
    for gn in groupnorms:
        assert not gn.affine and not list(gn.parameters())
        assert gn.num_groups == max(2, gn.num_channels // 16)
    wanted = {"hardswish": nn.Hardswish, "relu": nn.ReLU, "selu": nn.SELU, "gelu": nn.GELU}
    acts = [m for m in model.modules() if isinstance(m, tuple(wanted.values()))]
    assert acts and all(type(m) is wanted[activation] for m in acts)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("norm", ALL_NORMS)
def test_seeded_build_is_bit_identical(name: str, norm: str) -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        model = build_model(name, num_classes=10, in_channels=3, norm=norm, generator=g)
        return model.state_dict()

    torch.manual_seed(1)
    rng_before = torch.random.get_rng_state()
    a = build(123)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    torch.manual_seed(2)  # a different global state must not matter
    b = build(123)
    c = build(124)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)
    for k, v in a.items():  # torch's default scheme and sane norm buffers
        assert torch.isfinite(v.float()).all()
        if k.endswith("running_var"):
            assert torch.equal(v, torch.ones_like(v))
        elif k.endswith(("running_mean", "num_batches_tracked")):
            assert not v.any()
        elif k in weights:
            assert v.abs().max() <= 1 / math.sqrt(v[0].numel())


def test_wrn_names() -> None:
    g = torch.Generator
    plain = build_model("wrn", num_classes=10, in_channels=3, generator=g().manual_seed(0))
    explicit = build_model("WRN-10-2", num_classes=10, in_channels=3, generator=g().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), explicit.parameters()))
    wide = build_model("wrn-16-4", num_classes=10, in_channels=3)
    assert len(wide.blocks) == 6 and wide.classifier.in_features == 256
    assert wide(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_lenet_smallest_input() -> None:
    model = build_model("lenet", num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 2, 2)).shape == (2, 10)


def one_line_error(fn: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("name", ["resnet18", "", "wrn-10", "wrn-a-2", "wrn-10-2-1", "lenet-5"])
def test_unknown_model(name: str) -> None:
    message = one_line_error(build_model, name, num_classes=10, in_channels=1)
    assert "lenet" in message and "wrn-D-W" in message


@pytest.mark.parametrize("name", ["wrn-12-2", "wrn-4-2", "wrn-0-2", "wrn-10-0"])
def test_bad_wrn_size(name: str) -> None:
    message = one_line_error(build_model, name, num_classes=10, in_channels=3)
    assert "WRN" in message


def test_unknown_norm_and_activation() -> None:
    for name in MODEL_NAMES:
        message = one_line_error(build_model, name, num_classes=10, in_channels=1, norm="layer")
        assert all(n in message for n in ALL_NORMS)
        message = one_line_error(
            build_model, name, num_classes=10, in_channels=1, activation="tanh"
        )
        assert all(a in message for a in ALL_ACTIVATIONS)
    one_line_error(make_norm, "Group", 16)
    one_line_error(make_activation, "ReLU")


def test_bad_sizes() -> None:
    one_line_error(build_model, "lenet", num_classes=0, in_channels=1)
    one_line_error(build_model, "wrn-10-2", num_classes=10, in_channels=0)
