"""Perturbed forward passes per second: BAFFLE's engines against a naive state-dict loop,
against K plain forward passes, and against the CPU's float32 matmul peak."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baffle.directions import DirectionScheme, directions, layer_blocks
from baffle.engines import max_pool_tiles, steady_heap, tiled_max_pool, to_channels_last
from baffle.estimator import (EstimatorSpec, choose_engine, float64_diffs, loss_differences,
                              trainable_params)
from benchmarks.common import ROOT, machine, table, write_section
from benchmarks.engines_common import QUICK, THREADS, interleaved, make, setup_threads
from benchmarks.flops import forward_flops, layer_direction_flops

K = 10 if QUICK else 100
LAYER_ROW = "BAFFLE auto, layer directions (`--perturb layer`)"
DELTA_ROW = "BAFFLE delta (bfloat16 changes, `--engine delta`)"
REPS = 1 if QUICK else 5
SIGMA = 1e-4
DIRS = DirectionScheme()
# one record of the LeNet targets per kind of CPU: sessions land on different CPUs, and the
# targets are stated per CPU
RESULTS = ROOT / "benchmarks" / "results" / "throughput"


@torch.no_grad()
def naive_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """The authors' pattern: build a perturbed state dict, load it, evaluate; K times."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator(device=x.device).manual_seed(seed)
    base = F.cross_entropy(model(x), y)
    out = torch.empty(K)
    for k in range(K):
        perturbed = {n: (v + SIGMA * torch.randn(v.shape, generator=gen, device=v.device)
                         if v.is_floating_point() else v) for n, v in original.items()}
        model.load_state_dict(perturbed)
        out[k] = F.cross_entropy(model(x), y) - base
    model.load_state_dict(original)
    return out


@torch.no_grad()
def plain_passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for _ in range(K):
        F.cross_entropy(model(x), y)


def measure(name: str, mm: torch.Tensor) -> tuple[list[list[object]], dict[str, float]]:
    model, x, y = make(name)
    spec = EstimatorSpec(K, SIGMA)
    x_cl = to_channels_last(x)  # .contiguous() would keep NCHW strides when C == 1
    flops = forward_flops(model, x)
    params = trainable_params(model)

    def draw() -> None:
        for i, p in enumerate(params.values()):
            directions(DIRS, 7, range(K), i, p.shape)

    layered = DirectionScheme(blocks=layer_blocks(list(params)))

    def est(engine: str, chunk: int = 32, dirs: DirectionScheme = DIRS):  # noqa: ANN202
        return lambda: loss_differences(model, F.cross_entropy, x, y, 7, spec, dirs, engine, chunk)

    auto = choose_engine(model, x, K, "auto")
    delta = choose_engine(model, x, K, "delta")
    assert choose_engine(model, x, K, "auto", blocks=layered.blocks).reuse
    pools = pool_fns(model, x_cl, auto.chunk)
    fns = {
        "naive load_state_dict loop": lambda: naive_losses(model, x, y, 7),
        "plain forward x K (NCHW)": lambda: plain_passes(model, x, y),
        "plain forward x K (channels-last input)": lambda: plain_passes(model, x_cl, y),
        "BAFFLE sequential (functional_call)": est("sequential"),
        "BAFFLE inplace": est("inplace"),
        "BAFFLE vmap, chunk 32": est("vmap", 32),
        "BAFFLE batched, chunk 32": est("batched", 32),
        "BAFFLE batched, chunk 1": est("batched", 1),
        f"BAFFLE auto ({auto.engine}, chunk {auto.chunk})": est("auto"),
        LAYER_ROW: est("auto", dirs=layered),
        f"{DELTA_ROW}, chunk {delta.chunk}": est("delta"),
        "directions only (K draws)": draw,
        # the generator's floor: the same K*n normals from one generator in one call
        "directions floor (one randn)": lambda: torch.randn(K * sum(
            p.numel() for p in params.values())),
        **pools,
        **peak_fns(mm),
    }
    times = interleaved(fns, REPS)
    auto_key = next(k for k in times if k.startswith("BAFFLE auto"))
    plain_fast = min(("plain forward x K (NCHW)", "plain forward x K (channels-last input)"),
                     key=times.__getitem__)
    delta_key = next(k for k in times if k.startswith(DELTA_ROW))
    pairs = sorted(paired_ratios(fns[plain_fast], fns[auto_key])) if name == "lenet" else []
    delta_pairs = (sorted(paired_ratios(fns[plain_fast], fns[delta_key])) if name == "lenet"
                   else [])
    passes = {k: (K if k.startswith("plain") else K + 1) for k in fns}  # naive: base + K
    plain_best = times[plain_fast] / K
    naive = times["naive load_state_dict loop"] / (K + 1)
    # FLOPs a step runs: K+1 full passes, except under layer directions with reuse
    # (K directions at their suffix's cost, plus the recorded pass and the base loss)
    run_flops = {k: flops * passes[k] for k in fns}
    run_flops[LAYER_ROW] = layer_direction_flops(model, x, layered.blocks, K) + 2 * flops
    rows = []
    for k, t in times.items():
        if k.startswith(("directions", "peak", "pool")):
            continue
        per = t / passes[k]
        rows.append([k, f"{t:.3f}", f"{1 / per:.0f}", f"{naive / per:.2f}x",
                     f"{plain_best / per:.2f}x", f"{run_flops[k] / t / 1e9:.0f}"])
    facts = {"pairs": pairs, "flops": flops, "auto": times[auto_key] / (K + 1), "naive": naive,
             "delta": times[delta_key] / (K + 1), "delta_pairs": delta_pairs,
             **rounding(model, x, y, spec),
             "layer": times[LAYER_ROW] / (K + 1), "layer_share": run_flops[LAYER_ROW] / (K + 1)
             / flops, "n_blocks": layered.n_blocks,
             "plain": plain_best,
             "nchw_speed": times["plain forward x K (channels-last input)"]
             / times["plain forward x K (NCHW)"],
             "dirs_share": times["directions only (K draws)"] / times[auto_key],
             "dirs_floor": times["directions floor (one randn)"] / times[auto_key],
             "n_params": sum(p.numel() for p in params.values()),
             **{k: t * 1e3 for k, t in times.items() if k.startswith("pool")},
             **{k: 2 * mm.shape[0] ** 3 / t / 1e9 for k, t in times.items()
                if k.startswith("peak")}}
    facts["peak"] = max(v for k, v in facts.items() if k.startswith("peak"))
    return rows, facts


