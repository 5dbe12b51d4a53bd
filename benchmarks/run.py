"""Run benchmarks and write their sections of BENCHMARKS.md.

    python -m benchmarks.run            # all of them
    python -m benchmarks.run NAME ...   # some of them
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("seed_sharing", "passes", "layer_shares", "frozen_layers", "ema_horizon",
              "subspace", "span_solve", "throughput", "samplers", "memory", "compute_vs_bp", "communication",
              "scaling", "flower", "gpu",
              "accuracy")  # accuracy trains for hours on a CPU: run it last


def main(argv: list[str]) -> None:
    names = argv or list(BENCHMARKS)
    for name in names:
        if name not in BENCHMARKS:
            sys.exit(f"error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
