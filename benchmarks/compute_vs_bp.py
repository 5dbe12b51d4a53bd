"""Wall time of one BAFFLE step against one backprop step, same model and batch, over K.

The paper states that BAFFLE costs "approximately K/5 times the computation of BP-based
FL"; a backprop step is one forward and one backward pass (the backward costs ~2 forwards).
Layer directions (``--perturb layer``) are timed beside the paper's dense ones: the
batched engine runs only the layers each direction reaches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baffle.directions import DirectionScheme, layer_blocks
from baffle.estimator import EstimatorSpec, loss_differences, trainable_params
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
        layered = DirectionScheme(blocks=layer_blocks(list(trainable_params(model))))
        for K in KS:
            spec = EstimatorSpec(K, 1e-4)

            def step(dirs: DirectionScheme) -> float:
                return best_time(lambda: loss_differences(model, F.cross_entropy, x, y, 1, spec,
                                                          dirs, "auto"),
                                 REPS if K <= 200 or name == "lenet" else 1)

            t, t_layer = step(DirectionScheme()), step(layered)
            rows.append([name, K, f"{t_bp * 1e3:.1f}", f"{t * 1e3:.0f}", f"{t / t_bp:.1f}",
                         f"{K / 5:.0f}", f"{t / t_bp / (K / 5):.2f}", f"{t_layer * 1e3:.0f}",
                         f"{t_layer / t_bp / (K / 5):.2f}"])
        rows.append([name, "(one forward)", f"{t_bp * 1e3:.1f}", f"{t_fwd * 1e3:.1f}",
                     f"{t_fwd / t_bp:.2f}", "", "", "", ""])
    body = (f"Batch 32, 32x32 inputs, forward scheme (K+1 passes), `auto` engine, {THREADS} "
            "thread(s), best of repeated runs. Backprop step = forward + backward (no optimizer "
            "step, no BAFFLE reconstruction; both are small next to the passes).\n\n"
            + table(["model", "K", "backprop step ms", "BAFFLE step ms", "BAFFLE / backprop",
                     "paper K/5", "measured / (K/5)", "layer directions ms",
                     "layer: measured / (K/5)"], rows)
            + "\n\n`measured / (K/5)` would be 1.0 if the paper's K/5 held: a perturbed pass "
            "would then cost a fifth of forward + backward. The last two columns time the same "
            "step with `--perturb layer`, where a direction on layer b runs only layer b and "
            "the layers after it. The machine is shared with other "
            "jobs, so rows measured minutes apart carry load noise; read the trend, not a row.")
    write_section("compute_vs_bp", "Compute: one BAFFLE step vs one backprop step", body)


if __name__ == "__main__":
    main()
