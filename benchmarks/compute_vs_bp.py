"""Wall time of one BAFFLE step against one backprop step, same model and batch, over K.

The paper states that BAFFLE costs "approximately K/5 times the computation of BP-based
FL"; a backprop step is one forward and one backward pass (the backward costs ~2 forwards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baffle.directions import DirectionScheme
from baffle.estimator import EstimatorSpec, loss_differences
from benchmarks.common import table, write_section
from benchmarks.engines_common import QUICK, THREADS, best_time, make, setup_threads

KS = (20,) if QUICK else (20, 50, 100, 200, 500)
REPS = 1 if QUICK else 3


def main() -> None:
    setup_threads()
    rows = []
    for name in ("lenet",) if QUICK else ("lenet", "wrn-10-2"):
        model, x, y = make(name)

        def bp() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        t_bp = best_time(bp, 5 * REPS)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_fwd = best_time(lambda: F.cross_entropy(model(x), y), 5 * REPS)
        for K in KS:
            spec = EstimatorSpec(K, 1e-4)
            t = best_time(lambda: loss_differences(model, F.cross_entropy, x, y, 1, spec,
                                                   DirectionScheme(), "auto"),
                          REPS if K <= 200 or name == "lenet" else 1)
            rows.append([name, K, f"{t_bp * 1e3:.1f}", f"{t * 1e3:.0f}", f"{t / t_bp:.1f}",
                         f"{K / 5:.0f}", f"{t / t_bp / (K / 5):.2f}"])
        rows.append([name, "(one forward)", f"{t_bp * 1e3:.1f}", f"{t_fwd * 1e3:.1f}",
                     f"{t_fwd / t_bp:.2f}", "", ""])
    body = (f"Batch 32, 32x32 inputs, forward scheme (K+1 passes), `auto` engine, {THREADS} "
            "thread(s), best of repeated runs. Backprop step = forward + backward (no optimizer "
            "step, no BAFFLE reconstruction; both are small next to the passes).\n\n"
            + table(["model", "K", "backprop step ms", "BAFFLE step ms", "BAFFLE / backprop",
                     "paper K/5", "measured / (K/5)"], rows)
            + "\n\nThe last column would be 1.0 if the paper's K/5 held: a perturbed pass "
            "would then cost a fifth of forward + backward. The machine is shared with other "
            "jobs, so rows measured minutes apart carry load noise; read the trend, not a row.")
    write_section("compute_vs_bp", "Compute: one BAFFLE step vs one backprop step", body)


if __name__ == "__main__":
    main()
