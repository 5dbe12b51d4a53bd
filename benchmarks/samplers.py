"""Direction samplers side by side: torch's generators against the counter sampler.

    python -m benchmarks.run samplers

For LeNet and WRN-10-2 (batch 32, K=100), on the CPU and, when one is visible, on a
CUDA device: the time to draw the K directions of every tensor, and the time of the auto
engine's step, with ``--sampler torch`` and with ``--sampler counter``, best of REPS
interleaved repetitions (each synchronised on a GPU). The draw's share of the step is
what the issue asks to keep small; the ratios are measured side by side, so they hold on
a loaded machine even where the absolute times do not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from baffle.directions import SAMPLERS, DirectionScheme, directions
from baffle.estimator import EstimatorSpec, loss_differences, trainable_params
from benchmarks.common import table, write_section
from benchmarks.engines_common import QUICK, THREADS, interleaved, make, setup_threads

K = 10 if QUICK else 100
SIGMA = 1e-4
REPS = 2 if QUICK else 5


def _synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    if device == "cpu":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def measure(name: str, device: str, chunk: int) -> dict[str, dict[str, float]]:
    """sampler -> {"draw": s, "step": s} for one model on one device."""
    model, x, y = make(name)
    model, x, y = model.to(device), x.to(device), y.to(device)
    params = list(trainable_params(model).values())
    spec = EstimatorSpec(K, SIGMA)
    fns = {}
    for sampler in SAMPLERS:
        dirs = DirectionScheme(device=device, sampler=sampler)
        fns[(sampler, "draw")] = _synced(
            lambda d=dirs: [directions(d, 7, range(K), i, p.shape) for i, p in enumerate(params)],
            device)
        fns[(sampler, "step")] = _synced(
            lambda d=dirs: loss_differences(model, F.cross_entropy, x, y, 7, spec, d, "auto",
                                            chunk), device)
    times = interleaved(fns, REPS)
    return {s: {part: times[(s, part)] for part in ("draw", "step")} for s in SAMPLERS}


def rows_for(device: str, chunk: int) -> list[list[str]]:
    rows = []
    for name in ("lenet", "wrn-10-2"):
        t = measure(name, device, chunk)
        for sampler in SAMPLERS:
            draw, step = t[sampler]["draw"], t[sampler]["step"]
            rows.append([name, device, sampler, f"{draw * 1e3:.2f}", f"{step * 1e3:.1f}",
                         f"{draw / step:.1%}",
                         f"{t['torch']['draw'] / draw:.2f}x", f"{t['torch']['step'] / step:.2f}x"])
    return rows


def main() -> None:
    setup_threads()
    rows = rows_for("cpu", 32)
    gpu = ""
    if torch.cuda.is_available():
        rows += rows_for("cuda", 100)
        gpu = f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}. "
    body = (f"{gpu}{THREADS} CPU thread(s); batch 32, K={K}, the auto engine (`--chunk` 32 "
            f"on the CPU, where auto takes 2, and 100 on a GPU); best of {REPS} interleaved "
            "repetitions. `draw` draws all K "
            "directions of every tensor once; the last two columns are the torch sampler's "
            "time over this row's (above 1: this sampler is faster).\n\n"
            + table(["model", "device", "sampler", "draw ms", "step ms", "draw / step",
                     "draw vs torch", "step vs torch"], rows)
            + "\n\n`torch` seeds one generator per (direction, tensor); `counter` hashes each "
            "entry's index (splitmix64, then Box-Muller) in one batch of elementwise ops per "
            "tensor (`--sampler`, `src/baffle/directions.py`).")
    write_section("samplers", "Direction samplers: drawing the K directions", body)


if __name__ == "__main__":
    main()
