"""Estimation: (model, batch, seed) -> K loss differences, forward passes only.

With directions eps_k from the seed and delta_k = sigma * eps_k (Feng et al. 2023, eq. 4):

    forward:  d_k = L(W + delta_k) - L(W)             (K + 1 forward passes)
    central:  d_k = L(W + delta_k) - L(W - delta_k)   (2K forward passes)

Only trainable parameters are perturbed, never buffers, and the model's parameters are
bit-identical after every call. Engines (``baffle.engines`` has the details):

- ``batched``: the K perturbed models run side by side as one grouped model (one wide
  first layer, grouped convs, ``bmm`` linears), ``chunk`` at a time within the memory
  budget; models with ops the grouped path does not know fall back to ``vmap``. With
  layer directions it runs only the layers each direction's perturbation reaches.
- ``delta``: ``batched``, except that a conv whose input is perturbed computes only its
  change from one recorded unperturbed pass, O(sigma), in bfloat16 (about 7x float32's
  speed on a CPU with AMX), and adds it to the unperturbed output in float32. Its loss
  differences carry bfloat16's rounding relative to the changes on top of float32's; at
  sigma = 1e-4 on LeNet the two are of one size (measured against ``float64_diffs``).
- ``sequential``: one functional perturbed copy (``functional_call``) at a time.
- ``inplace``: one perturbed model at a time written into the model's own weights, module
  by module, with an exact snapshot/restore: memory close to plain inference.
- ``vmap``: ``torch.func.vmap`` over ``functional_call`` (any model).
- ``auto``: ``batched`` if a chunk fits the budget, else ``inplace`` (logged).
All draw identical directions and agree to float32 rounding (``delta``: to bfloat16
rounding of each loss difference).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from baffle import engines as eng
from baffle.directions import DirectionCache, DirectionScheme
from baffle.errors import ConfigError

Scheme = Literal["forward", "central"]
Engine = Literal["sequential", "batched", "delta", "inplace", "vmap", "auto"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEMES: tuple[str, ...] = ("forward", "central")
ENGINES: tuple[str, ...] = ("sequential", "batched", "delta", "inplace", "vmap", "auto")
log = logging.getLogger("baffle.estimator")


@dataclass(frozen=True)
class EstimatorSpec:
    """The knobs of one estimate: K directions of scale sigma, forward or central, and how
    the server rebuilds it from directions in a basis (``solve``: least squares in its
    span instead of the Monte Carlo mean; ``baffle.reconstruct``)."""

    K: int = 100
    sigma: float = 1e-4
    scheme: Scheme = "forward"
    solve: bool = False

    def __post_init__(self) -> None:
        validate_spec(self.K, self.sigma, self.scheme)

    @property
    def forward_passes(self) -> int:
        """Forward passes one estimate costs: K + 1 (forward) or 2K (central)."""
        return self.K + 1 if self.scheme == "forward" else 2 * self.K

    @property
    def scale(self) -> float:
        """The reconstruction factor: 1/(K sigma) forward, 1/(2 K sigma) central."""
        return 1.0 / ((1 if self.scheme == "forward" else 2) * self.K * self.sigma)


def validate_spec(K: int, sigma: float, scheme: str) -> None:
    """One-line ``ConfigError`` for K < 1, sigma <= 0 or non-finite, unknown scheme."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ConfigError(f"K must be an integer >= 1 (got {K!r}); try --K 100")
    if not isinstance(sigma, (int, float)) or not (0 < float(sigma) < float("inf")):
        raise ConfigError(f"sigma must be a finite number > 0 (got {sigma!r}); try --sigma 1e-4")
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")


@dataclass(frozen=True)
class Estimate:
    """What one client computes: K loss differences, its base loss and the cost."""

    diffs: torch.Tensor  # (K,) float32, on the CPU
    loss: float  # L(W) (forward) or mean of L(W +- delta) (central, = L(W) + O(sigma^2))
    forward_passes: int


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that are perturbed, in the fixed order of ``named_parameters``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_no_batchnorm(model: nn.Module) -> None:
    """BatchNorm cannot work forward-only; raise a one-line ``ConfigError`` if present."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(
            "BatchNorm does not work with BAFFLE: each of the K+1 perturbed forward passes "
            "normalises with its own batch statistics and overwrites the running buffers, so "
            "the loss differences measure noise; use --norm group or --norm none"
        )


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[int, eng.GroupedPlan | str, dict]] = (
    weakref.WeakKeyDictionary())


def grouped_plan(model: nn.Module) -> eng.GroupedPlan | None:
    """The model's grouped plan (cached per model and module structure), or None."""
    shape = hash(tuple((n, type(m)) for n, m in model.named_modules()))
    hit = _PLANS.get(model)
    if hit is None or hit[0] != shape:
        try:
            hit = (shape, eng.plan(model), {})
        except eng.Unsupported as e:
            log.debug("grouped engine unavailable for %s: %s", type(model).__name__, e)
            hit = (shape, str(e), {})
        _PLANS[model] = hit
    return hit[1] if isinstance(hit[1], eng.GroupedPlan) else None