def rounding(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             spec: EstimatorSpec) -> dict[str, float]:
    """Mean |d_k - d_k in float64| over the mean |d_k|, for the float32 auto engine and
    the delta engine, on the benchmark's own batch and directions."""
    ref = float64_diffs(model, F.cross_entropy, x, y, 7, spec, DIRS)
    size = ref.abs().mean()
    return {f"err_{e}": float((loss_differences(model, F.cross_entropy, x, y, 7, spec, DIRS, e)
                               .diffs.double() - ref).abs().mean() / size)
            for e in ("auto", "delta")}


def amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN's fast bfloat16 matmuls)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def cpu_kind(desc: str) -> str:
    """What in ``machine()``'s description sets the speed: the CPU model with its SIMD and
    the core count (not torch, the date or Python)."""
    return ", ".join(desc.split(", ")[:2])


def save_targets(record: dict[str, Any]) -> None:
    """Keep this CPU's LeNet target ratios, replacing its kind's last record."""
    name = re.sub(r"[^a-z0-9]+", "-",
                  f"{cpu_kind(record['machine'])} {record['threads']} threads".lower())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name.strip('-')}.json").write_text(json.dumps(record, indent=1) + "\n")


def targets_table() -> str:
    """Every kept record's LeNet ratios against the targets, one row per kind of CPU."""
    def verdict(v: float, target: float, text: str) -> str:
        return f"{text} {'met' if v >= target else '**NOT met**'}"

    def plain_cell(r: dict[str, Any]) -> str:
        if "plain_pairs" not in r:
            return verdict(r["plain"], 1.0, f"{r['plain']:.2f}x")
        lo, med, hi = r["plain_pairs"]
        return verdict(min(r["plain"], med), 1.0,
                       f"{r['plain']:.2f}x (pairs: median {med:.2f}x, {lo:.2f}-{hi:.2f}x)")

    def delta_cell(r: dict[str, Any]) -> str:
        if "delta_naive" not in r:
            return "-"
        return (f"{r['delta_naive']:.2f}x, {r['delta_plain']:.2f}x ({r['delta_pairs'][1]:.2f}x)"
                f"{'' if r['amx'] else ', no AMX'}")

    rows = []
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        rows.append([f"{cpu_kind(r['machine'])}, {r['threads']} thread(s)",
                     r["machine"].split(", ")[-1] + (f" ({r['source']})" if "source" in r
                                                     else ""),
                     verdict(r["naive"], 2.5, f"{r['naive']:.2f}x"),
                     f"{r['bound']:.2f}x",
                     plain_cell(r),
                     f"{r['plain_bound']:.2f}x" if "plain_bound" in r else "-",
                     verdict(r["share"], 0.6, f"{r['share']:.0%} of {r['peak']:.0f} GFLOP/s"),
                     f"{r['layer_naive']:.2f}x, {r['layer_plain']:.2f}x",
                     delta_cell(r)])
    return table(["CPU", "measured", "vs naive (>= 2.5x)", "naive bound at peak",
                  "vs K plain passes (>= 1.0x)", "plain bound", "share of fp32 peak (>= 60%)",
                  "layer directions: vs naive, vs plain",
                  "delta engine: vs naive, vs plain (median pair)"], rows)


