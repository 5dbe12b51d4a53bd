"""The authors' small "LeNet": two 5x5 convolutions, global average pooling, one linear."""

from __future__ import annotations

import torch
from torch import nn

from baffle.errors import ConfigError
from baffle.models.layers import make_activation, make_norm


def lenet_channels(num_classes: int) -> tuple[int, int]:
    """The authors' widths: (16, 64), or (32, 128) for 100 classes (CIFAR-100)."""
    return (32, 128) if num_classes == 100 else (16, 64)


class LeNet(nn.Module):
    """conv5x5(c1, pad 2), norm, act, maxpool 2, conv5x5(c2, pad 2), norm, act, GAP, linear.

    26,730 parameters for 1 input channel, 10 classes and no norm. Global average pooling
    makes it work on any input of at least 2x2 (8x8 digits, 32x32 MNIST/CIFAR).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        norm: str = "none",
        activation: str = "hardswish",
        channels: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
            )
        c1, c2 = channels if channels is not None else lenet_channels(num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            make_norm(norm, c1),
            make_activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            make_norm(norm, c2),
            make_activation(activation),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes) for images of shape (batch, C, H, W)."""
        return self.classifier(self.features(x))
