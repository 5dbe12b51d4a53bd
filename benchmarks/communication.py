"""Exact payload bytes per client per round, using the simulator's own accounting."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from baffle.aggregate import Upload
from baffle.config import TrainConfig
from baffle.directions import Basis, DirectionScheme
from baffle.guide import GuideState
from baffle.simulator import traffic
from benchmarks.common import table, write_section
from benchmarks.engines_common import make

K = 100
STEPS_PER_EPOCH = 171  # an MNIST client's local epoch: 5,496 images // batch 32 (the paper's split)


GUIDE_DIMS, GUIDE_REFRESH = 50, 10  # the guided recipe of the accuracy section


def bytes_of(method: str, mode: str, n_params: int,
             new_basis: bool = False) -> tuple[int, int]:
    """(down, up) for one client and one round, from ``baffle.simulator.traffic``;
    ``new_basis``: a --guide-dims round in which the client lacks the latest basis."""
    cfg = TrainConfig(method=method, mode=mode, K=K)
    basis = Basis(torch.zeros(n_params, GUIDE_DIMS), [n_params]) if new_basis else None
    fed = SimpleNamespace(config=cfg, n_params=n_params, dirs=DirectionScheme(basis=basis),
                          server=SimpleNamespace(guide=GuideState() if new_basis else None))
    steps = STEPS_PER_EPOCH if (method == "baffle" and mode == "epoch") else 1
    diffs = torch.zeros(steps, K) if steps > 1 else torch.zeros(K)
    u = Upload(0, 32 * steps, tuple(range(steps)), diffs if method == "baffle" else None)
    return traffic(fed, u)  # type: ignore[arg-type]


def main() -> None:
    rows = []
    for name in ("lenet", "wrn-10-2"):
        model, _, _ = make(name)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for label, method, mode, rounds_per_epoch in [
            ("BAFFLE FedSGD", "baffle", "fedsgd", STEPS_PER_EPOCH),
            ("BAFFLE epoch-level", "baffle", "epoch", 1),
            ("backprop FedSGD", "bp-fedsgd", "fedsgd", STEPS_PER_EPOCH),
            ("backprop FedAvg", "bp-fedavg", "epoch", 1),
        ]:
            down, up = bytes_of(method, mode, n)
            rows.append([name, f"{n:,}", label, f"{down:,}", f"{up:,}",
                         f"{rounds_per_epoch * up:,}", f"{rounds_per_epoch * down:,}"])
        # server-guided directions: U down on one round in GUIDE_REFRESH
        down, up = bytes_of("baffle", "fedsgd", n)
        with_basis, _ = bytes_of("baffle", "fedsgd", n, new_basis=True)
        epoch = STEPS_PER_EPOCH * down + STEPS_PER_EPOCH / GUIDE_REFRESH * (with_basis - down)
        rows.append([name, f"{n:,}", f"BAFFLE FedSGD, --guide-dims {GUIDE_DIMS}",
                     f"{down:,} ({with_basis:,} with a new basis)", f"{up:,}",
                     f"{STEPS_PER_EPOCH * up:,}", f"{epoch:,.0f}"])
    body = (f"K={K}, float32 values, exact payload counts from `baffle.simulator.traffic` "
            "(down: 4 bytes per parameter, + 8 for the seed with BAFFLE; up: 4 K + 8 per "
            "local step + 8 for the example count with BAFFLE, 4 bytes per parameter + 8 with "
            f"backprop). An epoch is {STEPS_PER_EPOCH} local steps of batch 32 (an MNIST client "
            "of the paper's 10-client split): FedSGD needs that many rounds per epoch, "
            "epoch-level modes one. Transport framing (Flower, TLS) is not counted.\n\n"
            + table(["model", "parameters", "protocol", "down B/round", "up B/round",
                     "up B/epoch", "down B/epoch"], rows)
            + "\n\nEpoch-level BAFFLE uploads K scalars and a seed per local step, not a "
            "model: the server replays the client's steps from them. With server-guided "
            f"directions (`--guide-dims {GUIDE_DIMS} --guide-refresh {GUIDE_REFRESH}`) each "
            f"client also downloads the basis, 4 d r bytes, every {GUIDE_REFRESH} rounds "
            "when it takes part in every round; its epoch column counts that share.")
    write_section("communication", "Communication: bytes per client per round", body)


if __name__ == "__main__":
    main()