PROFILE_REPS = 1 if QUICK else 3
PAIRS = 2 if QUICK else 15


def paired_ratios(plain: Callable[[], object], step: Callable[[], object],
                  pairs: int = PAIRS) -> list[float]:
    """Per-pass speed of ``step`` (K+1 passes) over ``plain`` (K passes), once per
    back-to-back pair, the order alternating: a best-of comparison can favour whichever
    side caught the quietest moment; the median pair cannot."""
    out = []
    for i in range(pairs):
        t = {}
        for name, fn in ((("plain", plain), ("step", step)) if i % 2 == 0
                         else (("step", step), ("plain", plain))):
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
        out.append((t["plain"] / K) / (t["step"] / (K + 1)))
    return out


def conv_ms_per_pass() -> dict[str, float]:
    """Milliseconds of convolution per forward pass, LeNet: the auto step's (K+1 passes)
    against K plain channels-last passes, summed over every convolution call torch.profiler
    records (alternated, best of ``PROFILE_REPS``)."""
    model, x, y = make("lenet")
    spec, x_cl = EstimatorSpec(K, SIGMA), to_channels_last(x)
    runs = {"auto": (lambda: loss_differences(model, F.cross_entropy, x, y, 7, spec, DIRS,
                                              "auto"), K + 1),
            "plain": (lambda: plain_passes(model, x_cl, y), K)}
    best = {k: float("inf") for k in runs}
    for _ in range(PROFILE_REPS):
        for k, (fn, passes) in runs.items():
            fn()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                fn()
            us = sum(e.self_cpu_time_total for e in p.key_averages()
                     if e.key.endswith("_convolution") and "backward" not in e.key)
            best[k] = min(best[k], us / 1e3 / passes)
    return best


def pool_fns(model: nn.Module, x: torch.Tensor, chunk: int) -> dict[str, Callable[[], object]]:
    """Timers for the first max pool of ``model`` on one grouped chunk's input to it, the
    unperturbed pass's (B, C, H, W) repeated chunk times along C: ``F.max_pool2d``, which
    plain passes run, against ``max_pool_tiles``, which the grouped engine runs."""
    pool = next((m for m in model.modules() if isinstance(m, nn.MaxPool2d)), None)
    tile = tiled_max_pool(pool) if pool is not None else None
    if pool is None or tile is None:
        return {}
    seen: list[torch.Tensor] = []
    handle = pool.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    h = seen[0].repeat(1, chunk, 1, 1).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool_tiles(h, *tile), pool(h))
    return {"pool: F.max_pool2d": lambda: pool(h), "pool: tiles": lambda: max_pool_tiles(h, *tile)}


