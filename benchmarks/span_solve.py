"""How close each rebuild of a guided round comes to the gradient's part in the span.

    python -m benchmarks.run span_solve      # 3-8 minutes on one CPU core

At the last checkpoint of the accuracy run ``baffle-fedsgd-round-guided50-solve-k60`` (its
weights W and the server's basis U, d x 50), for a batch of 320 training images (ten
clients' batches of 32) with exact gradient g, it takes the real loss differences of K
guided directions U z_k (LeNet, sigma 1e-4, forward differences, float32, the batched
engine) and rebuilds the estimate two ways:

- mean: g_hat = U (1/K sum_k z_k d_k / sigma), the Monte Carlo average (``--guide-dims``);
- solve: g_hat = U c, c the least-squares fit of d_k / sigma = a + z_k^T c
  (``--guide-solve``).

Each row gives |g_hat - U U^T g| / |U U^T g|, averaged over 5 seeds. In theory the mean's
error is about sqrt((r + 1)/K) and the solve's is zero once K > r, up to the finite
difference: float32 rounding of the losses (amplified by the conditioning of the K x 51
design, worst at K = r + 1) and the second-order term around its mean.

The checkpoint is read from ``runs/accuracy/<run>/`` (or its carried copy); the numbers are
saved to ``benchmarks/results/span_solve.json``, which is re-rendered where neither is found
(a fresh clone) or with ``BAFFLE_SPAN_REPORT_ONLY=1``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from baffle.config import from_dict
from baffle.directions import Basis, DirectionScheme
from baffle.estimator import EstimatorSpec, loss_differences, trainable_params
from baffle.guide import flat_gradient
from baffle.reconstruct import rebuild_gradient
from baffle.simulator import setup
from benchmarks.common import ROOT, table, write_section

RUN = "baffle-fedsgd-round-guided50-solve-k60"
KS = (51, 60, 100, 200)
SEEDS = 5
BATCH = 320
SIGMA = 1e-4
RESULTS = ROOT / "benchmarks" / "results" / "span_solve.json"


def run_folder(name: str = RUN) -> Path | None:
    """Where the run's checkpoint is: its run directory, else its carried copy."""
    for folder in (ROOT / "runs" / "accuracy" / name,
                   ROOT / "benchmarks" / "results" / "accuracy" / "carry" / name):
        if (folder / "checkpoint.pt").exists():
            return folder
    return None


def measure(folder: Path, ks: tuple[int, ...] = KS, seeds: int = SEEDS,
            batch: int = BATCH) -> dict[str, Any]:
    """The rows above for the run in ``folder`` (config.json and checkpoint.pt)."""
    cfg = from_dict(json.loads((folder / "config.json").read_text()))
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    fed = setup(cfg)
    model = fed.server.model
    model.load_state_dict(state["server"]["model"])
    u = state["server"]["guide"]["basis"]
    if u is None:
        raise SystemExit(f"error: {folder} has no basis yet; train it past its first one")
    dirs = DirectionScheme(basis=Basis(u, fed.server.sizes))
    pick = torch.randperm(len(fed.data.train.y), generator=torch.Generator().manual_seed(0))
    x, y = fed.data.train.x[pick[:batch]], fed.data.train.y[pick[:batch]]
    g = flat_gradient(model, F.cross_entropy, x, y)
    target = u @ (u.T @ g)
    shapes = [p.shape for p in trainable_params(model).values()]
    rows = []
    for K in ks:
        err = {}
        for solve in (False, True):
            spec = EstimatorSpec(K, SIGMA, "forward", solve)
            total = 0.0
            for seed in range(seeds):
                est = loss_differences(model, F.cross_entropy, x, y, seed, spec, dirs, "batched")
                g_hat = torch.cat([t.reshape(-1) for t in
                                   rebuild_gradient(shapes, seed, est.diffs, spec, dirs)])
                total += float((g_hat - target).norm() / target.norm())
            err["solve" if solve else "mean"] = total / seeds
        rows.append({"K": K, **err})
    return {"run": folder.name, "round": int(state["rounds_done"]), "r": u.shape[1],
            "held": float(target.norm() / g.norm()), "rows": rows}


def report(saved: dict[str, Any]) -> None:
    r = saved["r"]
    rows = [[x["K"], x["K"] + 1, f"{x['mean']:.3f}", f"{((r + 1) / x['K']) ** 0.5:.3f}",
             f"{x['solve']:.4f}", f"{x['mean'] / x['solve']:.0f}x"] for x in saved["rows"]]
    body = (__doc__.split("\n\n", 2)[2].split("\n\nThe checkpoint")[0]
            + f"\n\nCheckpoint: {saved['run']} after round {saved['round']} (r = {r}); the "
            f"span holds this batch's gradient to |U U^T g| / |g| = {saved['held']:.3f}.\n\n"
            + table(["K", "forward passes", "mean: error", "sqrt((r+1)/K)", "solve: error",
                     "mean / solve"], rows)
            + "\n\nReading: " + reading(saved))
    write_section("span_solve", "Guided rounds: least-squares rebuild against the mean", body)


def reading(saved: dict[str, Any]) -> str:
    rows, r = saved["rows"], saved["r"]
    fine = [x for x in rows if x["K"] > r + 1]
    edge = [x for x in rows if x["K"] == r + 1]
    text = ("the mean's error follows sqrt((r+1)/K): "
            + ", ".join(f"{x['mean']:.2f} at K = {x['K']}" for x in rows)
            + "; the solve's is "
            + ", ".join(f"{x['solve']:.4f} at K = {x['K']}" for x in rows) + ".")
    if fine:
        best = min(fine, key=lambda x: x["mean"] / x["solve"])
        text += (f" From K = {fine[0]['K']} on, the solve is at least "
                 f"{best['mean'] / best['solve']:.0f} times closer to the gradient's part in "
                 "the span than the mean: what is left is the finite difference's own error.")
    if edge:
        text += (f" At K = r + 1 = {edge[0]['K']} the {r + 1} x {r + 1} design is square and often badly "
                 "conditioned, which amplifies the losses' float32 rounding: leave K a few "
                 "above r + 1.")
    return text


def main() -> None:
    folder = None if os.environ.get("BAFFLE_SPAN_REPORT_ONLY") else run_folder()
    if folder is not None:
        RESULTS.write_text(json.dumps(measure(folder), indent=1) + "\n")
    elif not RESULTS.exists():
        sys.exit(f"error: no checkpoint of {RUN} and no saved numbers: train it first "
                 f"(BAFFLE_ACC_RUNS={RUN} python -m benchmarks.run accuracy)")
    else:
        print(f"span_solve: re-rendering the saved numbers ({RESULTS.name})", file=sys.stderr)
    report(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
