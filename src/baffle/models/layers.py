"""Building blocks shared by the models: normalisation, activation, seeded initialisation."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from baffle.errors import ConfigError

NORMS = ("group", "batch", "none")
ACTIVATIONS = ("hardswish", "relu", "selu", "gelu")

_ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {
    "hardswish": nn.Hardswish,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
}


def make_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation over ``channels`` feature maps.

    "group" is the authors' affine-free GroupNorm with ``max(2, channels // 16)`` groups;
    "batch" is ``BatchNorm2d`` (its running buffers make BAFFLE's perturbed forward passes
    disagree with each other, so it is only for backprop baselines); "none" is identity.
    """
    if kind == "group":
        return nn.GroupNorm(max(2, channels // 16), channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module; Hardswish is the paper's default, the rest are ablations."""
    try:
        return _ACTIVATION_CLASSES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}"
        ) from None


def init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every parameter and buffer of ``model`` in place, drawing only from
    ``generator`` (never the global RNG), with torch's default scheme: conv/linear weights
    ``kaiming_uniform_(a=sqrt(5))``, biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, norm
    scales 1, shifts and running means 0, running variances 1. Modules are visited in
    ``model.modules()`` order, so the same generator state gives bit-identical weights.
    """
    for module in model.modules():
        if isinstance(module, (_ConvNd, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, (_BatchNorm, nn.GroupNorm)):
            module.reset_parameters()  # deterministic: ones, zeros, running stats
        elif any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            name = type(module).__name__
            raise TypeError(f"init_parameters does not know how to initialise {name}")
    return model