def _activation_bytes(model: nn.Module, plan: eng.GroupedPlan, x: torch.Tensor
                      ) -> tuple[int, int]:
    sizes = _PLANS[model][2]
    key = (tuple(x.shape), x.dtype, str(x.device))
    if key not in sizes:
        sizes[key] = eng.activation_bytes(plan, x)
    return sizes[key]


@dataclass(frozen=True)
class EngineChoice:
    """What ``loss_differences`` will run: the engine, perturbations per pass, and why."""

    engine: str  # grouped | delta | vmap | sequential | inplace
    chunk: int
    reason: str
    reuse: bool = False  # grouped, layer directions: keep the unperturbed pass's values


def choose_engine(
    model: nn.Module,
    x: torch.Tensor,
    K: int,
    engine: str = "auto",
    chunk: int = 32,
    max_memory: str | int | float | None = None,
    blocks: tuple[int, ...] = (),
) -> EngineChoice:
    """Resolve ``engine`` (and ``auto``) and the chunk size under the memory budget.

    With layer directions (``blocks``) the grouped engine also keeps the activations of
    one unperturbed pass, if they fit beside a chunk, so layers below a perturbed one run
    once per estimate."""
    params = trainable_params(model)
    budget = eng.resolve_budget(max_memory, x.device)
    pbytes = eng.param_bytes(params)
    plan = grouped_plan(model) if engine in ("batched", "delta", "auto") else None
    if engine == "delta" and plan is not None:
        peak, total = _activation_bytes(model, plan, x)
        per = 2 * eng.per_perturbation_bytes(peak, pbytes)  # + the bf16 input and change
        cap = min(chunk, eng.DELTA_CHUNK_CAP) if x.device.type == "cpu" else chunk
        n = eng.chunk_for(per, max(0, budget - total), K, cap)
        return EngineChoice("delta", n, f"{n} perturbations per pass, "
                            f"{(per * n + total) / 2**20:.0f} MiB of a {budget / 2**20:.0f} "
                            "MiB budget, unperturbed pass kept")
    if engine in ("batched", "auto") and plan is not None:
        peak, total = _activation_bytes(model, plan, x)
        per = eng.per_perturbation_bytes(peak, pbytes)
        cap = chunk if engine == "batched" else auto_chunk_cap(x.device, chunk, K)
        if engine == "batched" or per <= budget:
            n = eng.chunk_for(per, budget, K, cap)
            reuse = bool(blocks) and per * n + total <= budget
            why = (f"{n} perturbations per pass, {per * n / 2**20:.0f} MiB of a "
                   f"{budget / 2**20:.0f} MiB budget")
            if reuse:
                why += f"; {total / 2**20:.1f} MiB of unperturbed activations reused"
            return EngineChoice("grouped", n, why, reuse)
    if engine in ("batched", "delta", "vmap") or (engine == "auto" and x.device.type != "cpu"
                                         and 2 * pbytes <= budget):
        n = eng.chunk_for(2 * pbytes + 2 * x.numel() * x.element_size() * 64, budget, K, chunk)
        why = "grouped path unsupported" if engine != "vmap" else "requested"
        return EngineChoice("vmap", n, why)
    if engine == "auto":
        if 2 * pbytes > budget:
            return EngineChoice("inplace", 1, f"a perturbed copy of the {pbytes / 2**20:.0f} MiB "
                                f"of weights does not fit a {budget / 2**20:.0f} MiB budget")
        if plan is not None:
            return EngineChoice("inplace", 1, "one grouped perturbation's activations exceed "
                                f"the {budget / 2**20:.0f} MiB budget")
        return EngineChoice("sequential", 1, "grouped path unsupported on this model")
    return EngineChoice(engine, 1, "requested")


def auto_chunk_cap(device: torch.device, chunk: int, K: int) -> int:
    """Most perturbations per grouped pass ``auto`` takes before the memory budget: on a
    CPU ``min(chunk, CPU_CHUNK_CAP)``; on a GPU all K (``--chunk`` binds ``batched`` only),
    measured faster than 32 at once on an H200 (BENCHMARKS.md, GPU section)."""
    return min(chunk, eng.CPU_CHUNK_CAP) if device.type == "cpu" else K


