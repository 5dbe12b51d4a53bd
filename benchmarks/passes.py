"""Fewer forward passes for the same accuracy: central vs forward differences, seed
sharing, sigma, K, a K schedule, an lr decay and layer directions, each against the
paper's protocol (forward, K=100, one seed per round) on the same data, model and epochs.

    python -m benchmarks.run passes      # 57 curves: ~1 h on 2 AVX2 cores in 2 shards

The target is the reference's accuracy at the end of its budget (mean over seeds); a
variant's cost is the forward passes per client until its seed-mean test accuracy
first reaches it. "Half" means at most half the reference's passes.

Each (variant, seed) curve is kept in ``benchmarks/results/passes/<hash of its config>.json``
(committed, so a fresh clone rebuilds the table), an interrupted run goes on where it
stopped and a new variant trains alone; delete the folder after changing the estimator.
The key holds only the fields that differ from their defaults, so adding a config field
(at a default that keeps the old behaviour) keeps every saved curve.
``BAFFLE_PASSES_SHARD=i/n`` trains only every n-th
uncached curve from the i-th and writes no table: run n of them side by side, one per
core, then the plain command to tabulate.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from baffle import TrainConfig, __version__, train
from baffle.rundir import atomic_write
from benchmarks.common import ROOT, table, write_section

BASE = TrainConfig(dataset="digits", clients=10, K=100, sigma=1e-4, lr=0.03, epochs=40)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Variant:
    name: str
    changes: dict[str, Any]

    def config(self, seed: int) -> TrainConfig:
        return BASE.replace(seed=seed, **self.changes)


REFERENCE = Variant("paper protocol: forward, K=100, round seed", {})
VARIANTS = (
    REFERENCE,
    Variant("forward, K=50, round seed", dict(K=50)),
    Variant("central, K=50, round seed", dict(K=50, scheme="central")),
    Variant("forward, K=100, round seed, sigma 1e-3", dict(sigma=1e-3)),
    Variant("forward, K=100, client seeds", dict(seed_sharing="client")),
    Variant("forward, K=50, client seeds", dict(K=50, seed_sharing="client")),
    Variant("forward, K=25, client seeds", dict(K=25, seed_sharing="client")),
    Variant("central, K=25, client seeds", dict(K=25, scheme="central", seed_sharing="client")),
    Variant("forward, K=50, client seeds, sigma 1e-3",
            dict(K=50, seed_sharing="client", sigma=1e-3)),
    # K schedule: few directions early, when any descent direction helps
    Variant("forward, K 25 > 50 > 100 at epochs 10, 20, round seed",
            dict(K=25, K_milestones=(10, 20), K_values=(50, 100))),
    Variant("forward, K 25 > 50 > 100 at epochs 10, 20, client seeds",
            dict(K=25, K_milestones=(10, 20), K_values=(50, 100), seed_sharing="client")),
    # lr decay: the reference's protocol with the lr cut 5x at epochs 20 and 30
    Variant("forward, K=100, round seed, lr x0.2 at epochs 20, 30",
            dict(lr_milestones=(20, 30))),
    # layer directions: each direction moves one of LeNet's 3 layers (--perturb layer)
    Variant("forward, K=100, round seed, layer directions", dict(perturb="layer")),
    Variant("forward, K=50, round seed, layer directions", dict(K=50, perturb="layer")),
    Variant("forward, K=100, client seeds, layer directions",
            dict(seed_sharing="client", perturb="layer")),
    Variant("forward, K=25, client seeds, layer directions",
            dict(K=25, seed_sharing="client", perturb="layer")),
    # stock SGD (momentum 0.9) instead of Adam: does Adam's per-weight normalisation, which
    # gives conv2's noisy weights steps as large as the well-estimated layers' ones, hold
    # layer directions back? lr 0.3 was the better of 0.3 and 1.0 in a hand sweep
    Variant("forward, K=100, client seeds, layer directions, SGD lr 0.3",
            dict(seed_sharing="client", perturb="layer", optimizer="sgd", lr=0.3)),
    # a longer Adam first moment: it smooths each step, but the steps' summed noise, which
    # is what moves the weights over many rounds, does not shrink with beta1
    Variant("forward, K=100, client seeds, layer directions, Adam betas (0.95, 0.99)",
            dict(seed_sharing="client", perturb="layer", betas=(0.95, 0.99))),
    Variant("forward, K=100, client seeds, layer directions, Adam betas (0.99, 0.999)",
            dict(seed_sharing="client", perturb="layer", betas=(0.99, 0.999))),
    # epoch mode: one local epoch of BAFFLE steps per round, same passes per epoch; each
    # client's Adam fresh every round, or kept from round to round (--client-optimizer keep)
    Variant("epoch mode, K=100, client seeds", dict(mode="epoch", seed_sharing="client")),
    Variant("epoch mode, K=100, client seeds, kept client optimizer",
            dict(mode="epoch", seed_sharing="client", client_optimizer="keep")),
)


CACHE = ROOT / "benchmarks" / "results" / "passes"


def cache_file(cfg: TrainConfig) -> Path:
    """Where ``cfg``'s curve is kept: keyed by the fields that differ from their defaults
    and by baffle's and torch's versions, so a field added later, at its default, leaves
    every key as it was."""
    default = type(cfg)().to_dict()
    changed = {k: v for k, v in cfg.to_dict().items() if v != default[k]}
    key = json.dumps([changed, __version__, torch.__version__], sort_keys=True)
    return CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def curve(cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """Cumulative forward passes per client at each evaluation, and test top-1 there."""
    f = cache_file(cfg)
    if f.exists():
        saved = json.loads(f.read_text())
        return saved["passes"], saved["top1"]
    fwd, xs, ys = 0.0, [], []
    for r in train(cfg).metrics:
        fwd += r["fwd_per_client"]
        if "test_top1" in r:
            xs.append(fwd)
            ys.append(r["test_top1"])
    f.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"config": cfg.to_dict(), "threads": torch.get_num_threads(),
                       "passes": xs, "top1": ys}).encode()
    atomic_write(f, lambda fh: fh.write(text))  # a killed run leaves no half-written curve
    return xs, ys


def curves(variant: Variant) -> tuple[list[float], list[list[float]]]:
    """Cumulative forward passes per client at each evaluation, and test top-1 per seed."""
    passes, accs = [], []
    for seed in SEEDS:
        passes, ys = curve(variant.config(seed))
        accs.append(ys)
    return passes, accs


def first_reach(passes: list[float], mean: list[float], target: float) -> float | None:
    return next((p for p, a in zip(passes, mean) if a >= target), None)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shard = os.environ.get("BAFFLE_PASSES_SHARD")
    if shard:  # train a share of the uncached curves, no table
        i, n = (int(x) for x in shard.split("/"))
        todo = [v.config(s) for v in VARIANTS for s in SEEDS]
        for cfg in [c for c in todo if not cache_file(c).exists()][i::n]:
            curve(cfg)
        return
    results = {v.name: curves(v) for v in VARIANTS}
    threads = sorted({json.loads(cache_file(v.config(s)).read_text()).get("threads", "?")
                      for v in VARIANTS for s in SEEDS}, key=str)
    ref_passes, ref_accs = results[REFERENCE.name]
    ref_mean = [sum(a) / len(a) for a in zip(*ref_accs)]
    target = ref_mean[-1]
    ref_cost = first_reach(ref_passes, ref_mean, target)
    assert ref_cost is not None
    rows = []
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, v in enumerate(VARIANTS):
        passes, accs = results[v.name]
        mean = [sum(a) / len(a) for a in zip(*accs)]
        cost = first_reach(passes, mean, target)
        share = None if cost is None else cost / ref_cost
        verdict = ("not reached" if share is None
                   else "reference" if v is REFERENCE
                   else f"{share:.0%}" + (" (half or less)" if share <= 0.5 else ""))
        rows.append([v.name, f"{passes[-1] / len(passes):.0f}",  # a mean under a K schedule
                     " / ".join(f"{a[-1]:.1f}" for a in accs), f"{mean[-1]:.2f}",
                     "-" if cost is None else f"{cost:,.0f}", verdict])
        ax.plot(passes, mean, marker=".", ms=3, label=v.name, color=plt.get_cmap("tab20")(i % 20))
    ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set(xlabel="forward passes per client", ylabel="test top-1 % (mean of seeds)")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.7, 1))
    figure = ROOT / "benchmarks" / "figures" / "passes.png"
    fig.savefig(figure, dpi=100)
    plt.close(fig)
    body = (
        f"digits, LeNet (no norm, Hardswish), C={BASE.clients} iid, Adam lr {BASE.lr} unless "
        f"named, EMA, batch {BASE.batch_size}, FedSGD unless named, {BASE.epochs} epochs for every "
        f"variant, seeds {SEEDS}; sigma {BASE.sigma} unless named. Target: the reference's mean test top-1 "
        f"after {BASE.epochs} epochs, {target:.2f}%. Cost: forward passes per client until "
        "the seed-mean first reaches it (evaluated once per epoch). Curves trained with "
        f"{'/'.join(map(str, threads))} torch thread(s) each: float32 sums round differently "
        "with another thread count and training amplifies it, so a rerun on other threads "
        "moves these numbers by about the spread between seeds.\n\n"
        + table(["variant", "fwd passes/client/epoch (mean)", "final test top-1 % per seed",
                 "final mean", "passes to target", "share of the reference's passes"], rows)
        + "\n\n![passes](benchmarks/figures/passes.png)"
    )
    write_section("passes", "Fewer forward passes: what reaches the paper protocol's accuracy",
                  body)


if __name__ == "__main__":
    main()
