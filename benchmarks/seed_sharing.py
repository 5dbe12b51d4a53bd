"""Seed sharing on the same budget: one seed per round (K directions per step, the
paper's protocol) against one seed per client (C*K directions per step, what the
authors' code effectively did). Same forward passes and bytes per client."""

from __future__ import annotations

import time

from baffle import TrainConfig, train
from benchmarks.common import table, write_section

BASE = TrainConfig(dataset="digits", clients=10, K=100, sigma=1e-4, lr=0.03, epochs=30)
SEEDS = (0, 1)


def main() -> None:
    rows = []
    for sharing in ("round", "client"):
        accs, walls = [], []
        for seed in SEEDS:
            t0 = time.perf_counter()
            res = train(BASE.replace(seed_sharing=sharing, seed=seed))
            walls.append(time.perf_counter() - t0)
            accs.append(res.summary["test_top1"])
        last = res.metrics[-1]
        rows.append([sharing, f"{BASE.K}" if sharing == "round" else f"{BASE.clients} x {BASE.K}",
                     " / ".join(f"{a:.2f}" for a in accs), f"{sum(accs) / len(accs):.2f}",
                     f"{last['fwd_per_client']:.0f}", f"{last['bytes_up_per_client']:.0f}",
                     f"{sum(walls) / len(walls):.0f}"])
    body = (
        f"digits, LeNet (no norm, Hardswish), C={BASE.clients} iid, K={BASE.K}, "
        f"sigma={BASE.sigma}, Adam lr {BASE.lr}, EMA, {BASE.epochs} epochs "
        f"({BASE.epochs * 4} FedSGD rounds), seeds {SEEDS}.\n\n"
        + table(["seed sharing", "directions per step", "test top-1 % per seed", "mean",
                 "fwd passes/client/round", "bytes up/client/round", "wall s per run"], rows)
        + "\n\nSame forward passes and upload per client; `client` rebuilds C gradients per "
        "round on the server instead of one."
    )
    write_section("seed_sharing", "Seed sharing: one seed per round vs one per client", body)


if __name__ == "__main__":
    main()
