"""Reconstruction: (seed, K scalars) -> gradient estimate, written to ``p.grad``.

    forward:  g = 1/(K sigma)   * sum_k d_k eps_k
    central:  g = 1/(2 K sigma) * sum_k d_k eps_k

By Stein's identity g is unbiased for the gradient of the Gaussian-smoothed loss
(Feng et al. 2023, eq. 3-4). With a blockwise scheme (``--perturb layer``) each block
averages over its own K_b directions instead: d_k is weighted by K / K_b(k)
(``DirectionScheme.weights``). It is linear in d, so the server may average clients'
scalars first and rebuild once. Nothing but the seed and the scalars is needed.

With every direction in a basis, eps_k = U z_k (``--guide-dims``), the K scalars measure
the r coordinates c = U^T g of the gradient's part in the span:

    d_k / s = a + z_k^T c + noise,     s = sigma (forward) or 2 sigma (central)

where a absorbs the forward difference's second-order term (sigma/2) eps^T H eps, whose
mean over directions is (sigma/2) tr(U^T H U). ``spec.solve`` (``--guide-solve``) fits
(a, c) by least squares and returns g = U c: for K > r and noise-free measurements it is
U U^T g exactly, where the mean above has an error ~ sqrt((r+1)/K) of it. It is linear in
d too, so averaging the clients' scalars first still equals averaging their rebuilds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from baffle.directions import DirectionCache, DirectionScheme, guide_coordinates
from baffle.engines import drawer
from baffle.errors import UploadError
from baffle.estimator import EstimatorSpec

_SCRATCH = 64 << 20  # bytes of directions regenerated at a time (at least one direction)


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
    if spec.solve and dirs.basis is not None:  # before the first basis: the mean
        c = solve_in_span(seed, d, spec, dirs).to(device)
        return [(dirs.basis.block(p, c.device) @ c).view(shape) for p, shape in enumerate(shapes)]
    weights = [dk * w for dk, w in zip(d.tolist(), dirs.weights(spec.K))]
    on_gpu = torch.device(device).type != "cpu"
    w_dev = torch.tensor(weights, device=device) if on_gpu else None
    grads = []
    for p, shape in enumerate(shapes):
        g = torch.zeros(shape, dtype=torch.float32, device=device)
        moving = dirs.moving(p, spec.K)  # the other directions are zero on this tensor
        chunk = max(1, _SCRATCH // (4 * max(1, math.prod(shape))))
        for start in range(0, len(moving), chunk):
            ks = moving[start:start + chunk]
            eps = draw(ks, p, shape, device)
            # Every entry is summed in k order whatever the thread count (unlike a
            # matmul), so a server replaying a client's local steps gets the client's
            # exact gradient on any machine of the same device type.
            if w_dev is None:  # CPU: one vectorised add per direction (faster than a scan)
                for i, k in enumerate(ks):
                    g.add_(eps[i], alpha=weights[k])
            else:  # GPU: four launches per chunk, not one per direction
                w = w_dev[ks.start:ks.stop:ks.step] if isinstance(ks, range) else w_dev[list(ks)]
                g.add_(scan_sum(eps, w).view(shape))
        grads.append(g.mul_(spec.scale))
    return grads


def solve_in_span(seed: int, diffs: torch.Tensor, spec: EstimatorSpec,
                  dirs: DirectionScheme) -> torch.Tensor:
    """c = U^T g (r,) from K > r scalars: the least-squares fit of d_k / s = a + z_k^T c
    (float64; the intercept a takes the forward difference's mean curvature term)."""
    basis = dirs.basis
    if basis is None or spec.K <= basis.dims:
        raise ValueError(f"a least-squares rebuild needs directions in a basis and K > r "
                         f"(K={spec.K}, r={None if basis is None else basis.dims})")
    z = guide_coordinates(dirs, seed, range(spec.K)).to("cpu", torch.float64)
    design = torch.cat([torch.ones(spec.K, 1, dtype=torch.float64), z], 1)
    scaled = diffs.to("cpu", torch.float64) * (spec.K * spec.scale)  # d_k / s
    fit = torch.linalg.lstsq(design, scaled[:, None]).solution[:, 0]
    return fit[1:].to(torch.float32)


def scan_sum(eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i eps_i over dim 0, added in i order for each entry on its own (a scan down
    dim 0: one GPU thread walks each column), so no thread count or launch configuration
    changes its rounding. Scales ``eps`` in place; returns a flat tensor."""
    return eps.view(len(w), -1).mul_(w.view(-1, 1)).cumsum_(0)[-1]


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
    peak = float(torch.stack([g.abs().max() for g in grads if g.numel()]).max())  # one sync
    if peak <= max_abs:
        return list(grads)
    return [g * (max_abs / peak) for g in grads]
