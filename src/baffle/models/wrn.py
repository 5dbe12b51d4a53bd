"""Pre-activation wide ResNet WRN-depth-width (Zagoruyko & Komodakis, BMVC 2016)."""

from __future__ import annotations

import torch
from torch import nn

from baffle.errors import ConfigError
from baffle.models.layers import make_activation, make_norm


class PreActBlock(nn.Module):
    """norm, act, conv3x3(stride), norm, act, conv3x3, plus the shortcut.

    When the shape changes, the shortcut is a bias-free 1x1 conv applied to the
    pre-activated input (as in the WRN reference code); otherwise it is the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, activation: str) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_ch)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One residual step."""
        h = self.act1(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        h = self.conv2(self.act2(self.norm2(h)))
        return h + skip


class WideResNet(nn.Module):
    """WRN-depth-width: stem conv3x3 (16, with bias), three stages of n = (depth - 4) / 6
    pre-activation blocks of widths 16w, 32w, 64w (strides 1, 2, 2), final norm, act,
    global average pool, linear.

    WRN-10-2 with GroupNorm on CIFAR-10 has 302,794 parameters, the count in the paper;
    the stem conv's bias (16 parameters) is what brings the bias-free 302,778 up to it.
    """

    def __init__(
        self,
        depth: int = 10,
        width: int = 2,
        *,
        num_classes: int,
        in_channels: int,
        norm: str = "group",
        activation: str = "hardswish",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(
                f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}"
            )
        if width < 1:
            raise ConfigError(f"WRN width must be >= 1, got {width}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
            )
        self.depth, self.width = depth, width
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        blocks: list[nn.Module] = []
        in_ch = widths[0]
        for stage, out_ch in enumerate(widths[1:]):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(in_ch, out_ch, stride, norm, activation))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            make_norm(norm, in_ch),
            make_activation(activation),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes) for images of shape (batch, C, H, W)."""
        return self.classifier(self.head(self.blocks(self.stem(x))))
