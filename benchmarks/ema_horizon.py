"""Does averaging the weights over rounds, not over epochs, lift the best BAFFLE recipe?

    python -m benchmarks.run ema_horizon     # 1.5-2.5 hours on one CPU core

(``BAFFLE_EMA_REPORT_ONLY=1`` tabulates the curves saved in ``benchmarks/results/`` without
training.)

One training run of the accuracy section's best recipe (``baffle-fedsgd-client-layer-decay``:
the authors' MNIST setting with client seeds, layer directions and lr x0.2 at epochs 10 and
15), evaluated after every epoch under several averages of the same trajectory W_0, W_1, ...:

- the raw weights W_t;
- the authors' EMA, the run's own evaluation weights: decay 0.995, updated once per epoch,
  with warm-up d_t = min(decay, (1 + t) / (10 + t)), so after 20 epochs it weighs the last
  epoch ends by about 0.31, 0.22, 0.16, ...;
- EMAs updated after every round, same warm-up, for several decays d (horizon about
  1 / (1 - d) rounds);
- the plain mean of every round's weights since the last lr change (Polyak-Ruppert tail
  averaging, restarted at each milestone).

An average never feeds back into training, so every column sees the same W_t: the columns
differ by the averaging alone. The estimate's noise makes W_t wander around where the
gradient would take it; averaging many rounds cancels much of that wander.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from baffle import TrainConfig, train
from baffle.data.dataset import ArrayDataset, DataBundle
from baffle.data.registry import load_dataset
from baffle.ema import EMA
from baffle.simulator import evaluate, initial_model, setup
from benchmarks import accuracy
from benchmarks.common import ROOT, machine, table, write_section

RUN = "baffle-fedsgd-client-layer-decay"
DECAYS = (0.99, 0.995, 0.998, 0.999)
RESULTS = ROOT / "benchmarks" / "results" / "ema_horizon.json"
TARGET = 95.2


@dataclass
class Averages:
    """A training callback that keeps per-round averages of ``model``'s weights and
    evaluates them, the raw weights and the run's own (per-epoch EMA) weights after each
    epoch. Curves are test top-1 % per evaluation."""

    model: nn.Module
    test: ArrayDataset
    decays: tuple[float, ...]
    curves: dict[str, list[float]] = field(default_factory=dict)
    emas: dict[float, EMA] = field(init=False)
    tail: dict[str, torch.Tensor] = field(init=False)
    tail_n: int = 0
    lr: float | None = None

    def __post_init__(self) -> None:
        self.emas = {d: EMA.of(self.model, d) for d in self.decays}
        self.tail = {n: torch.zeros_like(p) for n, p in self.model.state_dict().items()}

    @torch.no_grad()
    def on_round(self, record: dict[str, Any], total_rounds: int) -> None:
        if record["lr"] != self.lr:  # the tail mean restarts where the lr changes
            self.lr, self.tail_n = record["lr"], 0
        for ema in self.emas.values():
            ema.update(self.model)
        self.tail_n += 1
        for n, p in self.model.state_dict().items():  # running mean of W since the change
            self.tail[n] += (p - self.tail[n]) / self.tail_n
        if "test_top1" not in record:
            return
        self._add("raw weights", self.model.state_dict())
        self.curves.setdefault("authors' EMA (per epoch)", []).append(record["test_top1"])
        for d, ema in self.emas.items():
            self._add(f"EMA {d} per round", ema.shadow)
        self._add("mean since the last lr change", self.tail)
        print(f"epoch {record['epoch']:.2f}:", {k: round(c[-1], 2) for k, c in
                                                self.curves.items()}, flush=True)

    def _add(self, label: str, weights: dict[str, torch.Tensor]) -> None:
        probe = copy.deepcopy(self.model)
        probe.load_state_dict(weights, strict=False)
        self.curves.setdefault(label, []).append(evaluate(probe, self.test, "cpu")["top1"])


def measure(config: TrainConfig, data: DataBundle, decays: tuple[float, ...] = DECAYS
            ) -> dict[str, list[float]]:
    """Train ``config`` once and return every average's test curve."""
    model = initial_model(config, data)
    avg = Averages(model, data.test, decays)
    train(config, model=model, data=data, callbacks=[avg])
    return avg.curves


