"""Estimation: (model, batch, seed) -> K loss differences, forward passes only.

With directions eps_k from the seed and delta_k = sigma * eps_k (Feng et al. 2023, eq. 4):

    forward:  d_k = L(W + delta_k) - L(W)             (K + 1 forward passes)
    central:  d_k = L(W + delta_k) - L(W - delta_k)   (2K forward passes)

Perturbed points are evaluated with ``torch.func.functional_call`` on new tensors
``W + sigma * eps``; the model's own parameters are never written, so they stay
bit-identical. Only trainable parameters are perturbed, never buffers.

Engines:
- ``sequential``: one perturbed model at a time (memory: one parameter-sized copy).
- ``batched``: ``chunk`` perturbed models at once under ``torch.func.vmap``, which runs
  the K copies of each conv/linear layer as one grouped/batched kernel.
Both draw identical directions and agree to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, vmap

from baffle.directions import DirectionScheme, direction, directions
from baffle.errors import ConfigError

Scheme = Literal["forward", "central"]
Engine = Literal["sequential", "batched"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEMES: tuple[str, ...] = ("forward", "central")
ENGINES: tuple[str, ...] = ("sequential", "batched")


@dataclass(frozen=True)
class EstimatorSpec:
    """The knobs of one estimate: K directions of scale sigma, forward or central."""

    K: int = 100
    sigma: float = 1e-4
    scheme: Scheme = "forward"

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


@torch.no_grad()
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
) -> Estimate:
    """The K loss differences d_k of ``model`` on batch (x, y) along the seed's directions."""
    check_no_batchnorm(model)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    params = {n: p.detach() for n, p in trainable_params(model).items()}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def loss_at(point: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, (point, fixed), (x,)), y)

    if not params:  # nothing to perturb: every difference is exactly zero
        return Estimate(torch.zeros(spec.K), float(loss_at(params)), spec.forward_passes)
    signs = (1.0,) if spec.scheme == "forward" else (1.0, -1.0)
    if engine == "sequential":
        evaluate = _sequential_losses
    else:
        evaluate = _batched_losses
    plus_minus = [evaluate(loss_at, params, seed, spec, dirs, s, chunk) for s in signs]
    if spec.scheme == "forward":
        base = loss_at(params)
        diffs = plus_minus[0] - base
        loss = float(base)
    else:
        diffs = plus_minus[0] - plus_minus[1]
        loss = float(torch.cat(plus_minus).mean())
    return Estimate(diffs.float().cpu(), loss, spec.forward_passes)


def _sequential_losses(
    loss_at: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    seed: int,
    spec: EstimatorSpec,
    dirs: DirectionScheme,
    sign: float,
    chunk: int,
) -> torch.Tensor:
    """L(W + sign * sigma * eps_k) for k < K, one perturbed model at a time."""
    step = sign * spec.sigma
    out = torch.empty(spec.K)
    for k in range(spec.K):
        point = {
            n: p + step * direction(dirs, seed, k, i, p.shape).to(p.device)
            for i, (n, p) in enumerate(params.items())
        }
        out[k] = loss_at(point)
    return out


def _batched_losses(
    loss_at: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    seed: int,
    spec: EstimatorSpec,
    dirs: DirectionScheme,
    sign: float,
    chunk: int,
) -> torch.Tensor:
    """L(W + sign * sigma * eps_k) for k < K, ``chunk`` perturbed models per vmapped pass."""
    step = sign * spec.sigma
    batched_loss = vmap(loss_at)
    out = []
    for start in range(0, spec.K, max(1, chunk)):
        ks = range(start, min(spec.K, start + max(1, chunk)))
        points = {
            n: p.unsqueeze(0) + step * directions(dirs, seed, ks, i, p.shape, p.device)
            for i, (n, p) in enumerate(params.items())
        }
        out.append(batched_loss(points).cpu())
    return torch.cat(out)