def peak_fns(mm: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Two float32 n x n by n x n products: MKL's sgemm (``torch.mm``) and oneDNN's
    (``F.linear`` on oneDNN-layout tensors). On AMD CPUs MKL takes a slower code path, so
    the peak is the faster of the two."""
    dense = mm.to_mkldnn()
    return {"peak: torch.mm (MKL)": lambda: torch.mm(mm, mm),
            "peak: linear (oneDNN)": lambda: F.linear(dense, dense)}


def main() -> None:
    setup_threads()
    heap = steady_heap()  # for every row alike: the delta engine sets it on first use anyway
    mm = torch.randn(2048, 2048)
    sections, verdicts, nchw, pool_text = [], [], 1.0, ""
    conv = conv_ms_per_pass()
    for name in ("lenet", "wrn-10-2"):
        rows, f = measure(name, mm)
        peak = f["peak"]  # timed interleaved with the methods: same load, same moment
        share = f["flops"] / f["auto"] / 1e9 / peak
        bound = f["naive"] / (f["flops"] / peak / 1e9)  # every FLOP at peak, nothing else
        sections.append(
            f"**{name}**, {'1x32x32' if name == 'lenet' else '3x32x32, GroupNorm'}, batch 32, "
            f"K={K}, sigma={SIGMA}: {f['n_params']:,} parameters, "
            f"{f['flops'] / 1e6:.1f} MFLOP per forward pass (conv + linear, 2 per MAC).\n\n"
            + table(["method", "s per step", "passes/s", "vs naive", "vs plain forward",
                     "GFLOP/s"], rows)
            + f"\n\nMeasured float32 matmul peak: {f['peak: torch.mm (MKL)']:.0f} GFLOP/s "
            f"through torch.mm (MKL), {f['peak: linear (oneDNN)']:.0f} through oneDNN; "
            f"auto reaches {share:.0%} of the faster ({peak:.0f} GFLOP/s). Drawing the K "
            f"directions is {f['dirs_share']:.1%} of the auto step; one torch.randn call "
            f"drawing as many normals takes {f['dirs_floor']:.1%} of it (the generator's "
            f"floor, without one generator per direction and tensor). An engine that ran every "
            f"FLOP of the forward passes at that peak, and did nothing else, would be "
            f"{bound:.2f}x the naive loop.\n\n"
            f"Layer directions (last BAFFLE row; another estimator, same K+1 passes, see "
            f"`--perturb`): each direction moves one of {f['n_blocks']} layers, so the layers "
            f"below it keep their unperturbed values, recorded once per step; a step then runs "
            f"{f['layer_share']:.0%} of the dense step's FLOPs (counted per layer) and takes "
            f"{f['layer'] / f['auto']:.0%} of its time: {f['naive'] / f['layer']:.2f}x the "
            f"naive loop and {f['plain'] / f['layer']:.2f}x K plain passes per pass.\n\n"
            f"Delta engine (`--engine delta`; the paper's estimator, other rounding): a conv "
            f"whose input is perturbed computes only its change from the unperturbed pass, in "
            f"bfloat16 (this CPU {'has' if amx() else 'lacks'} AMX). A step takes "
            f"{f['delta'] / f['auto']:.0%} of the auto step's time: "
            f"{f['naive'] / f['delta']:.2f}x the naive loop, {f['plain'] / f['delta']:.2f}x "
            f"K plain passes. Against the same K differences in float64, its mean error is "
            f"{f['err_delta']:.2%} of the mean |d_k|, the float32 auto engine's "
            f"{f['err_auto']:.2%}.")
        if name == "lenet":
            a, b = f["naive"] / f["auto"], f["plain"] / f["auto"]
            pairs = f["pairs"]
            med = statistics.median(pairs)
            # every perturbed pass at a plain pass's cost, plus the draw (per pass)
            plain_bound = f["plain"] / (f["plain"] + f["dirs_share"] * f["auto"])
            nchw = f["nchw_speed"]
            if "pool: tiles" in f:
                pool_text = (
                    "One layer does run faster than in a plain pass: on a CPU the grouped "
                    "engine pools LeNet's 2x2 tiles by elementwise maxima (bit-identical to "
                    "`F.max_pool2d`, without its int64 indices), "
                    f"{f['pool: tiles']:.3f} ms against {f['pool: F.max_pool2d']:.3f} ms on "
                    "one chunk's input to the pool "
                    f"({f['pool: F.max_pool2d'] / f['pool: tiles']:.1f}x)"
                    + ("; that is what lifts auto above the plain bound. " if b > plain_bound
                       else ". "))
            da, db, dpairs = f["naive"] / f["delta"], f["plain"] / f["delta"], f["delta_pairs"]
            dmed = statistics.median(dpairs)
            if not QUICK:
                save_targets({"machine": machine(), "threads": THREADS, "K": K, "naive": a,
                              "amx": amx(), "delta_naive": da, "delta_plain": db,
                              "delta_pairs": [min(dpairs), dmed, max(dpairs)],
                              "delta_err": f["err_delta"], "auto_err": f["err_auto"],
                              "plain": b, "plain_bound": plain_bound, "share": share,
                              "plain_pairs": [min(pairs), med, max(pairs)],
                              "peak": peak, "bound": bound,
                              "layer_naive": f["naive"] / f["layer"],
                              "layer_plain": f["plain"] / f["layer"]})
            verdicts = [
                f"- >= 2.5x the naive loop: {'met' if a >= 2.5 else 'NOT met'} ({a:.2f}x; "
                f"the peak-FLOP/s bound is {bound:.2f}x)",
                f"- >= 1.0x K plain forward passes (the faster of NCHW and channels-last): "
                f"{'met' if min(b, med) >= 1.0 else 'NOT met'} ({b:.2f}x best of {REPS} "
                f"against best of {REPS}; {med:.2f}x the median of {len(pairs)} back-to-back "
                f"pairs, from {min(pairs):.2f}x to {max(pairs):.2f}x; met only if both are "
                f">= 1.0x. An engine whose every perturbed pass cost one plain pass, plus the "
                f"measured draw, would reach {plain_bound:.2f}x)",
                f"- >= 60% of the float32 matmul peak: {'met' if share >= 0.6 else 'NOT met'} "
                f"({share:.0%} of {peak:.0f} GFLOP/s)",
                f"- with the delta engine (`--engine delta`, bfloat16 changes; this CPU "
                f"{'has' if amx() else 'lacks'} AMX): {da:.2f}x the naive loop "
                f"({'met' if da >= 2.5 else 'NOT met'}), {db:.2f}x K plain passes best of "
                f"{REPS} and {dmed:.2f}x the median of {len(dpairs)} pairs, from "
                f"{min(dpairs):.2f}x to {max(dpairs):.2f}x "
                f"({'met' if min(db, dmed) >= 1.0 else 'NOT met'}); its loss differences are "
                f"off float64 by {f['err_delta']:.2%} of their mean size in the mean, float32 "
                f"auto's by {f['err_auto']:.2%}",
                f"- with layer directions instead (not the paper's estimator): "
                f"{f['naive'] / f['layer']:.2f}x the naive loop, "
                f"{f['plain'] / f['layer']:.2f}x K plain passes"]
    body = (f"{THREADS} thread(s) (`BAFFLE_BENCH_THREADS`); best of {REPS} interleaved "
            "repetitions (the machine is shared, noise only adds time); glibc keeps freed "
            "blocks of up to 32 MiB mapped for every row (`baffle.engines.steady_heap`: "
            f"{'set' if heap else 'not available here'}). A step is K+1 passes "
            "(forward scheme), as is the naive loop's; `plain` counts K passes. `vs` columns "
            "are per-pass speed ratios (higher is better). The naive loop rebuilds and loads "
            "a perturbed state dict per direction, as the authors' code does.\n\n"
            + "\n\n".join(sections)
            + "\n\nTargets for LeNet, K=100 (auto engine):\n\n" + "\n".join(verdicts)
            + "\n\nThe same targets on every kind of CPU this benchmark has measured (the "
            "latest run on each, kept in `benchmarks/results/throughput/`):\n\n"
            + targets_table()
            + "\n\nWhat bounds these ratios: LeNet's forward is 94% one 5x5 conv, which "
            "oneDNN already runs near the core's peak in channels-last; a pass that perturbs "
            "every weight cannot do fewer FLOPs than a plain one, so the estimator can beat K "
            "plain passes only where a perturbed pass runs faster than a plain one. Its "
            f"convolutions do not: under torch.profiler (best of {PROFILE_REPS}) the auto "
            f"step's convolutions took {conv['auto']:.2f} ms a pass against "
            f"{conv['plain']:.2f} ms in K plain passes; the `plain bound` column is what the "
            "draw leaves of an engine whose every perturbed pass costs one plain pass. "
            + pool_text +
            f"The naive loop is slow mostly because it runs in NCHW, where K plain passes run "
            f"at {nchw:.2f}x their channels-last speed on this CPU (oneDNN's convolution and "
            "max-pooling are slower in NCHW); the peak-FLOP/s bound above is the most "
            "any engine that runs every layer of every perturbed pass in float32 could reach. "
            "Layer directions pass it by not running the layers below the perturbed one; the "
            "delta engine runs each conv's change, twice the conv's FLOPs, in bfloat16, "
            + ("which passes it on this CPU, which has AMX." if amx() else
               "which passes it only on a CPU with AMX (see the table above): this one lacks "
               "it, and there the delta step is slower than auto's."))
    write_section("throughput", "Throughput: perturbed forward passes per second", body)


if __name__ == "__main__":
    main()
