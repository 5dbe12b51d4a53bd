"""Round time of the in-process simulator against the number of clients and against K."""

from __future__ import annotations

import statistics
from pathlib import Path

from baffle import TrainConfig, train
from baffle.data import load_dataset
from benchmarks.common import ROOT, table, write_section
from benchmarks.engines_common import QUICK, THREADS, setup_threads

MNIST = ROOT.parent / "shared" / "data" / "mnist"
FIGURES = ROOT / "benchmarks" / "figures"
CLIENTS = (10, 100) if QUICK else (10, 100, 1000)
KS = (20, 50) if QUICK else (20, 50, 100, 200, 500)
ROUNDS = 2 if QUICK else 4


def round_time(base: TrainConfig, data: object, **changes: object) -> float:
    """Median wall seconds of a round (the first, warm-up round excluded)."""
    res = train(base.replace(**changes), data=data)  # type: ignore[arg-type]
    return statistics.median(m["wall_s"] for m in res.metrics[1:])


def plot(xs: list[int], ys: list[float], xlabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.plot(xs, ys, "o-")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds per round")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    setup_threads()
    FIGURES.mkdir(parents=True, exist_ok=True)
    name = "mnist" if (MNIST / "train-images-idx3-ubyte.gz").exists() and not QUICK else "digits"
    data = load_dataset(name, str(MNIST) if name == "mnist" else None)
    base = TrainConfig(dataset=name, model="lenet", K=100, rounds=ROUNDS, engine="auto",
                       eval_every=10**6, checkpoint_every=10**6, clients_per_round=10, ema=False)
    by_clients = [round_time(base, data, clients=c) for c in CLIENTS]
    by_k = [round_time(base.replace(clients=10), data, K=k) for k in KS]
    plot(list(CLIENTS), by_clients, "clients (10 sampled per round)",
         f"LeNet/{name}, K=100", FIGURES / "scaling_clients.png")
    plot(list(KS), by_k, "K", f"LeNet/{name}, 10 clients", FIGURES / "scaling_k.png")
    body = (f"`baffle.train` on {name}, LeNet, FedSGD, batch 32, forward scheme, `auto` engine, "
            f"{THREADS} thread(s); median wall time of rounds 2..{ROUNDS} (round 1 warms up; "
            "evaluation excluded). One process runs every client in turn, so a round costs "
            "about (sampled clients) x (one BAFFLE step) + one rebuild.\n\n"
            + table(["clients", "sampled per round", "s per round"],
                    [[c, 10, f"{t:.2f}"] for c, t in zip(CLIENTS, by_clients)])
            + "\n\n![round time vs clients](benchmarks/figures/scaling_clients.png)\n\n"
            + table(["K", "clients (all sampled)", "s per round", "s per round / K"],
                    [[k, 10, f"{t:.2f}", f"{t / k * 1e3:.1f} ms"] for k, t in zip(KS, by_k)])
            + "\n\n![round time vs K](benchmarks/figures/scaling_k.png)\n\n"
            "Only the sampled clients work, so the number of registered clients should not "
            "matter; round time should grow with K. The machine is shared with other jobs and "
            "each row is a separate run minutes apart, so single rows carry load noise.")
    write_section("scaling", "Scaling: round time vs clients and vs K", body)


if __name__ == "__main__":
    main()
