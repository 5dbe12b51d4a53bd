"""Peak resident memory of one client step, each in its own subprocess.

The child imports torch, builds the model and the batch, records its resident set as the
baseline, resets the kernel's high-water mark (``/proc/self/clear_refs``), runs one step
and reports ``VmHWM``. Raw peaks and peaks above the baseline are both reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, table, write_section
from benchmarks.engines_common import QUICK, THREADS

K = 10 if QUICK else 100
# fresh subprocesses per row: from one run to the next the above-baseline peak of a row
# moved by a fifth or more (WRN-10-2 inplace: 22.6-32.6 MiB over 5 runs, 2026-12-01)
REPS = 1 if QUICK else 5
LAYER = "BAFFLE batched (auto chunk), layer directions"
DELTA = "BAFFLE delta (its chunk, 4 on a CPU)"
PLAIN_PASSES = K + 1  # as many as the inplace step runs
PLAIN_K = f"plain inference, {PLAIN_PASSES} passes"
MODES = ("BAFFLE batched (auto chunk)", LAYER, "BAFFLE batched, chunk 32", DELTA, "BAFFLE inplace",
         "BAFFLE sequential", "plain inference", PLAIN_K, "backprop",
         "backprop + activation checkpointing")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_step(name: str, mode: str, model: Any, K: int = K, device: str = "cpu"
              ) -> Callable[[Any, Any], None]:
    """One client step of kind ``mode`` on ``model`` (directions drawn on ``device``)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from baffle.directions import DirectionScheme, layer_blocks
    from baffle.estimator import EstimatorSpec, loss_differences

    spec, dirs = EstimatorSpec(K, 1e-4), DirectionScheme(device=device)
    if mode == LAYER:  # keeps one unperturbed pass's activations for the layers below
        dirs = DirectionScheme(device=device,
                               blocks=layer_blocks([n for n, _ in model.named_parameters()]))

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        if mode.startswith("BAFFLE"):
            engine = {"BAFFLE inplace": "inplace", "BAFFLE sequential": "sequential",
                      "BAFFLE batched, chunk 32": "batched", DELTA: "delta"}.get(mode, "auto")
            loss_differences(model, F.cross_entropy, xb, yb, 3, spec, dirs, engine, 32)
        elif mode in ("plain inference", PLAIN_K):
            with torch.no_grad():
                for _ in range(PLAIN_PASSES if mode == PLAIN_K else 1):
                    F.cross_entropy(model(xb), yb)
        elif mode == "backprop":
            F.cross_entropy(model(xb), yb).backward()
        elif mode == "backprop + activation checkpointing":
            # checkpoint every top-level stage: only stage boundaries are kept for backward
            stages = (list(model.features) + [model.classifier] if name == "lenet"
                      else [model.stem, *model.blocks, model.head, model.classifier])
            h = xb
            for s in stages:
                h = checkpoint(s, h, use_reentrant=False) if any(
                    True for _ in s.parameters()) else s(h)
            F.cross_entropy(h, yb).backward()
        else:
            raise ValueError(f"no memory step is called {mode!r}")

    return step


def child(name: str, mode: str) -> None:
    import torch

    from benchmarks.engines_common import make

    torch.set_num_threads(THREADS)
    model, x, y = make(name)
    step = make_step(name, mode, model)
    step(x[:2], y[:2])  # the same step on 2 examples: loads its code and warms the allocator
    model.zero_grad(set_to_none=True)
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step(x, y)
    print(json.dumps({"base": base, "peak": _status("VmHWM")}))


def run_child(name: str, mode: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", name, mode],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"error: memory step {name!r} / {mode!r} failed (exit {out.returncode}): "
                 + (out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict[str, int]]) -> dict[str, int]:
    """The run whose peak above its baseline is the median (the lower middle one)."""
    return sorted(runs, key=lambda r: r["peak"] - r["base"])[(len(runs) - 1) // 2]


def main() -> None:
    sections, verdicts = [], []
    for name in ("lenet", "wrn-10-2"):
        runs: dict[str, list[dict[str, int]]] = {m: [] for m in MODES}
        for _ in range(REPS):  # interleaved, so a slow spell hits every row alike
            for m in MODES:
                runs[m].append(run_child(name, m))
        res = {m: median_run(rs) for m, rs in runs.items()}
        plain = res["plain inference"]
        rows = []
        for m, r in res.items():
            above = r["peak"] - r["base"]
            spread = [(x["peak"] - x["base"]) / 2**20 for x in runs[m]]
            rows.append([m, f"{r['peak'] / 2**20:.1f}", f"{above / 2**20:.1f}",
                         f"{min(spread):.1f}-{max(spread):.1f}",
                         f"{r['peak'] / plain['peak']:.2f}x",
                         f"{above / max(1, plain['peak'] - plain['base']):.2f}x"])
        sections.append(f"**{name}**, batch 32, 32x32, K={K}; baseline (interpreter, torch, "
                        f"model, batch) {plain['base'] / 2**20:.0f} MiB.\n\n"
                        + table(["step", "peak RSS MiB", "above baseline MiB",
                                 f"above baseline, {REPS} runs", "raw vs inference",
                                 "above-baseline vs inference"], rows))
        inp = res["BAFFLE inplace"]
        raw = inp["peak"] / plain["peak"]
        above = (inp["peak"] - inp["base"]) / max(1, plain["peak"] - plain["base"])
        repeated = res[PLAIN_K]
        again = (inp["peak"] - inp["base"]) / max(1, repeated["peak"] - repeated["base"])
        verdicts.append(f"- {name}: inplace is {raw:.2f}x plain inference raw "
                        f"({'met' if raw <= 1.2 else 'NOT met'}), {above:.2f}x above baseline "
                        f"({'met' if above <= 1.2 else 'NOT met'}); above baseline it is "
                        f"{again:.2f}x the same {K + 1} passes of plain inference")
    body = (f"Each row is the median of {REPS} fresh subprocesses (by the peak above "
            f"baseline; run interleaved, {THREADS} thread(s)): peak resident set (VmHWM) "
            "of one client step after the high-water mark is reset at the baseline, which is taken "
            "after the same step has run once on 2 examples (so that code loaded on first use, "
            "which is not per-step memory, is in the baseline of every row). "
            "`auto` on a CPU runs 2 perturbations per grouped pass; `chunk 32` shows what a "
            "wide batch costs; `delta` (`--engine delta`) keeps one unperturbed pass's "
            "activations too, and glibc keeps freed blocks of up to 32 MiB mapped "
            "(`steady_heap`); `layer directions` (`--perturb layer`) also keeps every "
            "activation of one unperturbed pass, so layers below a perturbed one run once. "
            f"`plain inference, {K + 1} passes` runs the unperturbed forward as many times as "
            "the inplace step does (K + 1): the peak of inference repeated, which the "
            "allocator's reuse of freed blocks lifts above one pass's.\n\n"
            + "\n\n".join(sections)
            + "\n\nTarget: inplace within 1.2x of plain inference.\n\n" + "\n".join(verdicts))
    write_section("memory", "Memory: peak resident set of one client step", body)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
