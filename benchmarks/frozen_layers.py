"""How far LeNet gets on MNIST when conv2 never learns: the ceiling of any method that
trains conv1 and the classifier well but leaves conv2 near its initialisation.

    python -m benchmarks.run frozen_layers     # about 11 minutes on one CPU core

Backprop in the authors' FedSGD setting (10 clients x batch 32 = one batch of 320 a step,
Adam lr 1e-2, betas (0.9, 0.99), weight decay 5e-4, 20 epochs over all 60,000 training
images, the same initial weights as the accuracy runs' seed 0), once with every layer
trained and once with conv2 (``features.4``) frozen at its initial weights. BAFFLE's
estimate is worst on conv2 (96% of the weights, a few % of the squared gradient norm; see
the layer_shares section), so this bounds what better estimates of the other layers alone
could give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baffle.data.dataset import DataBundle
from baffle.data.mnist import load_mnist
from baffle.models import build_model
from baffle.simulator import evaluate
from benchmarks.accuracy import MNIST
from benchmarks.common import table, write_section

EPOCHS, BATCH = 20, 320
FROZEN = {"every layer trained": (), "conv2 frozen at its initial weights": ("features.4",)}


def train_curve(data: DataBundle, frozen: tuple[str, ...], epochs: int,
                limit: int | None = None) -> tuple[torch.nn.Module, list[float]]:
    """Backprop with the layers in ``frozen`` (module names) left at their initial weights;
    test top-1 after each epoch. ``limit`` caps the training images (for tests)."""
    model = build_model("lenet", num_classes=10, in_channels=1, norm="none",
                        activation="hardswish", generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[0] not in frozen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                           betas=(0.9, 0.99), weight_decay=5e-4)
    x, y = data.train.x[:limit], data.train.y[:limit]
    order = torch.Generator().manual_seed(1)
    curve = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y) - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        curve.append(evaluate(model, data.test, "cpu")["top1"])
    return model, curve


def main() -> None:
    torch.set_num_threads(1)
    data = load_mnist(MNIST)
    rows = []
    for label, frozen in FROZEN.items():
        _, curve = train_curve(data, frozen, EPOCHS)
        rows.append([label, f"{curve[9]:.2f}", f"{curve[-1]:.2f}", f"{max(curve):.2f}",
                     " ".join(f"{a:.1f}" for a in curve)])
    body = (
        f"LeNet on MNIST by backprop, one batch of {BATCH} a step (the FedSGD setting's 10 "
        f"clients x 32), Adam lr 1e-2, {EPOCHS} epochs, raw weights (no EMA). The target "
        "of the accuracy section is 95.2%.\n\n"
        + table(["trained", "test top-1 % after 10 epochs", f"after {EPOCHS}", "best",
                 "after each epoch"], rows)
        + "\n\nWith conv2 left at its initialisation the other two layers fall well short of "
        "the target, so a run that reaches it has to train conv2, the layer BAFFLE "
        "estimates worst."
    )
    write_section("frozen_layers", "What conv2 is worth: backprop with conv2 frozen", body)
