"""Count the multiply-adds of one forward pass (Conv and Linear layers; the rest is noise).

    conv:   N * C_out * H_out * W_out * (C_in / groups) * kh * kw   MACs
    linear: rows * out_features * in_features                        MACs
A FLOP is two per MAC (multiply and add), as in the usual GFLOP/s of a matmul. Under
layer directions a direction on block b runs only the layers its perturbation reaches
(``layer_direction_flops``).
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from baffle.engines import plan


@torch.no_grad()
def layer_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of ``model(x)`` per Conv1d/2d/3d and Linear module (by name)."""
    macs: dict[str, int] = {}

    def hook(name: str, m: nn.Module, out: torch.Tensor) -> None:
        if isinstance(m, nn.modules.conv._ConvNd):
            k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
            macs[name] = macs.get(name, 0) + out.numel() * k
        else:
            macs[name] = macs.get(name, 0) + out.numel() * m.in_features

    handles = [m.register_forward_hook(lambda m, _, out, n=n: hook(n, m, out))
               for n, m in model.named_modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return macs


def forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of ``model(x)`` in its Conv1d/2d/3d and Linear layers."""
    return sum(layer_macs(model, x).values())


def layer_direction_flops(model: nn.Module, x: torch.Tensor, blocks: tuple[int, ...],
                          K: int) -> int:
    """FLOPs of K layer directions when each runs only the layers downstream of (and
    including) the one it perturbs: direction k costs the conv/linear layers that its
    block k mod L reaches in the traced graph; the rest keep their unperturbed values."""
    macs = layer_macs(model, x)
    graph = plan(model).graph
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    owner = {n.rpartition(".")[0]: blocks[i] for i, n in enumerate(names)}
    L, total = max(blocks) + 1, 0
    for b in range(L):
        reached: set[fx.Node] = set()
        for node in graph.nodes:
            if (node.op == "call_module" and owner.get(node.target) == b) or any(
                    a in reached for a in node.all_input_nodes):
                reached.add(node)
        cost = sum(macs.get(str(n.target), 0) for n in reached if n.op == "call_module")
        total += len(range(b, K, L)) * cost
    return 2 * total


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """2 x ``forward_macs``."""
    return 2 * forward_macs(model, x)
