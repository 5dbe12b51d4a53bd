"""The estimator on a CUDA GPU: throughput against the naive loop, K plain passes and the
measured float32 matmul peak; the TF32 guard's effect on the loss differences; and GPU
memory of one client step (``torch.cuda.max_memory_allocated``, all in one process).

Skipped, leaving its section as it was, where no CUDA device is visible.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from baffle.client import local_epoch_update, local_step
from baffle.directions import DirectionScheme, directions, layer_blocks
from baffle.estimator import EstimatorSpec, choose_engine, loss_differences, trainable_params
from baffle.reconstruct import rebuild_gradient
from benchmarks import engines_common, memory, throughput
from benchmarks.common import table, write_section
from benchmarks.engines_common import make
from benchmarks.flops import forward_flops, layer_direction_flops

K, SIGMA, REPS = 100, 1e-4, 7
DEV = "cuda"


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return run


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best wall time of each function, each run to the end of its GPU work."""
    return engines_common.interleaved({k: synced(f) for k, f in fns.items()}, reps)


def matmul_peak(n: int = 8192) -> dict[str, float]:
    """GFLOP/s of an n^3 float32 product, full float32 and TF32."""
    a = torch.randn(n, n, device=DEV)
    out = {}
    for label, prec in (("fp32", "ieee"), ("tf32", "tf32")):
        saved = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = prec
        t = interleaved({"mm": lambda: a @ a}, 5)["mm"]
        torch.backends.cuda.matmul.fp32_precision = saved
        out[label] = 2 * n ** 3 / t / 1e9
    return out


def float64_diffs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
                  spec: EstimatorSpec, dirs: DirectionScheme) -> torch.Tensor:
    """d_k = L(W + sigma eps_k) - L(W) in float64 on the CPU, along the very directions
    ``dirs`` draws (on whatever device it draws them): the reference for any engine."""
    m64 = copy.deepcopy(model).double().cpu()
    w = {n: p.detach() for n, p in m64.named_parameters()}
    x64, y64 = x.double().cpu(), y.cpu()

    def loss(point: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(m64, point, (x64,)), y64)

    base = loss(w)
    return torch.stack([loss({n: p + spec.sigma * directions(dirs, seed, range(k, k + 1), i,
                                                             p.shape)[0].cpu().double()
                              for i, (n, p) in enumerate(w.items())}) - base
                        for k in range(spec.K)])


def tf32_error(name: str) -> tuple[float, float]:
    """Relative error of the grouped engine's d_k against float64, with and without the guard
    (cuDNN's default TF32 convolutions switched on around both)."""
    model, x, y = make(name, batch=32)
    model, x, y = model.to(DEV), x.to(DEV), y.to(DEV)
    spec, dirs = EstimatorSpec(16, SIGMA), DirectionScheme(device=DEV)
    ref = float64_diffs(model, x, y, 9, spec, dirs)
    unguarded = loss_differences.__wrapped__.__wrapped__  # under no_grad, without exact_fp32
    conv = torch.backends.cudnn.conv
    saved, conv.fp32_precision = conv.fp32_precision, "tf32"
    try:
        with_guard = loss_differences(model, F.cross_entropy, x, y, 9, spec, dirs, "batched")
        with torch.no_grad():
            without = unguarded(model, F.cross_entropy, x, y, 9, spec, dirs, "batched")
    finally:
        conv.fp32_precision = saved
    return tuple(float((e.diffs.double() - ref).norm() / ref.norm())  # type: ignore[return-value]
                 for e in (with_guard, without))