def main() -> None:
    torch.set_num_threads(1)
    config = TrainConfig(**{**accuracy.AUTHORS, **accuracy.RUNS[RUN], "epochs": 20})
    if os.environ.get("BAFFLE_EMA_REPORT_ONLY") != "1" or not RESULTS.exists():
        curves = measure(config, load_dataset(config.dataset, config.data_dir))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"machine": machine(), "curves": curves}, indent=1))
    saved = json.loads(RESULTS.read_text())
    curves = saved["curves"]
    rows = []
    for label, c in curves.items():
        hit = next((i + 1 for i, a in enumerate(c) if a >= TARGET), None)
        rows.append([label, f"{c[9]:.2f}", f"{c[-1]:.2f}", f"{max(c):.2f}",
                     f"epoch {hit}" if hit else "-", " ".join(f"{a:.1f}" for a in c)])
    rounds = setup(config).total_rounds
    authors, per_round = curves["authors' EMA (per epoch)"], curves[f"EMA {DECAYS[0]} per round"]
    gain = [b - a for a, b in zip(authors, per_round)]
    ends = [c[-1] for c in curves.values()]
    record = accuracy.load(RUN, 20)
    same = None if record is None else [round(a, 2) for *_, a in record["curve"]] == [
        round(a, 2) for a in authors]
    binds = ", ".join(f"{takes_over(d):,} for {d}" for d in DECAYS)
    body = (
        f"Trained on: {saved['machine']}\n\n"
        f"One run of `{RUN}` (the accuracy section's command for it), evaluated after each "
        "epoch under several averages of the same weights W_t; the averages never feed back "
        f"into training. Target: {TARGET}% test top-1 within 20 epochs.\n\n"
        + table(["weights evaluated", "test top-1 % after 10 epochs", "after 20", "best",
                 f"first >= {TARGET}%", "after each epoch"], rows)
        + "\n\nWith the warm-up d_t = min(d, (1+t)/(10+t)), a per-round EMA's decay d takes "
        f"over only from round (10d-1)/(1-d) ({binds}); until then every per-round column is "
        "the same warm-up average, which weighs W_s in proportion to about s^8: mostly the last "
        "fifth of the rounds so far. "
        f"This run has {rounds:,} rounds, so a decay that takes over later is that warm-up "
        f"average throughout.\n\nThe per-round EMA with decay {DECAYS[0]} against the "
        f"authors' per-epoch EMA: {gain[9]:+.2f} points after epoch 10 and {gain[-1]:+.2f} "
        f"after epoch 20; on average {sum(gain[:10]) / 10:+.2f} over epochs 1-10 (constant lr) "
        f"and {sum(gain[10:]) / len(gain[10:]):+.2f} over epochs 11-20 (after the first lr "
        "decay)."
        f" After 20 epochs every column lies between {min(ends):.2f}% and {max(ends):.2f}%: "
        "the lr decay already removes the wander that averaging removes, so averaging the "
        "weights is not what stands between this recipe and the target."
        + ("" if same is None else
           f"\n\nThe authors' EMA column {'equals' if same else 'differs from'} the accuracy "
           f"section's saved `{RUN}` curve epoch for epoch (the same trajectory, trained again).")
    )
    write_section("ema_horizon", "Averaging the weights: per epoch vs per round", body)


def takes_over(decay: float) -> int:
    """The first update t at which min(decay, (1 + t) / (10 + t)) equals ``decay``."""
    return math.ceil((10 * decay - 1) / (1 - decay) - 1e-9)
