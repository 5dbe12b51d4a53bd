"""Shared helpers of the engine benchmarks: the paper's models, timing, quick mode."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from torch import nn

from baffle.models import build_model

QUICK = os.environ.get("BAFFLE_BENCH_QUICK", "") not in ("", "0")
THREADS = int(os.environ.get("BAFFLE_BENCH_THREADS", "1"))

# name -> (registry name, input channels, norm): LeNet/MNIST and WRN-10-2/CIFAR as in the paper
MODELS = {"lenet": ("lenet", 1, "none"), "wrn-10-2": ("wrn-10-2", 3, "group")}


def make(name: str, batch: int = 32, size: int = 32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model (seeded init), a random batch of images and labels."""
    reg, cin, norm = MODELS[name]
    model = build_model(reg, num_classes=10, in_channels=cin, norm=norm,
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    return (model, torch.rand(batch, cin, size, size, generator=g),
            torch.randint(0, 10, (batch,), generator=g))


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Minimum wall time over ``reps`` calls after one warm-up call (noise only adds time)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best time of each function, measured round-robin so load spikes hit all alike."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def setup_threads() -> None:
    torch.set_num_threads(THREADS)