def speed(name: str, peak: float) -> tuple[str, dict[str, float]]:
    model, x, y = make(name)
    model, x, y = model.to(DEV), x.to(DEV), y.to(DEV)
    spec, dirs = EstimatorSpec(K, SIGMA), DirectionScheme(device=DEV)
    layered = DirectionScheme(device=DEV, blocks=layer_blocks(list(trainable_params(model))))
    counter = DirectionScheme(device=DEV, sampler="counter")
    flops = forward_flops(model, x)

    def draw(d: DirectionScheme) -> Callable[[], object]:
        return lambda: [directions(d, 7, range(K), i, p.shape)
                        for i, p in enumerate(trainable_params(model).values())]

    def est(engine: str, chunk: int = 32, d: DirectionScheme = dirs) -> Callable[[], object]:
        return lambda: loss_differences(model, F.cross_entropy, x, y, 7, spec, d, engine, chunk)

    auto = choose_engine(model, x, K, "auto", 100)
    fns = {
        "naive load_state_dict loop": lambda: throughput.naive_losses(model, x, y, 7),
        "plain forward x K": lambda: throughput.plain_passes(model, x, y),
        "BAFFLE sequential (functional_call)": est("sequential"),
        "BAFFLE inplace": est("inplace"),
        "BAFFLE batched, chunk 32 (the default)": est("batched", 32),
        f"BAFFLE auto, chunk 100 ({auto.engine})": est("auto", 100),
        "BAFFLE auto, chunk 100, layer directions": est("auto", 100, layered),
        "BAFFLE auto, chunk 100, counter sampler": est("auto", 100, counter),
        "directions only (K draws)": draw(dirs),
        "directions only, counter sampler": draw(counter),
    }
    times = interleaved(fns, REPS)
    naive, plain = times["naive load_state_dict loop"] / (K + 1), times["plain forward x K"] / K
    rows = []
    for k, t in times.items():
        if k.startswith("directions"):
            continue
        passes = K if k.startswith("plain") else K + 1
        run = (layer_direction_flops(model, x, layered.blocks, K) + 2 * flops
               if "layer" in k else flops * passes)
        per = t / passes
        rows.append([k, f"{t * 1e3:.1f}", f"{1 / per:,.0f}", f"{naive / per:.1f}x",
                     f"{plain / per:.2f}x", f"{run / t / 1e9:.0f}", f"{run / t / 1e9 / peak:.1%}"])
    best = min(t for k, t in times.items() if k.startswith("BAFFLE auto, chunk 100 ("))
    facts = {"dirs_share": times["directions only (K draws)"] / best,
             "counter_share": times["directions only, counter sampler"]
             / times["BAFFLE auto, chunk 100, counter sampler"]}
    return table(["method", "ms per step", "passes/s", "vs naive", "vs plain forward",
                  "GFLOP/s", "of fp32 peak"], rows), facts


def loop_rebuild(shapes: list[torch.Size], seed: int, diffs: torch.Tensor, spec: EstimatorSpec,
                 dirs: DirectionScheme, dev: str) -> list[torch.Tensor]:
    """The accumulation baffle ran on a GPU before the scan, one ``add_`` per direction
    (the K directions of a tensor drawn in one call, as baffle's rebuild now draws them)."""
    w = (diffs * spec.scale).tolist()
    grads = []
    for p, shape in enumerate(shapes):
        g = torch.zeros(shape, device=dev)
        for k, eps in enumerate(directions(dirs, seed, range(spec.K), p, shape, dev)):
            g.add_(eps, alpha=w[k])
        grads.append(g)
    return grads


def epoch_step(dev: str = DEV, k: int = K, reps: int = REPS) -> str:
    """One epoch-mode local step of LeNet (batch 32) on ``dev``: the estimate, the rebuild
    (per-direction adds against baffle's), and estimate + the client's step + the server's
    replay of it (with the client's rebuild reading back its estimate's directions, and
    drawing them again), per sampler."""
    rows = []
    for sampler in ("torch", "counter"):
        client, x, y = make("lenet")
        client, x, y = client.to(dev), x.to(dev), y.to(dev)
        server = copy.deepcopy(client)
        spec, dirs = EstimatorSpec(k, SIGMA), DirectionScheme(device=dev, sampler=sampler)
        opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (client, server)]
        shapes = [p.shape for p in trainable_params(client).values()]
        diffs = loss_differences(client, F.cross_entropy, x, y, 7, spec, dirs, "auto").diffs

        def full() -> None:  # the simulator's calls, one local step long
            u = local_epoch_update(0, client, F.cross_entropy, [(x, y)], [7], spec, dirs,
                                   opts[0], 0.3)
            local_step(server, opts[1], 7, u.diffs[0], spec, dirs, 0.3)  # the replay

        def redraw() -> None:  # the same, the client's rebuild drawing its directions again
            d = loss_differences(client, F.cross_entropy, x, y, 7, spec, dirs, "auto").diffs
            local_step(client, opts[0], 7, d, spec, dirs, 0.3)
            local_step(server, opts[1], 7, d, spec, dirs, 0.3)

        fns = {
            "estimate (auto)": lambda: loss_differences(client, F.cross_entropy, x, y, 7, spec,
                                                        dirs, "auto"),
            "rebuild, one add per direction": lambda: loop_rebuild(shapes, 7, diffs, spec, dirs,
                                                                   dev),
            "rebuild (baffle)": lambda: rebuild_gradient(shapes, 7, diffs, spec, dirs, dev),
            "estimate + client step + server replay": full,
            "the same, the client's rebuild drawing again": redraw,
        }
        times = interleaved(fns, reps)
        # baffle's way against the row above it: the loop, and the client drawing again
        over = {"rebuild (baffle)": "rebuild, one add per direction",
                "estimate + client step + server replay":
                    "the same, the client's rebuild drawing again"}
        rows += [[sampler, name, f"{t * 1e3:.2f}",
                  f"{times[over[name]] / t:.2f}x" if name in over else ""]
                 for name, t in times.items()]
    return table(["sampler", "part of a local step", "ms", "speed-up"], rows)


