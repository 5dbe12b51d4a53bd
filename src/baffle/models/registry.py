"""Models by name: "lenet", "wrn-D-W" (e.g. "wrn-10-2"; "wrn" alone is WRN-10-2).

A new model family is one entry in ``MODELS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from baffle.errors import ConfigError
from baffle.models.layers import init_parameters
from baffle.models.lenet import LeNet
from baffle.models.wrn import WideResNet


@dataclass(frozen=True)
class ModelEntry:
    """A model family: ``factory(*sizes, num_classes=, in_channels=, norm=, activation=)``.

    ``usage`` is how the name is written (sizes as letters), ``defaults`` the sizes used
    when the family name is given alone; its length is the number of sizes in the name.
    """

    usage: str
    factory: Callable[..., nn.Module]
    defaults: tuple[int, ...] = ()


MODELS: dict[str, ModelEntry] = {
    "lenet": ModelEntry("lenet", LeNet),
    "wrn": ModelEntry("wrn-D-W", WideResNet, defaults=(10, 2)),
}


def available_models() -> list[str]:
    """Model names as written on the command line: ``["lenet", "wrn-D-W"]``."""
    return [entry.usage for entry in MODELS.values()]


def _unknown(name: str) -> ConfigError:
    return ConfigError(
        f"unknown model {name!r}; choose one of: {', '.join(available_models())} "
        "(e.g. wrn-10-2; 'wrn' alone is wrn-10-2)"
    )


def parse_model_name(name: str) -> tuple[ModelEntry, tuple[int, ...]]:
    """Split ``"wrn-16-4"`` into its registry entry and sizes ``(16, 4)``."""
    family, *rest = name.strip().lower().split("-")
    entry = MODELS.get(family)
    if entry is None:
        raise _unknown(name)
    if not rest:
        return entry, entry.defaults
    if len(rest) != len(entry.defaults) or not all(part.isdigit() for part in rest):
        raise _unknown(name)
    return entry, tuple(int(part) for part in rest)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    norm: str = "none",
    activation: str = "hardswish",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build model ``name`` on the CPU.

    With ``generator`` (a CPU ``torch.Generator``) every parameter is drawn from it alone,
    so the same generator seed gives bit-identical weights and the global RNG is left
    untouched; without it, torch's default initialisation uses the global RNG.
    """
    entry, sizes = parse_model_name(name)
    kwargs = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "norm": norm,
        "activation": activation,
    }
    if generator is None:
        return entry.factory(*sizes, **kwargs)
    if generator.device.type != "cpu":
        raise ConfigError(f"build_model needs a CPU generator, got one on {generator.device}")
    # built on the CPU (the meta device would import sympy, half a second in every Flower
    # ClientApp process), its default draws thrown away with the global RNG state
    with torch.random.fork_rng(devices=[]):
        model = entry.factory(*sizes, **kwargs)
    return init_parameters(model, generator)


def uses_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a BatchNorm layer (whose buffers BAFFLE cannot perturb soundly)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())
