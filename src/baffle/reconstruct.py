"""Reconstruction: (seed, K scalars) -> gradient estimate, written to ``p.grad``.

    forward:  g = 1/(K sigma)   * sum_k d_k eps_k
    central:  g = 1/(2 K sigma) * sum_k d_k eps_k

By Stein's identity g is unbiased for the gradient of the Gaussian-smoothed loss
(Feng et al. 2023, eq. 3-4). With a blockwise scheme (``--perturb layer``) each block
averages over its own K_b directions instead: d_k is weighted by K / K_b(k)
(``DirectionScheme.weights``). It is linear in d, so the server may average clients'
scalars first and rebuild once. Nothing but the seed and the scalars is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from baffle.directions import DirectionCache, DirectionScheme
from baffle.engines import drawer
from baffle.errors import UploadError
from baffle.estimator import EstimatorSpec

_CHUNK = 64  # directions regenerated at a time: bounds scratch memory to 64 x largest tensor


def rebuild_gradient(
    shapes: Sequence[torch.Size],
    seed: int,
    diffs: torch.Tensor,
    spec: EstimatorSpec,
    dirs: DirectionScheme = DirectionScheme(),
    device: torch.device | str = "cpu",
    cache: DirectionCache | None = None,
) -> list[torch.Tensor]:
    """The gradient estimate, one tensor per trainable parameter (same order as shapes).

    ``cache`` reuses directions the round's clients already drew (same values)."""
    draw = drawer(dirs, seed, cache)  # refuses a cache of another scheme
    d = torch.as_tensor(diffs, dtype=torch.float32)
    if d.shape != (spec.K,):
        raise UploadError(f"expected {spec.K} loss differences, got shape {tuple(d.shape)}")
    weights = [dk * w for dk, w in zip(d.tolist(), dirs.weights(spec.K))]
    grads = []
    for p, shape in enumerate(shapes):
        g = torch.zeros(shape, dtype=torch.float32, device=device)
        moving = dirs.moving(p, spec.K)  # the other directions are zero on this tensor
        for start in range(0, len(moving), _CHUNK):
            ks = moving[start:start + _CHUNK]
            eps = draw(ks, p, shape, device)
            # Elementwise accumulation in a fixed k order: unlike a matmul, its rounding
            # does not depend on the thread count, so a server replaying a client's local
            # steps gets the client's exact gradient on any machine.
            for i, k in enumerate(ks):
                g.add_(eps[i], alpha=weights[k])
        grads.append(g.mul_(spec.scale))
    return grads


def write_grads(params: Iterable[torch.nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
    """Set ``p.grad = g`` for each trainable parameter, ready for any ``torch.optim`` step."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(device=p.device, dtype=p.dtype).reshape(p.shape)


def rescale_inf_norm(grads: Sequence[torch.Tensor], max_abs: float | None) -> list[torch.Tensor]:
    """Rescale the whole estimate so its largest |entry| is at most ``max_abs`` (direction kept).

    This is the authors' clipping (0.3 by default); ``None`` switches it off.
    """
    if max_abs is None:
        return list(grads)
    peak = max(float(g.abs().max()) for g in grads if g.numel())
    if peak <= max_abs:
        return list(grads)
    return [g * (max_abs / peak) for g in grads]
