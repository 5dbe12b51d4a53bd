"""The EMA of weights: its warm-up formula, and per-epoch vs per-round updates in training."""

import pytest
import torch
from torch import nn

from baffle.config import TrainConfig
from baffle.data.registry import load_dataset
from baffle.ema import EMA
from baffle.errors import ConfigError
from baffle.simulator import initial_model, train


def by_hand(snapshots: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor],
            decay: float) -> dict[str, torch.Tensor]:
    """shadow <- d_t shadow + (1 - d_t) W_t, d_t = min(decay, (1 + t) / (10 + t)), in float64."""
    shadow = {n: t.double() for n, t in start.items()}
    for t, w in enumerate(snapshots):
        d = min(decay, (1 + t) / (10 + t))
        shadow = {n: d * shadow[n] + (1 - d) * w[n].double() for n in shadow}
    return shadow


def test_update_follows_the_warm_up_formula():
    lin = nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in lin.named_parameters()}
    ema, seen = EMA.of(lin, 0.5), []
    for step in range(12):  # d_t = 0.1, 0.18, 0.25, ... (1+t)/(10+t), capped at 0.5 from t = 8
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(float(step + 1))
        seen.append({n: p.detach().clone() for n, p in lin.named_parameters()})
        ema.update(lin)
    want = by_hand(seen, start, 0.5)
    for n, t in ema.shadow.items():
        torch.testing.assert_close(t.double(), want[n], rtol=1e-6, atol=1e-6)


class Snapshots:
    """Records the model's weights after every round (the callback runs after the update)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.after = model, []

    def on_round(self, record, total_rounds):
        self.after.append({n: t.detach().clone() for n, t in self.model.state_dict().items()})


CFG = TrainConfig(dataset="digits", clients=2, K=3, lr=0.03, epochs=2, ema=True,
                  ema_decay=0.9)


@pytest.mark.parametrize("every", ["epoch", "round"])
def test_training_updates_the_ema_per_epoch_or_per_round(every):
    cfg = CFG.replace(ema_every=every)
    model = initial_model(cfg, load_dataset("digits"))
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    snaps = Snapshots(model)
    res = train(cfg, model=model, callbacks=[snaps])
    rounds = len(res.metrics)
    per_epoch = round(1 / res.metrics[0]["epoch"])
    assert rounds == 2 * per_epoch > 2
    used = snaps.after if every == "round" else snaps.after[per_epoch - 1::per_epoch]
    want = by_hand(used, start, 0.9)
    got = res.model.state_dict()  # the evaluation model holds the EMA weights
    for n, t in want.items():
        torch.testing.assert_close(got[n].double(), t, rtol=1e-5, atol=1e-6)
    # and the other schedule would have given other weights
    other = by_hand(snaps.after[per_epoch - 1::per_epoch] if every == "round" else snaps.after,
                    start, 0.9)
    assert any(not torch.allclose(got[n].double(), other[n], atol=1e-4) for n in other)


def test_bad_ema_every_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown ema every 'step'; choose one of: epoch, round"):
        CFG.replace(ema_every="step")
