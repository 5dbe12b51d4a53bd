"""Where LeNet's gradient lives, and what layer directions (``--perturb layer``) do to
each layer's estimation error.

    python -m benchmarks.run layer_shares      # about a minute on one CPU core

LeNet on MNIST (the authors' model) is trained with backprop (Adam, lr 1e-3, batch 32);
at a few points its exact gradient g on a batch of 320 (10 clients x 32) is split by
layer. For K Gaussian directions that move every weight, the error of the estimate on
layer b has E|g_b_hat - g_b|^2 = (n_b |g|^2 + |g_b|^2) / K; with layer directions (layer
b gets K_b = K/L directions of its own) it is (n_b + 1) |g_b|^2 / K_b. The table gives
their ratio per layer: above 1, layer directions estimate that layer better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baffle.data.mnist import load_mnist
from baffle.directions import layer_blocks
from baffle.models import build_model
from benchmarks.accuracy import MNIST
from benchmarks.common import table, write_section

STEPS = (0, 50, 200, 600, 1200)


def layer_sums(blocks: tuple[int, ...], values: list[float]) -> list[float]:
    """Per-tensor values summed per layer (weights and bias together)."""
    sums = [0.0] * (max(blocks) + 1)
    for b, v in zip(blocks, values):
        sums[b] += v
    return sums


def main() -> None:
    torch.manual_seed(0)
    data = load_mnist(MNIST)
    x, y = data.train.x, data.train.y
    model = build_model("lenet", num_classes=10, in_channels=1, norm="none",
                        activation="hardswish", generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_parameters()]
    blocks = layer_blocks(names)
    layers = [names[blocks.index(b)].rpartition(".")[0] for b in range(max(blocks) + 1)]
    sizes = layer_sums(blocks, [p.numel() for p in model.parameters()])
    n, L = int(sum(sizes)), len(layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    rows = []
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            idx = torch.randint(0, len(x), (320,), generator=g)
            model.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            sq = layer_sums(blocks, [float(p.grad.pow(2).sum()) for p in model.parameters()])
            total = sum(sq)
            with torch.no_grad():
                top1 = float((model(data.test.x).argmax(1) == data.test.y).float().mean()) * 100
            # error-variance ratio (all / layer) at a fixed K, with K_b = K / L
            ratio = [(sizes[b] * total + sq[b]) / (L * (sizes[b] + 1) * sq[b]) for b in range(L)]
            rows.append([step, f"{top1:.1f}"]
                        + [f"{100 * sq[b] / total:.1f}% / {ratio[b]:.2g}x" for b in range(L)])
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    shares = ", ".join(f"{name} {100 * k / n:.1f}%" for name, k in zip(layers, sizes))
    body = (
        f"LeNet on MNIST, {n:,} weights in {L} layers ({shares} of them; features.0 is "
        "conv1, features.4 conv2). Each cell: the "
        "layer's share of the squared gradient norm / how many times smaller its "
        "estimation error variance is with layer directions than with directions that move "
        "every weight, at the same K (theory for Gaussian directions, from the exact "
        "gradient on 320 training images). Backprop training (Adam, lr 1e-3, batch 32) "
        "supplies the points along the way.\n\n"
        + table(["backprop step", "test top-1 %"] + layers, rows)
        + "\n\nThe large middle layer holds almost all the weights but little of the "
        "gradient, so directions that move every weight fill its estimate with the other "
        "layers' gradient; moving one layer at a time trades a somewhat noisier estimate of "
        "the small layers for a much cleaner one of the large layer."
    )
    write_section("layer_shares", "Where LeNet's gradient lives: layer directions' error "
                  "per layer", body)


if __name__ == "__main__":
    main()