@torch.no_grad()
@eng.exact_fp32()  # no TF32: it would bury the O(sigma) differences on a GPU
def loss_differences(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    spec: EstimatorSpec,
    dirs: DirectionScheme = DirectionScheme(),
    engine: Engine = "batched",
    chunk: int = 32,
    *,
    max_memory: str | int | float | None = None,
    cache: DirectionCache | None = None,
) -> Estimate:
    """The K loss differences d_k of ``model`` on batch (x, y) along the seed's directions.

    ``chunk`` caps the perturbations per batched pass; ``max_memory`` (bytes, or a string
    such as ``"2GiB"``; default a quarter of the free memory) bounds the scratch;
    ``cache`` (a ``DirectionCache``) lets the clients of a shared-seed round draw once.
    """
    check_no_batchnorm(model)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    params = trainable_params(model)  # the Parameters themselves: engines key on identity
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    x_orig = x

    def loss_at(point: dict[str, torch.Tensor], xx: torch.Tensor | None = None) -> torch.Tensor:
        return loss_fn(functional_call(model, (point, fixed), (x if xx is None else xx,)), y)

    if not params:  # nothing to perturb: every difference is exactly zero
        return Estimate(torch.zeros(spec.K), float(loss_at(params)), spec.forward_passes)
    choice = choose_engine(model, x, spec.K, engine, chunk, max_memory, dirs.blocks)
    if engine == "auto":
        eng.log_choice(model, choice.engine, choice.reason)
    if choice.engine != "vmap":  # same values, faster convs; every pass sees the same x
        x = eng.to_channels_last(x)

    draw = eng.drawer(dirs, seed, cache)

    def losses(sign: float) -> torch.Tensor:
        step = sign * spec.sigma
        if choice.engine in ("grouped", "delta"):
            plan = grouped_plan(model)
            assert plan is not None
            try:
                return eng.grouped_losses(
                    plan, loss_fn, x, y, params, draw, spec.K, step, choice.chunk, dirs.blocks,
                    choice.reuse, dirs.cycle, torch.bfloat16 if choice.engine == "delta" else None)
            except eng.Unsupported as e:  # found only at run time (e.g. Linear on 3-D input)
                log.debug("grouped engine failed on %s (%s); using vmap", type(model).__name__, e)
                return eng.vmap_losses(lambda pt: loss_at(pt, x_orig), params, draw, spec.K,
                                       step, choice.chunk)
        if choice.engine == "vmap":
            return eng.vmap_losses(loss_at, params, draw, spec.K, step, choice.chunk)
        if choice.engine == "inplace":
            return eng.inplace_losses(model, loss_fn, x, y, params, draw, spec.K, step)
        return eng.sequential_losses(loss_at, params, draw, spec.K, step)

    signs = (1.0,) if spec.scheme == "forward" else (1.0, -1.0)
    plus_minus = [losses(s) for s in signs]
    if spec.scheme == "forward":
        base = loss_fn(model(x), y) if choice.engine == "inplace" else loss_at(params)
        diffs = plus_minus[0] - base.float().cpu()
        loss = float(base)
    else:
        diffs = plus_minus[0] - plus_minus[1]
        loss = float(torch.cat(plus_minus).mean())
    return Estimate(diffs.float().cpu(), loss, spec.forward_passes)


@torch.no_grad()
def float64_diffs(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    spec: EstimatorSpec,
    dirs: DirectionScheme = DirectionScheme(),
) -> torch.Tensor:
    """The K loss differences in float64 along the same (float32-drawn) directions, one
    perturbation at a time: the reference an engine's rounding is measured against."""
    m64 = copy.deepcopy(model).double()
    w = {n: p.detach() for n, p in m64.named_parameters()}
    names = list(trainable_params(model))
    draw = eng.drawer(dirs, seed)
    x64 = x.double()

    def loss(sign: float, k: int) -> torch.Tensor:
        point = dict(w)
        for i, n in enumerate(names):
            eps = draw(range(k, k + 1), i, w[n].shape, w[n].device)[0]
            point[n] = w[n] + sign * spec.sigma * eps.double()
        return loss_fn(functional_call(m64, point, (x64,)), y)

    base = loss_fn(m64(x64), y) if spec.scheme == "forward" else None
    return torch.stack([loss(1.0, k) - (base if base is not None else loss(-1.0, k))
                        for k in range(spec.K)]).cpu()