WIDE = "BAFFLE auto, chunk 100"


def wide_step(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """A step of the auto engine with all K perturbations in one grouped pass."""
    spec, dirs = EstimatorSpec(K, SIGMA), DirectionScheme(device=DEV)
    return lambda xb, yb: loss_differences(model, F.cross_entropy, xb, yb, 3, spec, dirs,
                                           "auto", 100)


def gpu_memory(name: str) -> str:
    """Peak allocated GPU memory of one step above the model and batch, per mode."""
    rows, plain = [], 1
    for mode in (*memory.MODES, WIDE):
        model, x, y = make(name)
        model, x, y = model.to(DEV), x.to(DEV), y.to(DEV)
        step = wide_step(model) if mode == WIDE else memory.make_step(name, mode, model, K, DEV)
        step(x[:2], y[:2])
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(x, y)
        torch.cuda.synchronize()
        above = torch.cuda.max_memory_allocated() - base
        plain = max(1, above) if mode == "plain inference" else plain
        rows.append([mode, f"{above / 2**20:.2f}", above])
    return table(["step", "peak above model + batch, MiB", "vs plain inference"],
                 [[m, a, f"{b / plain:.2f}x"] for m, a, b in rows])


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu: no CUDA device visible; section left as it was")
        return
    peak = matmul_peak()
    parts = []
    for name in ("lenet", "wrn-10-2"):
        tab, facts = speed(name, peak["fp32"])
        guarded, bare = tf32_error(name)
        parts.append(
            f"**{name}**, batch 32, K={K}, sigma={SIGMA}: throughput (best of {REPS} "
            f"interleaved, each synchronised)\n\n{tab}\n\nDrawing the K directions on the GPU "
            f"takes {facts['dirs_share']:.0%} of the auto step (one generator per direction and "
            f"tensor: launch-bound); with `--sampler counter` (one batch of elementwise ops "
            f"per tensor) {facts['counter_share']:.0%} of that sampler's step. Loss "
            "differences against float64, relative error, with "
            f"cuDNN's TF32 convolutions on: {guarded:.1e} through the estimator (which runs "
            f"under `exact_fp32`), {bare:.1e} without that guard.\n\nPeak GPU memory of one "
            f"step (allocator high-water mark above the model and batch):\n\n{gpu_memory(name)}")
    parts.append(f"One epoch-mode local step, LeNet, batch 32, K={K} (best of {REPS} "
                 "interleaved, each synchronised). A local step runs the estimate, rebuilds "
                 "the gradient from its K scalars and steps Adam (clip 0.3); the server "
                 "repeats the rebuild and the step to replay it (`--mode epoch`). `speed-up` "
                 "is the time of the row named after it over this row's: baffle's rebuild "
                 "against one `add_` per direction, and the client's rebuild reading back "
                 "the directions its estimate drew against drawing them again:\n\n"
                 + epoch_step())
    body = (f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}. Measured float32 matmul peak (8192^3): "
            f"{peak['fp32']:,.0f} GFLOP/s full float32, {peak['tf32']:,.0f} GFLOP/s TF32; the "
            "`of fp32 peak` column uses the first.\n\n" + "\n\n".join(parts))
    write_section("gpu", "GPU: throughput and memory on a CUDA device", body)


if __name__ == "__main__":
    main()
