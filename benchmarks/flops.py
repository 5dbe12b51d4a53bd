"""Count the multiply-adds of one forward pass (Conv and Linear layers; the rest is noise).

    conv:   N * C_out * H_out * W_out * (C_in / groups) * kh * kw   MACs
    linear: rows * out_features * in_features                        MACs
A FLOP is two per MAC (multiply and add), as in the usual GFLOP/s of a matmul.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of ``model(x)`` in its Conv1d/2d/3d and Linear layers."""
    total = 0

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.modules.conv._ConvNd):
            k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
            total += out.numel() * k
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """2 x ``forward_macs``."""
    return 2 * forward_macs(model, x)
