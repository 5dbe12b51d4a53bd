"""Models by name (the authors' LeNet and WRN-D-W) and their building blocks."""

from baffle.models.layers import (
    ACTIVATIONS,
    NORMS,
    init_parameters,
    make_activation,
    make_norm,
)
from baffle.models.lenet import LeNet, lenet_channels
from baffle.models.registry import (
    MODELS,
    ModelEntry,
    available_models,
    build_model,
    parse_model_name,
    uses_batchnorm,
)
from baffle.models.wrn import PreActBlock, WideResNet

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "NORMS",
    "LeNet",
    "ModelEntry",
    "PreActBlock",
    "WideResNet",
    "available_models",
    "build_model",
    "init_parameters",
    "lenet_channels",
    "make_activation",
    "make_norm",
    "parse_model_name",
    "uses_batchnorm",
]
