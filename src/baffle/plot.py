"""PNG curves of test accuracy and train loss against rounds and forward passes."""

from __future__ import annotations

from pathlib import Path

from baffle.errors import ConfigError
from baffle.rundir import RunDir


def plot_runs(runs: list[Path], out: Path | None = None) -> Path:
    """Plot several runs on one 2x2 figure; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for run in runs:
        rows = RunDir(run).metrics()
        if not rows:
            raise ConfigError(f"{run} has no metrics.jsonl rows: is it a run directory?")
        label = f"{run.name}"
        fwd, total = [], 0.0
        for r in rows:
            total += r["fwd_per_client"]
            fwd.append(total)
        ev = [(r["round"] + 1, f, r["test_top1"]) for r, f in zip(rows, fwd) if "test_top1" in r]
        tr = [(r["round"] + 1, f, r["train_loss"]) for r, f in zip(rows, fwd)
              if r.get("train_loss") is not None]
        for col, key in ((0, 0), (1, 1)):
            axes[0][col].plot([e[key] for e in ev], [e[2] for e in ev], marker=".", label=label)
            axes[1][col].plot([t[key] for t in tr], [t[2] for t in tr], label=label, alpha=0.8)
    for col, xl in ((0, "round"), (1, "forward passes per client")):
        axes[0][col].set(xlabel=xl, ylabel="test top-1 (%)")
        axes[1][col].set(xlabel=xl, ylabel="train loss", yscale="log")
        for row in (0, 1):
            axes[row][col].grid(alpha=0.3)
    axes[1][1].set_xscale("log")
    axes[0][1].set_xscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out or runs[0] / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
